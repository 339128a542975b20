"""Durable completion log with group commit.

Every gateway response waits until its log row is committed. Rows from concurrent requests are written in
one transaction (one fsync for many requests), which keeps the durability promise without paying a commit
per request.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.storage.models import Completion

log = logging.getLogger("tuneloop.completions")
_MAX_BATCH = 512


class CompletionLog:
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self._sessions = sessions
        self._queue: asyncio.Queue[tuple[dict[str, Any], asyncio.Future[None]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="completion-log")

    async def stop(self) -> None:
        if self._task:
            # Let queued rows commit before the writer goes away.
            while not self._queue.empty():
                await asyncio.sleep(0.01)
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def write(self, row: dict[str, Any]) -> None:
        """Return once `row` is committed; raises if the commit failed."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._queue.put((row, fut))
        await fut

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < _MAX_BATCH and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                async with self._sessions() as s, s.begin():
                    await s.execute(insert(Completion), [row for row, _ in batch])
            except Exception as exc:
                log.exception("completion log commit failed")
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for _, fut in batch:
                if not fut.done():
                    fut.set_result(None)
