"""How long a swap takes to reach a second API process: two `tuneloop serve` processes on one database (the
SQLite file, shared) in front of one vLLM, closed-loop clients on both; a promote (or rollback) is sent to the
first, and the time to the first response served by the new adapter is taken on each.

Run: .venv/bin/python benchmarks/replica_follow.py [--swaps 10] [--clients 2] [--database-url URL]

With --database-url (say an empty PostgreSQL database, `postgresql+asyncpg://postgres@127.0.0.1:5432/bench`)
both processes use it (PostgreSQL: the leader lock is an advisory lock); without it they share an SQLite file.

The first process starts the managed vLLM (a minute or two); the second uses it with --vllm-url. The second
process learns of the swap from the database (on PostgreSQL at once, by LISTEN/NOTIFY; on SQLite within 0.1 s,
from the change counter it reads), then loads and probes the adapter under its own name: the difference between
the two columns is the cost of following.
"""

from __future__ import annotations

import argparse
import os
import re
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

from benchmarks.hot_swap import closed_loop_client, first_response
from tests.conftest import free_port
from tests.conftest_vllm import register_random_lora_at


def serve(data_dir: Path, base: str, key: str, extra: list[str]) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    data_dir.mkdir(parents=True)
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--data-dir", str(data_dir),
           "--base-model", base, *extra]
    env = {**os.environ, "TUNELOOP_ADMIN_KEY": key, "TUNELOOP_START_WORKER": "false",
           "TUNELOOP_VLLM_KV_CACHE_GIB": "2"}
    with (data_dir / "serve.log").open("wb") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while True:
        try:
            if httpx.get(url + "/ready", timeout=3).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline and proc.poll() is None, f"{data_dir} did not become ready"
        time.sleep(1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--swaps", type=int, default=10)
    ap.add_argument("--clients", type=int, default=2, help="closed-loop clients on each process")
    ap.add_argument("--database-url", default=None, help="shared by both processes (default: an SQLite file)")
    args = ap.parse_args()

    from adapters.base_model import BUILTIN_SMOLLM2, prepare_base_model

    base = prepare_base_model(BUILTIN_SMOLLM2, ROOT / "var")
    tmp = Path(tempfile.mkdtemp(prefix="tuneloop-replicas-"))
    key = "bench-" + uuid.uuid4().hex
    h = {"Authorization": f"Bearer {key}"}
    database = args.database_url or f"sqlite+aiosqlite:///{tmp / 'a' / 'tuneloop.db'}"
    procs = []
    try:
        first, url_a = serve(tmp / "a", base, key, ["--database-url", database])
        procs.append(first)
        vllm_url = re.search(r"vLLM ready at (\S+)", (tmp / "a" / "serve.log").read_text()).group(1)
        second, url_b = serve(tmp / "b", base, key, ["--vllm-url", vllm_url, "--database-url", database])
        procs.append(second)
        assert httpx.post(url_a + "/v1/deployments", json={"name": "swap"}, headers=h).status_code == 201
        home, *fresh = [register_random_lora_at(database, Path(base), tmp / f"lora{i}", "swap", i)
                         for i in range(args.swaps + 1)]
        while httpx.post(url_b + "/v1/chat/completions", headers=h, json={
                "model": "swap", "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}).status_code != 200:
            time.sleep(0.2)  # the second process has followed the new deployment

        samples: dict[str, list[tuple[float, float, str]]] = {url_a: [], url_b: []}
        stop = threading.Event()
        threads = [threading.Thread(target=closed_loop_client, args=(u, h, f"u{k}", samples[u], stop))
                   for u in (url_a, url_b) for k in range(args.clients)]
        for t in threads:
            t.start()
        timed: dict[str, list[tuple[float, float]]] = {"promote": [], "rollback": []}
        with httpx.Client(base_url=url_a, headers=h, timeout=300) as c:
            assert c.post("/v1/deployments/swap/promote", json={"adapter_id": home}).status_code == 200
            time.sleep(5)
            for target in fresh:  # each: a promote of a new adapter, then a rollback to `home`
                for kind, adapter in (("promote", target), ("rollback", home)):
                    t0 = time.monotonic()
                    r = c.post("/v1/deployments/swap/rollback") if kind == "rollback" else \
                        c.post("/v1/deployments/swap/promote", json={"adapter_id": adapter})
                    assert r.status_code == 200 and r.json()["adapter_id"] == adapter, r.text
                    timed[kind].append((first_response(samples[url_a], adapter, t0),
                                        first_response(samples[url_b], adapter, t0)))
                    time.sleep(1)
        stop.set()
        for t in threads:
            t.join()
        print(f"seconds from a swap sent to the first process to the first response served by the new adapter, "
              f"median [max] over {args.swaps} swaps, {args.clients} closed-loop clients on each process:")
        print(f"{'':34} {'first process':>16} {'second process':>16} {'difference':>12}")
        for kind, label in (("promote", "promote of an adapter not loaded"), ("rollback", "rollback to the standby")):
            a, b = zip(*timed[kind], strict=True)
            diff = [y - x for x, y in timed[kind]]
            print(f"  {label:32} {statistics.median(a):>7.3f} [{max(a):.3f}] {statistics.median(b):>7.3f} "
                  f"[{max(b):.3f}] {statistics.median(diff):>7.3f} [{max(diff):.3f}]")
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
