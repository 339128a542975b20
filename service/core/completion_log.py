"""Durable completion log: every gateway response waits until its row is committed (group commit).

On SQLite this write sits on every response's critical path, so it avoids thread hops: the row is first
committed right on the event loop with a connection that never waits for the lock (busy timeout 0; a WAL
commit is a fraction of a millisecond); only if another writer holds the lock does it go to the group
commit on a dedicated thread, which waits. aiosqlite's per-statement hops, then the hops to the writer
thread, were most of the gateway's added latency (benchmarks/README.md, gateway_overhead.py). The loop's
commit goes straight to the sqlite3 connection with the INSERT SQLAlchemy compiled once from the table and
each column type's own bind processor (JSON, Boolean), so the table stays the one definition of the row:
SQLAlchemy's per-statement machinery was a third of that commit's time (0.185 → 0.123 ms).

It also remembers the last `cache_size` committed completions' routing facts (`CompletionRef`), so that
feedback on a fresh completion — the common case — is checked without a database read. Completions are
never updated; one deleted (an erasure) while still remembered fails the feedback's foreign key, and `gone`
then drops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections import OrderedDict
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.core.group_commit import GroupCommit
from service.storage.models import Completion


@dataclass(frozen=True, slots=True)
class CompletionRef:
    """What feedback needs of a completion: where it was served and the request's attributes."""
    id: str
    deployment: str
    adapter: str
    variant: str | None
    attributes: dict[str, Any]
    created_at: float  # feedback is accepted for a while only (completion retention)


def _compiled_insert(engine: Engine) -> tuple[str, dict[str, Any]]:
    """The completions INSERT as the dialect's SQL, and each column's bind processor in parameter order."""
    table = Completion.__table__
    compiled = insert(table).compile(dialect=engine.dialect, column_keys=[c.key for c in table.columns])
    names = compiled.positiontup or []
    if [c.key for c in table.columns] != names:
        raise RuntimeError(f"unexpected parameter order for the completions INSERT: {names}")
    return compiled.string, {c.key: c.type.dialect_impl(engine.dialect).bind_processor(engine.dialect)
                             for c in table.columns}


async def _insert(session: AsyncSession, rows: list[dict[str, Any]]) -> list[None]:
    await session.execute(insert(Completion), rows)
    return [None] * len(rows)


class CompletionLog(GroupCommit[dict[str, Any], None]):
    def __init__(self, sessions: async_sessionmaker[AsyncSession],
                 readonly: async_sessionmaker[AsyncSession] | None = None, cache_size: int = 100_000,
                 sqlite_writer: Engine | None = None) -> None:
        super().__init__(sessions, _insert)
        self._readonly = readonly or sessions
        self._refs: OrderedDict[str, CompletionRef] = OrderedDict()
        self._cache_size = cache_size
        self._writer = sqlite_writer
        self._thread = ThreadPoolExecutor(1, "completion-log") if sqlite_writer is not None else None
        self._inline: Any = None  # the DBAPI (sqlite3) connection of the loop's fast path
        if sqlite_writer is not None:
            self._inline = sqlite_writer.raw_connection()  # the engine's pragmas: WAL, synchronous=FULL
            self._inline.driver_connection.execute("PRAGMA busy_timeout=0")  # never block the loop on the lock
            self._insert_sql, self._columns = _compiled_insert(sqlite_writer)
        self.inline_commits = 0  # how many rows took the fast path (tests, diagnostics)

    async def _commit(self, items: list[dict[str, Any]]) -> list[None]:
        if self._thread is None:  # no SQLite writer: the async session path
            return await super()._commit(items)
        await asyncio.get_running_loop().run_in_executor(self._thread, self._commit_sync, items)
        return [None] * len(items)

    def _commit_sync(self, items: list[dict[str, Any]]) -> None:
        with self._writer.begin() as conn:  # type: ignore[union-attr]  # only called with a writer
            conn.execute(insert(Completion.__table__), items)  # type: ignore[arg-type]

    def _commit_inline(self, row: dict[str, Any]) -> bool:
        """Commit `row` on the calling thread if the write lock is free right now; False otherwise."""
        if self._inline is None or row.keys() != self._columns.keys():
            return False
        conn = self._inline.driver_connection
        try:
            conn.execute("BEGIN IMMEDIATE")  # fails at once when another writer holds the lock
        except sqlite3.Error:
            return False  # busy: the group commit waits for the lock
        try:
            conn.execute(self._insert_sql, [bind(row[k]) if bind else row[k] for k, bind in self._columns.items()])
            conn.execute("COMMIT")
        except sqlite3.Error:
            with contextlib.suppress(sqlite3.Error):  # SQLite may already have rolled back (I/O errors)
                conn.execute("ROLLBACK")
            return False  # the group commit retries it and reports real failures (e.g. a duplicate id)
        self.inline_commits += 1
        return True

    async def stop(self) -> None:
        await super().stop()
        if self._thread is not None:
            self._thread.shutdown(wait=True)
        if self._inline is not None:
            self._inline.close()
        if self._writer is not None:
            self._writer.dispose()

    def _remember(self, ref: CompletionRef) -> None:
        self._refs[ref.id] = ref
        self._refs.move_to_end(ref.id)
        if len(self._refs) > self._cache_size:
            self._refs.popitem(last=False)

    async def write(self, row: dict[str, Any]) -> None:
        """Return once `row` is committed; raises if the commit failed."""
        if not self._commit_inline(row):
            await self.submit(row)
        self._remember(CompletionRef(row["id"], row["deployment"], row["adapter"], row.get("variant"),
                                     row.get("attributes") or {}, row["created_at"]))

    async def refs(self, ids: set[str]) -> dict[str, CompletionRef]:
        """The known completions among `ids`: from memory, the rest with one narrow query."""
        found = {i: self._refs[i] for i in ids if i in self._refs}
        missing = ids - found.keys()
        if missing:
            c = Completion
            async with self._readonly() as s:
                rows = await s.execute(select(c.id, c.deployment, c.adapter, c.variant, c.attributes, c.created_at)
                                       .where(c.id.in_(missing)))
            for row in rows.all():
                ref = CompletionRef(row.id, row.deployment, row.adapter, row.variant, row.attributes or {},
                                    row.created_at)
                self._remember(ref)
                found[ref.id] = ref
        return found

    async def gone(self, ids: Collection[str]) -> set[str]:
        """Those of `ids` no longer in the database (deleted since they were found), forgotten here too."""
        async with self._readonly() as s:
            present = set((await s.execute(select(Completion.id).where(Completion.id.in_(list(ids))))).scalars())
        missing = set(ids) - present
        for i in missing:
            self._refs.pop(i, None)
        return missing
