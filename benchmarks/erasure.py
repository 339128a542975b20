"""Erasing one user's data: what the `completions (user, deployment)` index costs every logged request, and what it
saves the erasure.

One database holds a log of `--rows` completions (1,000 users). In rounds, alternating which goes first, the index
is there (tuneloop) or dropped (the baseline):
- insert: completions written one at a time through the gateway's own path (`CompletionLog.write`; on SQLite the
  inline commit), the time per row;
- erasure: one user's completions (rows / 1,000 of them) erased by `erase_user`, the total time and the longest
  batch (on SQLite the write lock the gateway's commits wait for).

    python benchmarks/erasure.py [--rows 200000] [--database-url postgresql+asyncpg://...]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from completion_retention import rows, seed
from sqlalchemy import text

from service.core.completion_log import CompletionLog
from service.core.erasure import Erased, erase_user
from service.storage.db import make_engine, make_readonly_sessionmaker, make_sessionmaker, make_sqlite_writer

VARIANTS = ("tuneloop: with the index", "baseline: without")


async def set_index(sessions: object, present: bool) -> None:
    async with sessions() as s, s.begin():  # type: ignore[operator]
        await s.execute(text('CREATE INDEX IF NOT EXISTS ix_completions_user ON completions ("user", deployment)'
                             if present else "DROP INDEX IF EXISTS ix_completions_user"))
        await s.execute(text("ANALYZE completions"))


async def insert_times(log: CompletionLog, n: int, now: float) -> list[float]:
    times = []
    for row in rows(n, now):
        row["id"], row["user"], row["created_at"] = f"chatcmpl-{uuid.uuid4().hex}", f"u{uuid.uuid4().int % 1000}", now
        t0 = time.perf_counter()
        await log.write(row)
        times.append(time.perf_counter() - t0)
    return times


async def erase_times(sessions: object, user: str) -> tuple[float, float, int]:
    """Total seconds, longest batch in seconds, completions erased."""
    marks = [time.perf_counter()]

    async def progress(erased: Erased) -> bool:
        marks.append(time.perf_counter())
        return True

    erased = await erase_user(sessions, "app", user, progress=progress)  # type: ignore[arg-type]
    marks.append(time.perf_counter())
    return marks[-1] - marks[0], max(b - a for a, b in itertools.pairwise(marks)), erased.completions


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--inserts", type=int, default=400, help="rows written per variant and round")
    parser.add_argument("--database-url", default="", help="PostgreSQL URL (its data is replaced); default SQLite")
    args = parser.parse_args()
    url = args.database_url or f"sqlite+aiosqlite:///{Path(tempfile.mkdtemp()) / 'erasure.db'}"
    now = time.time()
    if args.database_url:
        engine = make_engine(url)
        async with engine.begin() as conn:
            await conn.execute(text("DROP SCHEMA public CASCADE"))
            await conn.execute(text("CREATE SCHEMA public"))
        await engine.dispose()
    await seed(url, args.rows, now)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    log = CompletionLog(sessions, make_readonly_sessionmaker(engine), sqlite_writer=make_sqlite_writer(url))
    log.start()
    inserts: dict[str, list[float]] = {v: [] for v in VARIANTS}
    erasures: dict[str, list[tuple[float, float, int]]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for variant in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):  # neither always goes first
            i = VARIANTS.index(variant)
            await set_index(sessions, present=i == 0)
            inserts[variant] += await insert_times(log, args.inserts, now)
            erasures[variant].append(await erase_times(sessions, f"u{2 * r + i}"))
    await log.stop()
    await engine.dispose()
    print(f"{args.rows:,} completions of 1,000 users ({'PostgreSQL' if args.database_url else 'SQLite'}); "
          f"{args.rounds} alternating rounds")
    print(f"{'':26} {'insert median ms':>16} {'p99 ms':>7} {'erase total ms':>15} {'longest batch ms':>17} {'rows':>5}")
    for variant in VARIANTS:
        ins, era = sorted(inserts[variant]), erasures[variant]
        print(f"{variant:26} {statistics.median(ins) * 1000:16.3f} {ins[int(len(ins) * 0.99)] * 1000:7.3f} "
              f"{statistics.median(e[0] for e in era) * 1000:15.1f} {statistics.median(e[1] for e in era) * 1000:17.1f} "
              f"{era[0][2]:5}")
    (ours, base) = (statistics.median(inserts[v]) for v in VARIANTS)
    print(f"insert with the index: {ours / base:.3f}x the baseline; erasure: "
          f"{statistics.median(e[0] for e in erasures[VARIANTS[0]]) / statistics.median(e[0] for e in erasures[VARIANTS[1]]):.4f}x")


if __name__ == "__main__":
    asyncio.run(main())
