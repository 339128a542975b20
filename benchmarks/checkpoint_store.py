"""What storing every checkpoint in the database costs a training job (so that another machine can resume it).

The same fine-tuning job is run by the worker's own code (`run_fine_tune_job`: the trainer subprocess, its events,
the checkpoints, the adapter's registration) with the artifact store on (`database`: each checkpoint stored as it
is written, replacing the previous) and off (`files`, the baseline), alternating, on one database; printed: each
job's wall time, the ratio of the medians, and how long each checkpoint took to store and how big it was. The
store runs in the worker's event loop while the trainer goes on, so what it costs the job is the CPU and I/O it
takes from training on the same machine.

Run: .venv/bin/python benchmarks/checkpoint_store.py [--database-url postgresql+asyncpg://postgres@127.0.0.1:5432/bench]
     [--steps 60] [--rank 16] [--repeats 2]
(an empty database: `createdb -h 127.0.0.1 -U postgres bench`). The job checkpoints 10 times, as every job without
`checkpoint_every_steps` does; rows are Banking77 training queries, LoRA on all linear layers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from training_throughput import DEFAULT_DATA, DEFAULT_MODEL, banking_rows

from service.core import checkpoints
from service.core.job_runner import run_fine_tune_job
from service.settings import Settings
from service.storage.db import make_engine, make_sessionmaker
from service.storage.migrate import upgrade
from service.storage.models import Deployment, Job, Snapshot
from service.worker import WorkerContext

STORES: list[tuple[float, int]] = []  # (seconds, bytes) of each checkpoint stored


def timed_store(original):  # type: ignore[no-untyped-def]
    async def store(ctx, job, output_dir, event):  # type: ignore[no-untyped-def]
        started = time.perf_counter()
        await original(ctx, job, output_dir, event)
        size = sum(f.stat().st_size for f in Path(event["path"]).rglob("*") if f.is_file()) \
            if Path(event["path"]).exists() else 0
        STORES.append((time.perf_counter() - started, size))
    return store


async def main(args: argparse.Namespace) -> None:
    await asyncio.to_thread(upgrade, args.database_url)
    engine = make_engine(args.database_url)
    sessions = make_sessionmaker(engine)
    work = Path(tempfile.mkdtemp(prefix="ckpt-bench-"))
    train, val = banking_rows(DEFAULT_DATA, args.steps * 8, 48, seed=0)
    snap_dir = work / "snapshot"
    snap_dir.mkdir()
    for name, rows in (("train.jsonl", train), ("validation.jsonl", val)):
        (snap_dir / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    dep = f"ckpt-bench-{int(time.time())}"
    async with sessions() as s, s.begin():
        s.add(Deployment(name=dep, base_model=str(DEFAULT_MODEL)))
        s.add(Snapshot(id=f"snap-{dep}", deployment=dep, path=str(snap_dir), counts={"train": len(train)}))
    hp = {"n_epochs": 1, "max_steps": args.steps, "batch_size": 8, "learning_rate": 1e-3, "lora_r": args.rank,
          "lora_alpha": 2 * args.rank, "target_modules": "all-linear", "max_seq_len": 64, "warmup_ratio": 0.0,
          "replay_fraction": 0.0}
    checkpoints.store = timed_store(checkpoints.store)
    times: dict[str, list[float]] = {"database": [], "files": []}
    for r in range(args.repeats):
        for store in ("database", "files") if r % 2 == 0 else ("files", "database"):
            settings = Settings(data_dir=work / f"data-{store}-{r}", database_url=args.database_url,
                                base_model=str(DEFAULT_MODEL), artifact_store=store)
            ctx = WorkerContext(settings, sessions, "bench")
            job = Job(id=f"ftjob-bench-{store}-{r}-{int(time.time())}", kind="fine_tune", deployment=dep,
                      status="running", spec={"method": "sft"}, hyperparameters=hp, snapshot_id=f"snap-{dep}",
                      worker_id="bench", attempts=1)
            async with sessions() as s, s.begin():
                s.add(job)
            before = len(STORES)
            started = time.perf_counter()
            await run_fine_tune_job(ctx, job)
            elapsed = time.perf_counter() - started
            async with sessions() as s:
                status = (await s.get(Job, job.id)).status  # type: ignore[union-attr]
            assert status == "succeeded", f"{job.id} {status}: see {settings.data_dir}/jobs"
            times[store].append(elapsed)
            print(f"repeat {r}: store={store:8s} {elapsed:7.1f} s  checkpoints stored: {len(STORES) - before}",
                  flush=True)
    await engine.dispose()
    on, off = statistics.median(times["database"]), statistics.median(times["files"])
    print(f"\nmedian job wall time: store on {on:.1f} s, off {off:.1f} s: ratio {on / off:.3f}")
    if STORES:
        secs = sorted(s for s, _ in STORES)
        print(f"per checkpoint stored: median {statistics.median(secs):.2f} s, max {secs[-1]:.2f} s, "
              f"{statistics.median(b for _, b in STORES) / 1e6:.1f} MB; {len(STORES)} stores")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database-url", default="postgresql+asyncpg://postgres@127.0.0.1:5432/bench")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    asyncio.run(main(p.parse_args()))
