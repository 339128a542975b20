"""Hot-swap cost: time from `promote` to the first response served by the new adapter, and p99 latency of
live traffic during swaps vs without swaps, measured in one run against a real service and vLLM.

Run: .venv/bin/python benchmarks/hot_swap.py [--swaps 20] [--clients 4] [--vllm-url URL]

Without --vllm-url it starts `tuneloop serve` with its managed vLLM (a minute or two). Two random LoRA
adapters (rank 8) are put into the registry directly (the benchmark measures swapping, not training).

Four kinds of swap are timed: a `promote` of an adapter not loaded before (load + probe + switch inside the
request); a `rollback` right after it, to the previous production the service kept loaded on standby; a
`promote` of a new adapter that passed its evaluation, which the service stages (loads and probes) ahead of
time; and the way an experiment promotes its winner, already loaded and probed as a (here 0.1 %) variant. Each
is timed three ways: the promote (or rollback) call; the call plus one request sent as soon as it returned; and
the first response from the new adapter to any of the closed-loop load clients, which also waits for a client
to finish the request it had in flight.
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
from tests.conftest_vllm import record_passed_evaluation, register_random_lora


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 2 else max(values)


def first_response(samples: list[tuple[float, float, str]], adapter_id: str, t0: float) -> float:
    """Seconds from t0 to the end of the first request that started at or after t0 and was served by the adapter."""
    while True:
        hits = [s for s in list(samples) if s[0] >= t0 and s[2].startswith(f"swap--{adapter_id}")]
        if hits:
            return min(s[0] + s[1] for s in hits) - t0
        time.sleep(0.01)


def closed_loop_client(url: str, headers: dict[str, str], user: str, samples: list[tuple[float, float, str]],
                       stop: threading.Event) -> None:
    """4-token chat requests to deployment `swap`, back to back until `stop`: (start, latency, adapter header)."""
    with httpx.Client(base_url=url, headers=headers, timeout=120) as c:
        while not stop.is_set():
            t0 = time.monotonic()
            r = c.post("/v1/chat/completions", json={"model": "swap", "max_tokens": 4, "user": user,
                                                     "messages": [{"role": "user", "content": "Hello"}]})
            assert r.status_code == 200, r.text
            samples.append((t0, time.monotonic() - t0, r.headers["x-tuneloop-adapter"]))


def swap_phases(url: str) -> dict[str, list[float]]:
    """[total seconds, count] per swap phase (load, probe, commit) from the service's own histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        if family.name == "tuneloop_swap_phase_seconds":
            for sample in family.samples:
                if sample.name.endswith(("_sum", "_count")):
                    sums.setdefault(sample.labels["phase"], [0.0, 0.0])[sample.name.endswith("_count")] += sample.value
    return sums


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
           "TUNELOOP_VLLM_KV_CACHE_GIB": "2", "TUNELOOP_EXPERIMENT_INTERVAL_SECONDS": "1"}
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
        # one never-loaded adapter per cold swap, made now: making one takes CPU from the timed window
        fresh = [register_random_lora(tmp / "tuneloop.db", Path(base), tmp / f"lora{10 + i}", "swap", 10 + i)
                 for i in range(args.swaps)]

        samples: list[tuple[float, float, str]] = []  # (start, latency, adapter header)
        stop = threading.Event()
        threads = [threading.Thread(target=closed_loop_client, args=(url, h, f"u{k}", samples, stop))
                   for k in range(args.clients)]
        for t in threads:
            t.start()
        with httpx.Client(base_url=url, headers=h, timeout=300) as c:
            # warm up both adapters once, then measure the steady state on the first one
            for a in adapters:
                c.post("/v1/deployments/swap/promote", json={"adapter_id": a})
            time.sleep(5)
            quiet_start = time.monotonic()
            extra: list[float] = []  # the same extra request as after each promote, without a swap
            while time.monotonic() < quiet_start + args.seconds:
                t0 = time.monotonic()
                r = c.post("/v1/chat/completions", json={"model": "swap", "max_tokens": 4,
                                                         "messages": [{"role": "user", "content": "Hello"}]})
                assert r.status_code == 200, r.text
                extra.append(time.monotonic() - t0)
                time.sleep(0.5)
            quiet_end = time.monotonic()
            timed: dict[str, list[tuple[float, float, float]]] = {"cold": [], "rollback": [], "staged": [],
                                                                  "winner": []}

            def swap(kind: str, target: str, experiment: str | None = None) -> None:
                """Promote or roll back (and stop the experiment): the call, + a request sent when it returned, and
                the first response from a load client."""
                t0 = time.monotonic()
                if kind == "rollback":
                    r = c.post("/v1/deployments/swap/rollback")
                else:
                    r = c.post("/v1/deployments/swap/promote", json={"adapter_id": target})
                assert r.status_code == 200 and r.json()["adapter_id"] == target, r.text
                if experiment:
                    assert c.post(f"/v1/experiments/{experiment}/stop").status_code == 200
                call = time.monotonic() - t0
                r = c.post("/v1/chat/completions", json={"model": "swap", "max_tokens": 4,
                                                         "messages": [{"role": "user", "content": "Hello"}]})
                assert r.status_code == 200 and r.headers["x-tuneloop-adapter"].startswith(f"swap--{target}"), r.text
                timed[kind].append((call, time.monotonic() - t0, first_response(samples, target, t0)))

            phases_before = swap_phases(url)
            for target in fresh:  # adapters not loaded before: load + probe + switch inside the promote
                previous = c.get("/v1/deployments/swap").json()["production_adapter_id"]
                swap("cold", target)
                swap("rollback", previous)  # back to the previous production, kept loaded on standby
            phases = {k: (v[0] - phases_before.get(k, [0, 0])[0]) / (v[1] - phases_before.get(k, [0, 0])[1])
                      for k, v in swap_phases(url).items()}
            swap_end = time.monotonic()
            for i in range(args.swaps):  # a new adapter that passed its evaluation, staged by the service
                target = register_random_lora(tmp / "tuneloop.db", Path(base), tmp / f"lora{100 + i}", "swap", 100 + i)
                record_passed_evaluation(tmp / "tuneloop.db", target, "swap")
                while not (c.get("/v1/deployments/swap").json()["staged"] or "").startswith(f"swap--{target}"):
                    time.sleep(0.2)
                swap("staged", target)
            for i in range(args.swaps):  # an experiment's winner, loaded and probed as a variant
                target = adapters[(args.swaps + i) % 2]
                exp = c.post("/v1/experiments", json={
                    "deployment": "swap", "seed": control_seed, "goal": {"metric": "rating"},
                    "variants": [{"name": "control", "adapter_id": "production", "weight": 0.999},
                                 {"name": "winner", "adapter_id": target, "weight": 0.001}],
                    "policy": {"auto_promote": False, "auto_rollback": False}})
                assert exp.status_code == 201, exp.text
                swap("winner", target, exp.json()["id"])
        stop.set()
        for t in threads:
            t.join()
        quiet = [s[1] for s in samples if quiet_start <= s[0] < quiet_end]
        swapping = [s[1] for s in samples if quiet_end <= s[0] < swap_end]
        print("time from promote to the first response served by the new adapter (target ≤ 1 s), median [max] over "
              f"{args.swaps} swaps each:")
        print(f"{'':52} {'promote call':>14} {'+ next request':>16} {'first from load':>16}")
        for kind, label in (("cold", "not loaded before (load + probe + switch)"),
                            ("rollback", "rollback to the previous production (standby)"),
                            ("staged", "passed its evaluation, staged by the service"),
                            ("winner", "experiment winner (promote + stop)")):
            cols = [f"{statistics.median(col):.3f} [{max(col):.3f}]" for col in zip(*timed[kind], strict=True)]
            print(f"  {label:50} {cols[0]:>14} {cols[1]:>16} {cols[2]:>16}")
        print("mean phase of a cold swap or rollback inside the server: " + ", ".join(f"{k} {v:.3f} s" for k, v in phases.items()))
        print(f"without swaps: a load client's request median {statistics.median(quiet):.3f} s; the extra request "
              f"(as after each promote) median {statistics.median(extra):.3f} s, max {max(extra):.3f} s: the floor")
        print(f"p99 latency without swaps {p(quiet, 99):.3f} s ({len(quiet)} requests), during swaps "
              f"{p(swapping, 99):.3f} s ({len(swapping)} requests): ratio {p(swapping, 99) / p(quiet, 99):.2f}x")
    finally:
        svc.terminate()
        svc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
