"""The follow loop's wake-up on the real databases: a committed change to a deployment or an experiment wakes
`ChangeListener` (PostgreSQL: migration 0004's triggers NOTIFY and it LISTENs; SQLite: migration 0005's
triggers count the change and it reads the counter while another process shares the file), and a rolled-back
change does not. `Presence` tells a process on a SQLite file whether another one follows it too."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import update

from service.core.replicas import ChangeListener, Presence
from service.storage.db import make_engine, make_sessionmaker
from service.storage.migrate import upgrade
from service.storage.models import Deployment, Experiment

A_LONG_TIME = 60.0  # never reached when a change wakes the wait


async def test_a_committed_change_wakes_the_follow_loop_and_a_rolled_back_one_does_not(sessions: Any) -> None:
    engine = sessions.kw["bind"]
    listener = ChangeListener(engine)
    other = Presence(listener.sqlite_path) if listener.sqlite_path else None  # another API process on the file

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
        if other is not None:
            other.close()


async def test_a_process_alone_on_a_sqlite_file_waits_out_the_poll_without_reading_the_counter(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'tuneloop.db'}"
    await asyncio.to_thread(upgrade, url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    listener = ChangeListener(engine)
    try:
        assert await listener.wait(A_LONG_TIME) is True  # the first wait still follows at once
        async with sessions() as s, s.begin():
            s.add(Deployment(name="d", base_model="m"))
        assert await listener.wait(0.5) is False  # alone: its own change is not news, and the counter is not read
        other = Presence(listener.sqlite_path)
        try:
            assert await listener.wait(0.5) is True  # another process came: the counter shows what changed
        finally:
            other.close()
    finally:
        await listener.close()
        await engine.dispose()


def test_presence_sees_another_process_and_forgets_it_when_it_ends(tmp_path: Path) -> None:
    database = str(tmp_path / "tuneloop.db")
    me = Presence(database)
    try:
        assert me.others() is False
        assert me.others() is False  # asking keeps the lock shared: still alone, not locked out by itself
        code = ("import time; from service.core.replicas import Presence; "
                f"p = Presence({database!r}); print(p.others(), flush=True); time.sleep(60)")
        holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "True"  # it sees this process
            assert me.others() is True  # and this process sees it
        finally:
            holder.kill()
            holder.wait()
        assert me.others() is False  # the kernel dropped its lock with the process
    finally:
        me.close()
