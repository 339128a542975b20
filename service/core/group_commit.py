"""Group commit: many concurrent writers, one transaction (and one fsync) per batch.

Every caller waits until its own item is committed, so an acknowledged write is durable; items that arrive
while a commit is in flight share the next one. If a batch fails, its items are retried one by one, so a
bad item fails only its own caller.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

T = TypeVar("T")
R = TypeVar("R")
log = logging.getLogger("tuneloop.group_commit")


class GroupCommit(Generic[T, R]):
    def __init__(self, sessions: async_sessionmaker[AsyncSession],
                 apply: Callable[[AsyncSession, list[T]], Awaitable[list[R]]], max_batch: int = 512) -> None:
        self._sessions = sessions
        self._apply = apply
        self._max_batch = max_batch
        self._queue: asyncio.Queue[tuple[T, asyncio.Future[R]]] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="group-commit")

    async def stop(self) -> None:
        if self._task is None:
            return
        while not self._queue.empty():  # let queued items commit before the writer goes away
            await asyncio.sleep(0.01)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass

    async def submit(self, item: T) -> R:
        """Return once `item` is committed (with what `apply` returned for it); raise if it failed."""
        if not self.running:  # not started (tests, scripts): commit alone
            return (await self._commit([item]))[0]
        fut: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        await self._queue.put((item, fut))
        return await fut

    async def _commit(self, items: list[T]) -> list[R]:
        async with self._sessions() as s, s.begin():
            return await self._apply(s, items)

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                results = await self._commit([item for item, _ in batch])
            except Exception:  # noqa: BLE001 - retried one by one below
                if len(batch) == 1:
                    results = None
                else:
                    log.warning("a batch of %d failed to commit; retrying its items one by one", len(batch))
                    for item, fut in batch:
                        await self._one(item, fut)
                    continue
            if results is None:
                await self._one(*batch[0])
                continue
            for (_, fut), result in zip(batch, results, strict=True):
                if not fut.done():
                    fut.set_result(result)

    async def _one(self, item: T, fut: asyncio.Future[R]) -> None:
        try:
            result = (await self._commit([item]))[0]
        except Exception as exc:  # noqa: BLE001 - the caller gets its own failure
            if not fut.done():
                fut.set_exception(exc)
            return
        if not fut.done():
            fut.set_result(result)
