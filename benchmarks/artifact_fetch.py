"""What the artifact store costs: storing an adapter's files with its record (the writer, once per adapter) and
fetching them on a machine that does not have them (each other machine, once), against copying the same files on
local disk with the same fsyncs (the floor for getting them anywhere), side by side in one run.

Run: .venv/bin/python benchmarks/artifact_fetch.py [--rank 16] [--repeats 5] [--database-url URL ...]
     .venv/bin/python benchmarks/artifact_fetch.py --through-service URL [--rank 16] [--repeats 5]

`--through-service` measures it end to end instead: one `tuneloop serve` (managed vLLM) on that database, and
promotes of adapters whose files are on its disk against adapters whose files are only in the database (the
first promote on a machine that did not train them), alternating; the time of each promote call (load, probe,
commit, and for the second kind the fetch).

The adapter is a real PEFT directory of the bundled SmolLM2's shape (all linear layers, fp32, as training saves it:
19.5 MB at rank 16). Without --database-url the store is an SQLite file in a temporary directory; give
`postgresql+asyncpg://postgres@127.0.0.1:5432/bench` (an empty database: `createdb -h 127.0.0.1 -U postgres bench`)
to measure PostgreSQL too. Each repeat stores under a new id and fetches into a new directory.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.storage.artifacts import ArtifactStore, _sync_tree
from service.storage.db import make_engine, make_sessionmaker
from service.storage.migrate import upgrade
from service.storage.models import ArtifactChunk


def make_adapter(out: Path, rank: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from adapters.base_model import SMOLLM2_DIRNAME

    model = AutoModelForCausalLM.from_pretrained(ROOT / "var" / "models" / SMOLLM2_DIRNAME, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear",
                                            task_type="CAUSAL_LM"))
    peft.save_pretrained(str(out))
    return out


def copy(src: Path, dest: Path) -> None:
    shutil.copytree(src, dest)
    for f in dest.rglob("*"):
        if f.is_file():
            with f.open("rb+") as fh:
                os.fsync(fh.fileno())
    _sync_tree(dest)


async def measure(url: str, adapter: Path, work: Path, repeats: int) -> dict[str, list[float]]:
    await asyncio.to_thread(upgrade, url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    times: dict[str, list[float]] = {"copy": [], "store": [], "fetch": []}
    try:
        for i in range(repeats):
            t = time.perf_counter()
            await asyncio.to_thread(copy, adapter, work / f"copy-{i}")
            times["copy"].append(time.perf_counter() - t)

            artifact_id = "adp-bench-" + uuid.uuid4().hex[:8]
            writer = ArtifactStore(sessions, work / "writer", store=True)
            t = time.perf_counter()
            async with sessions() as s, s.begin():
                await writer.add(s, artifact_id, adapter)
            times["store"].append(time.perf_counter() - t)

            reader = ArtifactStore(sessions, work / f"reader-{i}", store=False)
            t = time.perf_counter()
            fetched = await reader.local(artifact_id, str(work / "elsewhere" / adapter.name))
            times["fetch"].append(time.perf_counter() - t)
            assert Path(fetched, "adapter_model.safetensors").stat().st_size == \
                (adapter / "adapter_model.safetensors").stat().st_size
            async with sessions() as s, s.begin():
                await s.execute(ArtifactChunk.__table__.delete().where(ArtifactChunk.artifact_id == artifact_id))
    finally:
        await engine.dispose()
    return times


def register(url: str, adapter: Path, work: Path, keep_files: bool) -> str:
    """An adapter of deployment `swap`, stored in the database; its files left on disk or deleted."""
    from sqlalchemy import func, select

    from service.storage.models import Adapter

    adapter_id = "adp-" + uuid.uuid4().hex[:16]
    path = work / "registered" / adapter_id
    shutil.copytree(adapter, path)

    async def insert() -> None:
        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        try:
            async with sessions() as s, s.begin():
                version = (await s.execute(select(func.coalesce(func.max(Adapter.version), 0))
                                           .where(Adapter.deployment == "swap"))).scalar_one() + 1
                s.add(Adapter(id=adapter_id, deployment="swap", version=version, path=str(path), base_model="b",
                              base_model_hash="0" * 64))
                await ArtifactStore(sessions, work, store=True).add(s, adapter_id, path)
        finally:
            await engine.dispose()

    asyncio.run(insert())
    if not keep_files:
        shutil.rmtree(path)
    return adapter_id


def through_service(url: str, adapter: Path, work: Path, repeats: int) -> None:
    import httpx

    from benchmarks.replica_follow import serve

    key = "bench-" + uuid.uuid4().hex
    proc, base_url = serve(work / "service", str(ROOT / "var" / "models" / "SmolLM2-135M-Instruct"), key,
                           ["--database-url", url])
    times: dict[bool, list[float]] = {True: [], False: []}
    try:
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"}, timeout=300) as c:
            assert c.post("/v1/deployments", json={"name": "swap"}).status_code in (201, 409)
            for i in range(repeats):
                for local in (True, False) if i % 2 == 0 else (False, True):
                    adapter_id = register(url, adapter, work, keep_files=local)
                    t = time.perf_counter()
                    r = c.post("/v1/deployments/swap/promote", json={"adapter_id": adapter_id, "force": True})
                    times[local].append(time.perf_counter() - t)
                    assert r.status_code == 200, r.text
    finally:
        proc.terminate()
        proc.wait(60)
    on_disk, fetched = statistics.median(times[True]), statistics.median(times[False])
    print(f"promote, files on disk: {on_disk * 1e3:.0f} ms | files only in the database: {fetched * 1e3:.0f} ms "
          f"(+{(fetched - on_disk) * 1e3:.0f} ms, {fetched / on_disk:.2f}x); max {max(times[False]) * 1e3:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--database-url", action="append", default=[])
    parser.add_argument("--through-service", metavar="URL", help="measure promotes through a real service instead")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="artifact-bench-") as tmp:
        work = Path(tmp)
        adapter = make_adapter(work / "adapter" / "1", args.rank)
        size = sum(f.stat().st_size for f in adapter.rglob("*") if f.is_file()) / 1e6
        print(f"adapter: rank {args.rank}, all-linear, {size:.1f} MB; median of {args.repeats} repeats")
        if args.through_service:
            asyncio.run(asyncio.to_thread(upgrade, args.through_service))
            through_service(args.through_service, adapter, work, args.repeats)
            return
        for url in [f"sqlite+aiosqlite:///{work / 'bench.db'}", *args.database_url]:
            times = asyncio.run(measure(url, adapter, work / url.split(":")[0], args.repeats))
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"{url.split('+')[0]:>10}: local copy {med['copy'] * 1e3:7.1f} ms | "
                  f"store {med['store'] * 1e3:7.1f} ms ({med['store'] / med['copy']:.1f}x) | "
                  f"fetch {med['fetch'] * 1e3:7.1f} ms ({med['fetch'] / med['copy']:.1f}x, "
                  f"{size / med['fetch']:.0f} MB/s)")


if __name__ == "__main__":
    main()
