"""Durable feedback ingestion vs a Litestar hello-world, and memory while uploading a large NDJSON file.

Run: .venv/bin/python benchmarks/ingest.py [--seconds 10] [--clients 16] [--upload-mb 200] [--postgres]

1. Throughput: `POST /v1/feedback` (validated, committed to SQLite — or PostgreSQL with --postgres — before
   the 201) against a Litestar hello-world JSON endpoint, same client, same concurrency, alternating rounds in
   one run. Prints posts/s of both and the ratio (target ≥ 0.5×).
2. Memory: peak RSS of the service process while streaming an NDJSON upload of `--upload-mb` MB, compared with
   a tenth of that size (target: flat, not proportional to the file).

The service runs without a vLLM (`--vllm-url` pointing at a closed port): completions are inserted into the
database beforehand, so only the ingestion path is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
HELLO = '''
from litestar import Litestar, post
@post("/hello", status_code=201)
async def hello(data: dict) -> dict:
    return {"ok": True, "n": len(data)}
app = Litestar([hello])
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise TimeoutError(url)


def fresh_postgres(name: str = "tuneloop_bench") -> str:
    """An empty database `name` on the local PostgreSQL (trust auth); returns its SQLAlchemy URL."""
    import asyncpg

    async def create() -> None:
        conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres")
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            await conn.execute(f"CREATE DATABASE {name}")
        finally:
            await conn.close()

    asyncio.run(create())
    return f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"


def seed_completions(db_url: str, n: int) -> list[str]:
    from sqlalchemy import insert

    from service.storage.db import make_engine
    from service.storage.migrate import upgrade
    from service.storage.models import Completion

    upgrade(db_url)
    ids = [f"chatcmpl-bench-{i}" for i in range(n)]

    async def insert_all() -> None:
        engine = make_engine(db_url)
        async with engine.begin() as conn:
            await conn.execute(insert(Completion), [{
                "id": i, "deployment": "default", "adapter": "base", "kind": "chat", "attributes": {"segment": "a"},
                "prompt": [{"role": "user", "content": "hi"}], "prompt_hash": "x", "output": "hello",
                "created_at": time.time()} for i in ids])
        await engine.dispose()

    asyncio.run(insert_all())
    return ids


async def load(url: str, make_body, headers: dict[str, str], clients: int, seconds: float) -> float:
    done = 0
    stop = time.monotonic() + seconds
    async with httpx.AsyncClient(headers=headers, timeout=30,
                                 limits=httpx.Limits(max_connections=clients)) as c:
        async def one(k: int) -> None:
            nonlocal done
            n = 0
            while time.monotonic() < stop:
                r = await c.post(url, json=make_body(k, n))
                assert r.status_code == 201, r.text
                n += 1
                done += 1
        await asyncio.gather(*(one(k) for k in range(clients)))
    return done / seconds


def upload_peak_rss(svc_url: str, key: str, pid: int, megabytes: int) -> tuple[float, float, float, int]:
    """Stream `megabytes` of NDJSON; return RSS before and peak RSS during (MB) of the service, seconds, rows."""
    h = {"Authorization": f"Bearer {key}"}
    ds = httpx.post(f"{svc_url}/v1/datasets", json={"name": f"big-{megabytes}", "deployment": "default"}, headers=h).json()
    proc = psutil.Process(pid)
    before = proc.memory_info().rss / 2**20
    peak = before
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, proc.memory_info().rss / 2**20)
            time.sleep(0.05)

    def body():
        sent, i = 0, 0
        while sent < megabytes * 2**20:
            lines = []
            for _ in range(500):
                row = {"messages": [{"role": "user", "content": f"question number {i} about my card " * 3},
                                    {"role": "assistant", "content": f"intent_{i % 77}"}]}
                lines.append(json.dumps(row))
                i += 1
            chunk = ("\n".join(lines) + "\n").encode()
            sent += len(chunk)
            yield chunk

    t = threading.Thread(target=sample)
    t.start()
    t0 = time.monotonic()
    r = httpx.post(f"{svc_url}/v1/datasets/{ds['id']}/records", content=body(), timeout=3600,
                   headers={**h, "content-type": "application/x-ndjson"})
    stop.set()
    t.join()
    assert r.status_code == 201, r.text[:500]
    return before, peak, time.monotonic() - t0, r.json()["accepted"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--upload-mb", type=int, default=200)
    ap.add_argument("--postgres", action="store_true",
                    help="use a fresh database tuneloop_bench on the local PostgreSQL instead of SQLite")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="tuneloop-bench-"))
    db_url = fresh_postgres() if args.postgres else f"sqlite+aiosqlite:///{tmp / 'tuneloop.db'}"
    ids = seed_completions(db_url, 1000)
    key = "bench-admin-key"
    port, hport = free_port(), free_port()
    env = {**os.environ, "TUNELOOP_ADMIN_KEY": key, "TUNELOOP_START_WORKER": "false", "TUNELOOP_START_MONITOR": "false"}
    from adapters.base_model import BUILTIN_SMOLLM2, prepare_base_model

    base_model = prepare_base_model(BUILTIN_SMOLLM2, ROOT / "var")  # converted once, shared with `make run`
    svc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--data-dir", str(tmp),
                            "--base-model", str(base_model),
                            "--database-url", db_url, "--vllm-url", f"http://127.0.0.1:{free_port()}"],
                           cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (tmp / "hello.py").write_text(HELLO)
    hello = subprocess.Popen([sys.executable, "-m", "uvicorn", "hello:app", "--port", str(hport), "--log-level",
                              "warning"], cwd=tmp, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/health")
        wait_http(f"http://127.0.0.1:{hport}/hello")
        fb_url = f"http://127.0.0.1:{port}/v1/feedback"
        auth = {"Authorization": f"Bearer {key}"}
        ours, base = [], []
        for rnd in range(args.rounds):  # interleaved rounds: both see the same machine state
            base.append(asyncio.run(load(f"http://127.0.0.1:{hport}/hello",
                                         lambda k, n: {"completion_id": ids[n % 1000], "rating": 0.5}, {},
                                         args.clients, args.seconds)))
            ours.append(asyncio.run(load(fb_url, lambda k, n, r=rnd: {"completion_id": ids[n % 1000], "rating": 0.5,
                                                                      "id": f"r{r}-c{k}-{n}"},
                                         auth, args.clients, args.seconds)))
        o, b = sorted(ours)[len(ours) // 2], sorted(base)[len(base) // 2]
        print(f"feedback ingestion: {o:.0f} posts/s (durable, {args.clients} clients); "
              f"litestar hello-world: {b:.0f} posts/s; ratio {o / b:.2f}x (target >= 0.5x)")
        small = max(1, args.upload_mb // 10)
        b0, p0, s0, n0 = upload_peak_rss(f"http://127.0.0.1:{port}", key, svc.pid, small)
        b1, p1, s1, n1 = upload_peak_rss(f"http://127.0.0.1:{port}", key, svc.pid, args.upload_mb)
        print(f"upload {small} MB ({n0} rows, {n0 / s0:.0f} rows/s): service RSS {b0:.0f} MB -> peak {p0:.0f} MB "
              f"(+{p0 - b0:.0f})")
        print(f"upload {args.upload_mb} MB ({n1} rows, {n1 / s1:.0f} rows/s): service RSS {b1:.0f} MB -> peak "
              f"{p1:.0f} MB (+{p1 - b1:.0f}); growth ratio {(p1 - b1) / max(p0 - b0, 1):.1f}x for "
              f"{args.upload_mb / small:.0f}x the data")
    finally:
        for p in (svc, hello):
            p.terminate()
            p.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
