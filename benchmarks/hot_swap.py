"""Hot-swap cost: time from `promote` to the first response served by the new adapter, and p99 latency of
live traffic during swaps vs without swaps, measured in one run against a real service and vLLM.

Run: .venv/bin/python benchmarks/hot_swap.py [--swaps 20] [--clients 4] [--vllm-url URL]

Without --vllm-url it starts `tuneloop serve` with its managed vLLM (a minute or two). Two random LoRA
adapters (rank 8) are put into the registry directly (the benchmark measures swapping, not training).

Two kinds of swap are timed: a plain `promote` (load + probe + switch inside the request), and the way an
experiment promotes its winner: the adapter is already loaded and probed as a (here 0.1 %) variant, and
promote + ending the experiment is only a commit and a routing switch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.conftest import free_port
from tests.conftest_vllm import register_random_lora


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 2 else max(values)


def first_response(samples: list[tuple[float, float, str]], adapter_id: str, t0: float) -> float:
    """Seconds from t0 to the end of the first request that started at or after t0 and was served by the adapter."""
    while True:
        hits = [s for s in list(samples) if s[0] >= t0 and s[2].startswith(f"swap--{adapter_id}")]
        if hits:
            return min(s[0] + s[1] for s in hits) - t0
        time.sleep(0.01)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--swaps", type=int, default=20)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=30, help="duration of the no-swap phase")
    ap.add_argument("--vllm-url", default=None)
    args = ap.parse_args()

    from adapters.base_model import BUILTIN_SMOLLM2, prepare_base_model
    from monitoring.experiments import assign

    # an experiment seed that puts every benchmark client in the control arm, so that the winner's first
    # response comes from the promotion, not from the experiment
    control_seed = next(seed for seed in (f"bench-{i}" for i in range(10_000))
                        if all(assign(seed, f"u{k}", [0.999, 0.001]) == 0 for k in range(args.clients)))

    base = prepare_base_model(BUILTIN_SMOLLM2, ROOT / "var")
    tmp = Path(tempfile.mkdtemp(prefix="tuneloop-swap-"))
    key, port = "bench-" + uuid.uuid4().hex, free_port()
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--data-dir", str(tmp), "--base-model", base]
    if args.vllm_url:
        cmd += ["--vllm-url", args.vllm_url]
    env = {**os.environ, "TUNELOOP_ADMIN_KEY": key, "TUNELOOP_START_WORKER": "false",
           "TUNELOOP_VLLM_KV_CACHE_GIB": "2"}
    with (tmp / "serve.log").open("wb") as log:
        svc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    h = {"Authorization": f"Bearer {key}"}
    try:
        deadline = time.monotonic() + 900
        while True:
            try:
                if httpx.get(url + "/ready", timeout=3).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline and svc.poll() is None, "service did not become ready"
            time.sleep(1)
        httpx.post(url + "/v1/deployments", json={"name": "swap"}, headers=h)
        adapters = [register_random_lora(tmp / "tuneloop.db", Path(base), tmp / f"lora{seed}", "swap", seed)
                    for seed in (1, 2)]

        samples: list[tuple[float, float, str]] = []  # (start, latency, adapter header)
        stop = threading.Event()

        def client(k: int) -> None:
            with httpx.Client(base_url=url, headers=h, timeout=120) as c:
                while not stop.is_set():
                    t0 = time.monotonic()
                    r = c.post("/v1/chat/completions", json={"model": "swap", "max_tokens": 4, "user": f"u{k}",
                                                             "messages": [{"role": "user", "content": "Hello"}]})
                    assert r.status_code == 200, r.text
                    samples.append((t0, time.monotonic() - t0, r.headers["x-tuneloop-adapter"]))

        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        with httpx.Client(base_url=url, headers=h, timeout=300) as c:
            # warm up both adapters once, then measure the steady state on the first one
            for a in adapters:
                c.post("/v1/deployments/swap/promote", json={"adapter_id": a})
            time.sleep(5)
            quiet_start = time.monotonic()
            time.sleep(args.seconds)
            quiet_end = time.monotonic()
            to_first: list[float] = []
            promote_calls: list[float] = []  # load + probe + switch, inside the promote request
            for i in range(args.swaps):
                target = adapters[i % 2]
                t0 = time.monotonic()
                r = c.post("/v1/deployments/swap/promote", json={"adapter_id": target})
                assert r.status_code == 200, r.text
                promote_calls.append(time.monotonic() - t0)
                to_first.append(first_response(samples, target, t0))
            swap_end = time.monotonic()
            staged_first: list[float] = []
            staged_calls: list[float] = []  # promote (reusing the loaded variant) + stopping the experiment
            for i in range(args.swaps):
                target = adapters[(args.swaps + i) % 2]
                exp = c.post("/v1/experiments", json={
                    "deployment": "swap", "seed": control_seed, "goal": {"metric": "rating"},
                    "variants": [{"name": "control", "adapter_id": "production", "weight": 0.999},
                                 {"name": "winner", "adapter_id": target, "weight": 0.001}],
                    "policy": {"auto_promote": False, "auto_rollback": False}})
                assert exp.status_code == 201, exp.text
                t0 = time.monotonic()
                r = c.post("/v1/deployments/swap/promote", json={"adapter_id": target})
                assert r.status_code == 200, r.text
                assert c.post(f"/v1/experiments/{exp.json()['id']}/stop").status_code == 200
                staged_calls.append(time.monotonic() - t0)
                staged_first.append(first_response(samples, target, t0))
        stop.set()
        for t in threads:
            t.join()
        quiet = [s[1] for s in samples if quiet_start <= s[0] < quiet_end]
        swapping = [s[1] for s in samples if quiet_end <= s[0] < swap_end]
        print(f"promote → first response from the new adapter: median {statistics.median(to_first):.3f} s, "
              f"max {max(to_first):.3f} s over {len(to_first)} swaps (target ≤ 1 s)")
        print(f"  of which the promote request (load + probe + switch): median {statistics.median(promote_calls):.3f} s")
        print(f"experiment winner (already loaded as a variant) → first response: median "
              f"{statistics.median(staged_first):.3f} s, max {max(staged_first):.3f} s over {len(staged_first)} swaps")
        print(f"  of which promote + stopping the experiment: median {statistics.median(staged_calls):.3f} s")
        print(f"p99 latency without swaps {p(quiet, 99):.3f} s ({len(quiet)} requests), during swaps "
              f"{p(swapping, 99):.3f} s ({len(swapping)} requests): ratio {p(swapping, 99) / p(quiet, 99):.2f}x")
    finally:
        svc.terminate()
        svc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
