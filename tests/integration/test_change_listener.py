"""The follow loop's wake-up on the real databases: a committed change to a deployment or an experiment wakes
`ChangeListener` (PostgreSQL: migration 0004's triggers NOTIFY and it LISTENs; SQLite: migration 0005's
triggers count the change and it reads the counter), and a rolled-back change does not."""

from __future__ import annotations

import asyncio
from typing import Any

from sqlalchemy import update

from service.core.replicas import ChangeListener
from service.storage.models import Deployment, Experiment

A_LONG_TIME = 60.0  # never reached when a change wakes the wait


async def test_a_committed_change_wakes_the_follow_loop_and_a_rolled_back_one_does_not(sessions: Any) -> None:
    engine = sessions.kw["bind"]
    listener = ChangeListener(engine)

    async def woken_by(change: Any) -> bool:
        waiting = asyncio.create_task(listener.wait(A_LONG_TIME))
        await asyncio.sleep(0.3)  # it is waiting before the change
        assert not waiting.done()
        async with sessions() as s, s.begin():
            await change(s)
        return await asyncio.wait_for(waiting, A_LONG_TIME / 2)

    async def add_deployment(s: Any) -> None:
        s.add(Deployment(name="d", base_model="m"))

    async def reconfigure(s: Any) -> None:
        await s.execute(update(Deployment).where(Deployment.name == "d").values(config={"k": 1}))

    async def start_experiment(s: Any) -> None:
        s.add(Experiment(id="exp-1", deployment="d", status="running", seed="s", policy={}, variants=[]))

    try:
        assert await listener.wait(A_LONG_TIME) is True  # it just began: follow once for what it missed
        assert await listener.wait(0.3) is False  # nothing changed since

        assert await woken_by(add_deployment) is True  # woken, not timed out
        assert await woken_by(start_experiment) is True

        async with sessions() as s:  # a change that is rolled back is never announced
            await s.execute(update(Deployment).where(Deployment.name == "d").values(production_adapter_id="x"))
            await s.rollback()
        assert await listener.wait(0.5) is False

        if engine.dialect.name == "postgresql":
            await listener._listening.close()  # the connection breaks: the next wait listens again, and catches up
            assert await listener.wait(A_LONG_TIME) is True
        assert await woken_by(reconfigure) is True
    finally:
        await listener.close()
