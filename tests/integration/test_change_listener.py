"""The follow loop's wake-up on the real databases: on PostgreSQL a committed change to a deployment or an
experiment wakes `ChangeListener` (migration 0004's triggers NOTIFY, it LISTENs); a rolled-back change does
not; SQLite has no such channel, so there the loop waits for its poll."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import update

from service.core.replicas import ChangeListener
from service.storage.models import Deployment

A_LONG_TIME = 60.0  # never reached when a notification wakes the wait


async def test_a_committed_change_wakes_the_follow_loop_on_postgresql(sessions: Any) -> None:
    engine = sessions.kw["bind"]
    listener = ChangeListener(engine)
    try:
        if engine.dialect.name == "sqlite":
            assert not listener.enabled
            async with sessions() as s, s.begin():
                s.add(Deployment(name="d", base_model="m"))
            assert await listener.wait(0.2) is False  # no channel: only the poll's timeout
            return
        assert listener.enabled
        assert await listener.wait(A_LONG_TIME) is True  # it just began listening: follow once for what it missed
        assert await listener.wait(0.2) is False  # nothing changed since

        waiting = asyncio.create_task(listener.wait(A_LONG_TIME))
        async with sessions() as s, s.begin():
            s.add(Deployment(name="d", base_model="m"))
        assert await asyncio.wait_for(waiting, A_LONG_TIME / 2) is True  # woken, not timed out

        async with sessions() as s:  # a change that is rolled back is never announced
            await s.execute(update(Deployment).where(Deployment.name == "d").values(production_adapter_id="x"))
            await s.rollback()
        assert await listener.wait(0.5) is False

        await listener._listening.close()  # the connection breaks: the next wait listens again, and catches up
        assert await listener.wait(A_LONG_TIME) is True
        waiting = asyncio.create_task(listener.wait(A_LONG_TIME))
        async with sessions() as s, s.begin():
            await s.execute(update(Deployment).where(Deployment.name == "d").values(config={"k": 1}))
        assert await asyncio.wait_for(waiting, A_LONG_TIME / 2) is True
    finally:
        await listener.close()
