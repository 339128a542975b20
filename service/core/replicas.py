"""Several API processes on one database: each follows what the others changed, and one of them decides.

Routing, staging and the standby live in each API process (`service.core.routing`, `service.core.serving`).
With one database behind several `tuneloop serve` processes (PostgreSQL and a load balancer, or replicas on
one machine sharing the SQLite file), a promote, rollback, experiment or new deployment made through one
of them must reach the others' routing tables. The database is the record, so every process follows it:
`follow` runs about every `follow_interval_seconds` and adopts what changed there, loading adapters under
its own served names (each process loads, probes, drains and unloads only its own names, so the swap
guarantees hold per process). A change wakes the other processes' follow at once on PostgreSQL
(`ChangeListener`: LISTEN/NOTIFY), and within 0.1 s on SQLite (a change counter it reads).

Experiment decisions, drift jobs, fairness runs and retraining triggers must be made once, not once per
process: `LeaderLock` elects the one process whose monitor makes them (a PostgreSQL session advisory lock,
or an exclusive lock on a file beside the SQLite database); when that process dies, its lock is released
and another takes over at its next monitor pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
import struct
import time
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from monitoring import metrics

if TYPE_CHECKING:
    from service.context import AppContext

log = logging.getLogger("tuneloop.replicas")
LOCK_KEY = zlib.crc32(b"tuneloop monitor leader")  # the advisory lock's key (a bigint in PostgreSQL)


def sqlite_file(engine: AsyncEngine) -> str | None:
    """The SQLite database file behind `engine`; None for another database or an in-memory one."""
    if engine.dialect.name != "sqlite" or engine.url.database in (None, "", ":memory:"):
        return None
    return engine.url.database


async def follow(ctx: AppContext) -> None:
    """One pass: deployments created or reconfigured elsewhere, then production swaps, then experiments."""
    deployments = await ctx.deployments.list()
    for dep in deployments:
        ctx.deployments.remember(dep)
        ctx.serving.know(dep.name)
    await ctx.serving.follow_production({d.name: d.production_adapter_id for d in deployments})
    await ctx.experiments.follow()


async def follow_loop(ctx: AppContext) -> None:
    changes = ChangeListener(ctx.engine)
    try:
        while True:
            await changes.wait(ctx.settings.follow_interval_seconds)
            try:
                await follow(ctx)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("following the database failed")
    finally:
        await changes.close()


class ChangeListener:
    """Wakes the follow loop as soon as another process commits a change, instead of at its next poll.

    PostgreSQL: migration 0004's triggers `NOTIFY` `CHANNEL` on every change to deployments or experiments,
    and this LISTENs on a connection of its own; a notification that arrives during a pass wakes the next,
    so none is lost. SQLite: migration 0005's triggers count those changes in `follow_version`, and this
    reads the counter every `SQLITE_POLL_SECONDS` (one row, far cheaper than a follow pass) while another
    process shares the file (`Presence`); alone, it waits out the poll instead. Either way the
    first wait returns at once (follow what happened before), and the poll stays the fallback when the
    listening fails."""

    CHANNEL = "tuneloop_follow"  # the channel migration 0004 notifies
    SQLITE_POLL_SECONDS = 0.1

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self.sqlite_path = sqlite_file(engine)  # None in memory too: no other process to follow
        self._presence = Presence(self.sqlite_path) if self.sqlite_path else None
        self._sqlite: sqlite3.Connection | None = None  # SQLite: a plain connection that reads the counter
        self._changed = asyncio.Event()
        self._conn: AsyncConnection | None = None
        self._listening: Any = None  # the asyncpg connection under `_conn` (LISTEN is its `add_listener`)
        self._version: int | None = None  # SQLite: the change counter when last read
        self._failed = False  # logged once until it listens again

    async def wait(self, timeout: float) -> bool:
        """Return True when a change was committed since the last return, False after `timeout` seconds."""
        if self.sqlite_path is not None:
            return await self._count(timeout)
        if self.dialect == "postgresql":
            await self._listen()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return False
        self._changed.clear()
        return True

    async def _count(self, timeout: float) -> bool:
        if self._version is not None and self._presence is not None and not self._presence.others():
            # no other API process on this file, so nothing to follow but the poll's fallback
            await asyncio.sleep(timeout)
            return False
        deadline = time.monotonic() + timeout
        while True:
            try:
                version = self._read_counter()
            except Exception:  # the poll carries on; retried at the next read
                if not self._failed:
                    log.exception("cannot read the change counter; following by the poll alone until it can")
                self._failed = True
                self._close_sqlite()
                await asyncio.sleep(max(0.0, deadline - time.monotonic()))
                return False
            self._failed = False
            if version != self._version:
                self._version = version
                return True
            if (left := deadline - time.monotonic()) <= 0:
                return False
            await asyncio.sleep(min(self.SQLITE_POLL_SECONDS, left))

    def _read_counter(self) -> int:
        """One row of a WAL database, which no writer blocks: microseconds, so it is read on the event loop
        (through aiosqlite's thread hop and a pool checkout it cost a process 1.1 % of a core at 10 reads/s).
        Busy timeout 0, as the completion log's loop commit: never sleep on the loop; a rare busy read fails
        and the poll carries on."""
        if self._sqlite is None:
            self._sqlite = sqlite3.connect(self.sqlite_path, isolation_level=None, timeout=0)  # autocommit
        return self._sqlite.execute("SELECT version FROM follow_version").fetchone()[0]

    def _close_sqlite(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
            self._sqlite = None

    def _notified(self, *_: object) -> None:
        self._changed.set()

    async def _listen(self) -> None:
        if self._listening is not None and not self._listening.is_closed():
            return
        await self.close()
        try:
            self._conn = await self.engine.connect()
            self._listening = (await self._conn.get_raw_connection()).driver_connection
            await self._listening.add_listener(self.CHANNEL, self._notified)
        except Exception:  # the poll carries on; retried at the next wait
            if not self._failed:
                log.exception("cannot LISTEN for changes; following by the poll alone until it can")
            self._failed = True
            await self.close()
            return
        if self._failed:
            log.info("listening for changes again")
        self._failed = False
        self._changed.set()  # changes made while not listening: follow once now

    async def close(self) -> None:
        """Invalidate, not return, the connection: a pooled connection must not stay LISTENing."""
        self._close_sqlite()
        if self._presence is not None:
            self._presence.close()
            self._presence = None
        if self._conn is not None:
            with contextlib.suppress(Exception):  # a broken connection is closed all the same
                await self._conn.invalidate()
                await self._conn.close()
        self._conn = self._listening = None


class Presence:
    """Whether another API process follows the same SQLite file, so that one on its own (the default set-up)
    does not read the change counter ten times a second for nothing.

    Each holds a shared lock on `<database>.processes` while it runs. Asking means trying to turn ours into an
    exclusive lock: that fails while anyone else holds theirs, and a failed attempt keeps ours; a success is
    turned back at once. Open-file-description locks (Linux), unlike POSIX record locks, are not merged per
    process, so two services in one process see each other too, and the kernel drops a lock with its file.
    Where they do not exist, `others()` always says yes (the counter is read as before)."""

    def __init__(self, database: str) -> None:
        self._fd: int | None = None
        if not hasattr(fcntl, "F_OFD_SETLK"):
            return
        fd = os.open(database + ".processes", os.O_RDWR | os.O_CREAT, 0o644)
        for _ in range(100):  # another process may hold it exclusively, for the two system calls of its question
            try:
                _ofd_lock(fd, fcntl.F_RDLCK)
            except OSError:
                time.sleep(0.001)
                continue
            self._fd = fd
            return
        os.close(fd)
        log.warning("no shared lock on %s.processes: reading the change counter as if not alone", database)

    def others(self) -> bool:
        if self._fd is None:
            return True
        try:
            _ofd_lock(self._fd, fcntl.F_WRLCK)
        except OSError:  # another process holds its shared lock (or the lock failed: the safe answer)
            return True
        with contextlib.suppress(OSError):  # turning it back never conflicts
            _ofd_lock(self._fd, fcntl.F_RDLCK)
        return False

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock
            self._fd = None


def _ofd_lock(fd: int, kind: int) -> None:
    """Set an open-file-description lock on the whole file without waiting (`struct flock`, `l_pid` 0)."""
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 0, 0))


class LeaderLock:
    """Held by at most one process per database; `held()` takes it when free, and says whether this process
    has it. PostgreSQL: `pg_try_advisory_lock` on a connection kept open (the server frees the lock when that
    connection ends). SQLite: `flock` on `<database>.leader` (the kernel frees it when the process ends)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.sqlite = engine.dialect.name == "sqlite"
        self.sqlite_path = sqlite_file(engine)  # None in memory: one process by definition
        self._conn: AsyncConnection | None = None
        self._fd: int | None = None

    async def held(self) -> bool:
        was_leader = self._fd is not None or self._conn is not None
        is_leader = self._flock() if self.sqlite else await self._advisory_lock()
        if is_leader and not was_leader:
            log.info("this process now runs the monitor's decisions (leader)")
        metrics.MONITOR_LEADER.set(1 if is_leader else 0)
        return is_leader

    def _flock(self) -> bool:
        if self._fd is not None:
            return True
        if self.sqlite_path is None:
            return True  # in memory: one process by definition
        fd = os.open(Path(self.sqlite_path + ".leader"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    async def _advisory_lock(self) -> bool:
        if self._conn is not None:
            try:  # still connected, so still holding it
                await self._conn.execute(text("SELECT 1"))
                await self._conn.commit()  # not left idle in a transaction
                return True
            except Exception:  # noqa: BLE001 - the connection, and so the lock, is gone
                log.warning("lost the leader lock's connection; trying to take the lock again")
                await self._drop()
        conn = await self.engine.connect()
        try:
            got: Any = (await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": LOCK_KEY})).scalar()
            await conn.commit()
        except Exception:
            await conn.close()
            raise
        if not got:
            await conn.close()
            return False
        self._conn = conn
        return True

    async def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # already broken
                await self._conn.invalidate()
            self._conn = None

    async def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._conn is not None:
            try:
                await self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_KEY})
                await self._conn.close()
            except Exception:  # noqa: BLE001 - closing the connection frees it anyway
                await self._drop()
            self._conn = None
