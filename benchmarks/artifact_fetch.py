"""What the artifact store costs: storing an adapter's files with its record (the writer, once per adapter) and
fetching them on a machine that does not have them (each other machine, once), against copying the same files on
local disk with the same fsyncs (the floor for getting them anywhere), side by side in one run.

Run: .venv/bin/python benchmarks/artifact_fetch.py [--rank 16] [--repeats 5] [--database-url URL ...]

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--database-url", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="artifact-bench-") as tmp:
        work = Path(tmp)
        adapter = make_adapter(work / "adapter" / "1", args.rank)
        size = sum(f.stat().st_size for f in adapter.rglob("*") if f.is_file()) / 1e6
        print(f"adapter: rank {args.rank}, all-linear, {size:.1f} MB; median of {args.repeats} repeats")
        for url in [f"sqlite+aiosqlite:///{work / 'bench.db'}", *args.database_url]:
            times = asyncio.run(measure(url, adapter, work / url.split(":")[0], args.repeats))
            med = {k: statistics.median(v) for k, v in times.items()}
            print(f"{url.split('+')[0]:>10}: local copy {med['copy'] * 1e3:7.1f} ms | "
                  f"store {med['store'] * 1e3:7.1f} ms ({med['store'] / med['copy']:.1f}x) | "
                  f"fetch {med['fetch'] * 1e3:7.1f} ms ({med['fetch'] / med['copy']:.1f}x, "
                  f"{size / med['fetch']:.0f} MB/s)")


if __name__ == "__main__":
    main()
