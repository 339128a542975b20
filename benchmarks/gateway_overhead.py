"""Gateway overhead: the same chat requests straight to vLLM and through `tuneloop serve`, in one run.

The baseline (direct vLLM) and the gateway are measured interleaved: batches alternate between the
two targets (and which goes first alternates per round), so both see the same machine load, the same
prompts (Banking77 test queries, greedy decoding, fixed max_tokens) and the same concurrency. At
concurrency 1 each prompt goes to both targets back to back instead, and the median of those pairs'
differences is printed too: vLLM's own latency varies more from request to request than the gateway adds.
Printed: throughput of each path and their ratio, p50/p99 latency of each and what the gateway adds.

    # everything started here (a supervised vLLM + `tuneloop serve --vllm-url` on it):
    python benchmarks/gateway_overhead.py
    # or against running servers:
    python benchmarks/gateway_overhead.py --vllm-url http://127.0.0.1:8001 \\
        --gateway-url http://127.0.0.1:8000/v1 --api-key $TUNELOOP_ADMIN_KEY
    # only the direct-vLLM half (checks the harness, no gateway):
    python benchmarks/gateway_overhead.py --direct-only
    # the gateway's own cost: an upstream that answers at once (benchmarks/stub_vllm.py) instead of vLLM
    python benchmarks/gateway_overhead.py --stub --concurrency 1 --rounds 10
    # ... at a model's pace (answers after 200 ms) without a model's CPU load
    python benchmarks/gateway_overhead.py --stub --stub-delay-ms 200 --concurrency 1 --rounds 6

The gateway's CPU time per request is printed too, with its idle background (measured for `--idle-seconds`
before the rounds) taken out. The started gateway's monitor queues a drift job every minute once 30 completions
arrived, and the worker runs it on the same cores: `--monitor-interval 86400` keeps that out of a run.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_MODEL = ROOT / "var" / "models" / "SmolLM2-135M-Instruct"
DEFAULT_PROMPTS = ROOT.parent / "shared" / "datasets" / "banking77" / "test.csv"
FALLBACK_PROMPTS = [
    "How do I activate my new card?",
    "My transfer has not arrived yet.",
    "What is the exchange rate for euros?",
    "I lost my card, what should I do?",
    "Why was I charged a fee for a top-up?",
    "Can I change my PIN at an ATM?",
]


@dataclass
class Target:
    """One path under test: an OpenAI-compatible base URL ending in /v1, a model name, optional key."""

    name: str
    base_url: str
    model: str
    api_key: str | None = None
    latencies: list[float] = field(default_factory=list)
    busy_s: float = 0.0  # wall time of this target's batches
    completion_tokens: int = 0
    errors: int = 0


def load_prompts(path: Path, n: int) -> list[str]:
    if path.exists():
        with path.open(newline="") as fh:
            rows = [r["text"] for r in csv.DictReader(fh)]
    else:
        rows = FALLBACK_PROMPTS
    return [rows[i % len(rows)] for i in range(n)]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


async def run_batch(
    target: Target, client: httpx.AsyncClient, prompts: list[str], concurrency: int, max_tokens: int
) -> None:
    sem = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}

    async def one(prompt: str) -> None:
        payload = {
            "model": target.model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
            "temperature": 0.0,
        }
        async with sem:
            t0 = time.perf_counter()
            try:
                r = await client.post(f"{target.base_url}/chat/completions", json=payload, headers=headers)
            except httpx.HTTPError:
                target.errors += 1
                return
            dt = time.perf_counter() - t0
        if r.status_code != 200:
            target.errors += 1
            if target.errors <= 3:
                print(f"{target.name}: HTTP {r.status_code}: {r.text[:300]}", file=sys.stderr)
            return
        target.latencies.append(dt)
        target.completion_tokens += int(r.json().get("usage", {}).get("completion_tokens", 0))

    t0 = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    target.busy_s += time.perf_counter() - t0


async def measure(targets: list[Target], args: argparse.Namespace) -> None:
    prompts = load_prompts(Path(args.prompts), args.rounds * args.batch_size + args.warmup)
    limits = httpx.Limits(
        max_connections=args.concurrency * 2, max_keepalive_connections=args.concurrency * 2
    )
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0), limits=limits) as client:
        warm = prompts[: args.warmup]
        for t in targets:  # warm-up (connections, caches), not counted
            await run_batch(t, client, warm, args.concurrency, args.max_tokens)
            t.latencies.clear()
            t.busy_s, t.completion_tokens, t.errors = 0.0, 0, 0
        for rnd in range(args.rounds):
            batch = prompts[args.warmup + rnd * args.batch_size : args.warmup + (rnd + 1) * args.batch_size]
            if args.concurrency == 1:  # one request at a time: pair each prompt's two requests back to back
                for i, prompt in enumerate(batch):
                    for t in targets if i % 2 == 0 else targets[::-1]:
                        await run_batch(t, client, [prompt], 1, args.max_tokens)
            else:
                for t in targets if rnd % 2 == 0 else targets[::-1]:
                    await run_batch(t, client, batch, args.concurrency, args.max_tokens)
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)


def report(targets: list[Target], args: argparse.Namespace) -> None:
    print(
        f"\n{args.rounds} rounds x {args.batch_size} requests per target, concurrency {args.concurrency}, "
        f"max_tokens {args.max_tokens}, greedy"
    )
    print(f"{'path':<10}{'ok':>6}{'err':>5}{'req/s':>9}{'tok/s':>9}{'p50 s':>9}{'p99 s':>9}")
    for t in targets:
        rps = len(t.latencies) / t.busy_s if t.busy_s else float("nan")
        tps = t.completion_tokens / t.busy_s if t.busy_s else float("nan")
        p50, p99 = percentile(t.latencies, 50), percentile(t.latencies, 99)
        print(f"{t.name:<10}{len(t.latencies):>6}{t.errors:>5}{rps:>9.2f}{tps:>9.1f}{p50:>9.3f}{p99:>9.3f}")
    if len(targets) == 2:
        direct, gateway = targets
        ratio = (len(gateway.latencies) / gateway.busy_s) / (len(direct.latencies) / direct.busy_s)
        print(f"\nthroughput ratio gateway/direct: {ratio:.3f}")
        for q in (50, 99):
            added = percentile(gateway.latencies, q) - percentile(direct.latencies, q)
            print(f"added p{q} latency: {added * 1000:+.1f} ms")
        if args.concurrency == 1 and len(gateway.latencies) == len(direct.latencies):
            # Same prompt, back to back: cancels the request-to-request variation of vLLM's own latency.
            diffs = [g - d for g, d in zip(gateway.latencies, direct.latencies)]
            print(f"added latency, median of same-prompt pairs: {statistics.median(diffs) * 1000:+.1f} ms")
        if direct.completion_tokens != gateway.completion_tokens:
            print(
                f"note: completion tokens differ (direct {direct.completion_tokens}, gateway "
                f"{gateway.completion_tokens}): the two paths did not generate the same work"
            )


def start_gateway(
    vllm_url: str, model_dir: str, port: int, api_key: str, data_dir: Path, monitor_interval_s: float | None
) -> subprocess.Popen[bytes]:
    """`tuneloop serve` in front of an existing vLLM; its log goes to data_dir/serve.log."""
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--data-dir", str(data_dir),
           "--base-model", model_dir, "--vllm-url", vllm_url]  # fmt: skip
    env = {**os.environ, "TUNELOOP_ADMIN_KEY": api_key}
    if monitor_interval_s is not None:
        env["TUNELOOP_MONITOR_INTERVAL_SECONDS"] = str(monitor_interval_s)
    data_dir.mkdir(parents=True, exist_ok=True)
    with (data_dir / "serve.log").open("ab") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _cpu_seconds(proc: subprocess.Popen[bytes] | None) -> float:
    if proc is None:
        return 0.0
    import psutil

    t = psutil.Process(proc.pid).cpu_times()
    return t.user + t.system


def start_stub(port: int, delay_ms: float) -> subprocess.Popen[bytes]:
    """`benchmarks/stub_vllm.py`: answers at once (or after `delay_ms`), so the gateway's own cost is all that
    is added."""
    return subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "stub_vllm.py"), "--port", str(port),
                             "--delay-ms", str(delay_ms)])


async def wait_http_ok(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{url}: process exited with {proc.returncode}")
            try:
                if (await client.get(url, timeout=5)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"{url} not ready after {timeout:.0f} s")


async def main_async(args: argparse.Namespace) -> int:
    from service.vllm import VLLMOptions, VLLMSupervisor
    from service.vllm.supervisor import cpu_serving_dtype, free_port

    supervisor: VLLMSupervisor | None = None
    gateway: subprocess.Popen[bytes] | None = None
    stub: subprocess.Popen[bytes] | None = None
    tmp = Path(tempfile.mkdtemp(prefix="tuneloop-bench-"))
    try:
        vllm_url = args.vllm_url
        if args.stub:
            port = free_port()
            stub = start_stub(port, args.stub_delay_ms)
            vllm_url = f"http://127.0.0.1:{port}"
            await wait_http_ok(f"{vllm_url}/health", 60, stub)
        elif vllm_url is None:
            supervisor = VLLMSupervisor(
                VLLMOptions(model_path=args.model_dir, log_path=str(tmp / "vllm.log"),
                            dtype=args.dtype or cpu_serving_dtype())
            )
            await supervisor.start()
            print(f"starting vLLM ({supervisor.log_path}) ...", file=sys.stderr)
            await supervisor.wait_ready(900)
            vllm_url = supervisor.base_url
        vllm_url = vllm_url.rstrip("/").removesuffix("/v1")
        targets = [Target("direct", f"{vllm_url}/v1", args.vllm_model)]
        if not args.direct_only:
            gateway_url, api_key = args.gateway_url, args.api_key
            if gateway_url is None:
                port, api_key = free_port(), api_key or "tl-bench-" + uuid.uuid4().hex
                gateway = start_gateway(vllm_url, args.model_dir, port, api_key, tmp / "service",
                                        args.monitor_interval)
                gateway_url = f"http://127.0.0.1:{port}/v1"
                print(f"starting tuneloop serve ({tmp / 'service' / 'serve.log'}) ...", file=sys.stderr)
                await wait_http_ok(f"http://127.0.0.1:{port}/ready", 600, gateway)
            if not api_key:
                raise SystemExit("--api-key (or TUNELOOP_ADMIN_KEY) is required with --gateway-url")
            targets.append(Target("gateway", gateway_url.rstrip("/"), args.gateway_model, api_key))
        idle_cpu_s_per_s = None
        if gateway is not None:  # the gateway's background (timers, health checks), measured while it idles
            cpu_before, t0 = _cpu_seconds(gateway), time.perf_counter()
            await asyncio.sleep(args.idle_seconds)
            idle_cpu_s_per_s = (_cpu_seconds(gateway) - cpu_before) / (time.perf_counter() - t0)
        cpu_before, t0 = _cpu_seconds(gateway), time.perf_counter()
        await measure(targets, args)
        cpu_s, wall_s = _cpu_seconds(gateway) - cpu_before, time.perf_counter() - t0
        report(targets, args)
        if idle_cpu_s_per_s is not None and len(targets) == 2:  # what the gateway takes from vLLM's cores
            served = len(targets[1].latencies) + targets[1].errors + args.warmup
            background = idle_cpu_s_per_s * wall_s
            print(f"gateway CPU time per request: {cpu_s / served * 1000:.2f} ms (user + system, all its threads), "
                  f"of which {background / served * 1000:.2f} ms is its idle background "
                  f"({idle_cpu_s_per_s * 1000:.1f} ms/s over the run's {wall_s:.0f} s): "
                  f"{(cpu_s - background) / served * 1000:.2f} ms of work per request")
        return 0 if all(t.latencies for t in targets) else 1
    finally:
        for proc in (gateway, stub):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if supervisor is not None:
            await supervisor.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vllm-url", help="running vLLM (default: start one on --model-dir)")
    p.add_argument(
        "--gateway-url", help="running gateway, e.g. http://127.0.0.1:8000/v1 (default: start one)"
    )
    p.add_argument("--api-key", default=os.environ.get("TUNELOOP_ADMIN_KEY"), help="gateway API key")
    p.add_argument("--model-dir", default=str(DEFAULT_MODEL))
    p.add_argument("--dtype", default="", help="of the started vLLM (default: the service's, by the CPU)")
    p.add_argument("--vllm-model", default="base", help="served model name on vLLM")
    p.add_argument("--gateway-model", default="default", help="deployment name on the gateway")
    p.add_argument("--prompts", default=str(DEFAULT_PROMPTS), help="CSV with a `text` column")
    p.add_argument("--rounds", type=int, default=6, help="alternating batches per target")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--direct-only", action="store_true", help="measure only the direct-vLLM half")
    p.add_argument("--idle-seconds", type=float, default=10.0,
                   help="the started gateway's idle CPU is measured this long before the rounds")
    p.add_argument("--monitor-interval", type=float, default=None,
                   help="the started gateway's TUNELOOP_MONITOR_INTERVAL_SECONDS (default: the service's, 60): "
                        "e.g. 86400 keeps its drift jobs off the cores during the run")
    p.add_argument("--stub", action="store_true",
                   help="an upstream that answers at once instead of vLLM: what is added is the gateway's own cost")
    p.add_argument("--stub-delay-ms", type=float, default=0.0,
                   help="with --stub: answer after this long (vLLM's pace without its CPU load)")
    args = p.parse_args(argv)
    if args.idle_seconds <= 0 or args.stub_delay_ms < 0 or (args.monitor_interval is not None
                                                           and args.monitor_interval <= 0):
        p.error("--idle-seconds and --monitor-interval must be > 0, --stub-delay-ms >= 0")
    for name in ("rounds", "batch_size", "concurrency", "max_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
