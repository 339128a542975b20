"""Completion retention: how long each prune batch holds the database's write lock, and rows deleted per second.

On SQLite the gateway commits every completion under the same write lock the prune takes, so what matters is the
longest single transaction, not the total. Baseline, in the same run on a copy of the same data: one
`DELETE ... WHERE created_at < cutoff AND no feedback` statement, what a retention without batches would run.

    python benchmarks/completion_retention.py [--rows 200000] [--database-url postgresql+asyncpg://...]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import delete, event, exists, insert, text

from service.core.drift import TrafficWindows
from service.core.experiments import ExperimentService
from service.core.retention import CompletionRetention
from service.storage.artifacts import ArtifactStore
from service.storage.db import make_engine, make_sessionmaker
from service.storage.migrate import upgrade
from service.storage.models import Completion, Deployment, Feedback

DAY = 86400.0


def rows(n: int, now: float) -> list[dict[str, Any]]:
    """`n` completions over 60 days (half older than 30), realistic prompt and answer sizes."""
    prompt = [{"role": "user", "content": "I still have not received my new card, what should I do? " * 3}]
    return [{"id": f"chatcmpl-{uuid.uuid4().hex}", "deployment": "app", "adapter": "app--a", "adapter_id": None,
             "experiment_id": None, "variant": None, "user": f"u{i % 1000}", "attributes": {"segment": "retail"},
             "kind": "chat", "prompt": prompt, "prompt_hash": uuid.uuid4().hex, "output": "card_arrival",
             "finish_reason": "stop", "prompt_tokens": 40, "completion_tokens": 3, "latency_seconds": 0.2,
             "stream": False, "error": None, "created_at": now - 60 * DAY + i * (60 * DAY / n)} for i in range(n)]


async def seed(url: str, n: int, now: float) -> None:
    await asyncio.to_thread(upgrade, url)
    engine = make_engine(url)
    async with engine.begin() as conn:
        await conn.execute(insert(Deployment), [{"name": "app", "base_model": "m", "config": {}, "created_at": now}])
        data = rows(n, now)
        for i in range(0, n, 5000):
            await conn.execute(insert(Completion), data[i:i + 5000])
        await conn.execute(insert(Feedback), [{"completion_id": r["id"], "deployment": "app", "rating": 1.0,
                                               "attributes": {}, "created_at": r["created_at"]} for r in data[::10]])
    await engine.dispose()


async def timed_transactions(url: str, run: Any) -> tuple[list[float], float, int]:
    """Run `run(sessions)`; each write transaction's duration, the total time and the rows it deleted."""
    engine = make_engine(url)
    held: list[float] = []
    started: dict[int, float] = {}
    event.listen(engine.sync_engine, "begin", lambda conn: started.__setitem__(id(conn), time.perf_counter()))
    event.listen(engine.sync_engine, "commit",
                 lambda conn: held.append(time.perf_counter() - started.pop(id(conn), time.perf_counter())))
    t0 = time.perf_counter()
    deleted = await run(make_sessionmaker(engine))
    total = time.perf_counter() - t0
    await engine.dispose()
    return held, total, deleted


async def ours(sessions: Any) -> int:
    windows = TrafficWindows(sessions, 500, ArtifactStore(sessions, Path(tempfile.mkdtemp()), store=False))
    retention = CompletionRetention(sessions, windows, ExperimentService(sessions, None, None), 30 * DAY)
    deleted = 0
    while n := await retention.prune("app"):
        deleted += n
    return deleted


async def baseline(sessions: Any) -> int:
    async with sessions() as s, s.begin():
        result = await s.execute(delete(Completion).where(
            Completion.created_at < time.time() - 30 * DAY, ~exists().where(Feedback.completion_id == Completion.id)))
    return result.rowcount


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--database-url", default="", help="PostgreSQL URL (its data is replaced); default SQLite")
    args = parser.parse_args()
    now = time.time()
    results = {}
    work = Path(tempfile.mkdtemp())
    if not args.database_url:
        await seed(f"sqlite+aiosqlite:///{work / 'seed.db'}", args.rows, now)
    for name, run in (("baseline: one DELETE", baseline), ("tuneloop: batches", ours)):
        if args.database_url:
            engine = make_engine(args.database_url)
            async with engine.begin() as conn:
                await conn.execute(text("DROP SCHEMA public CASCADE"))
                await conn.execute(text("CREATE SCHEMA public"))
            await engine.dispose()
            await seed(args.database_url, args.rows, now)
            url = args.database_url
        else:
            shutil.copy(work / "seed.db", work / f"{name[:4]}.db")
            url = f"sqlite+aiosqlite:///{work / f'{name[:4]}.db'}"
        results[name] = await timed_transactions(url, run)
    print(f"{args.rows:,} completions over 60 days, 10 % with feedback; retention 30 days "
          f"({'PostgreSQL' if args.database_url else 'SQLite'})")
    print(f"{'':22} {'deleted':>8} {'total s':>8} {'rows/s':>8} {'longest txn ms':>15} {'median txn ms':>14}")
    for name, (held, total, deleted) in results.items():
        print(f"{name:22} {deleted:8,} {total:8.2f} {deleted / total:8,.0f} {max(held) * 1000:15.1f} "
              f"{statistics.median(held) * 1000:14.1f}")
    (b_held, b_total, _), (o_held, o_total, _) = results.values()
    print(f"longest write transaction: {max(o_held) / max(b_held):.3f}x the baseline's; "
          f"total time {o_total / b_total:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
