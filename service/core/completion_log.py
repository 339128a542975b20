"""Durable completion log: every gateway response waits until its row is committed (group commit)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.core.group_commit import GroupCommit
from service.storage.models import Completion


async def _insert(session: AsyncSession, rows: list[dict[str, Any]]) -> list[None]:
    await session.execute(insert(Completion), rows)
    return [None] * len(rows)


class CompletionLog(GroupCommit[dict[str, Any], None]):
    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        super().__init__(sessions, _insert)

    async def write(self, row: dict[str, Any]) -> None:
        """Return once `row` is committed; raises if the commit failed."""
        await self.submit(row)
