"""The monitor's leader lock on the real databases: one holder per database, taken over when it is released
(as when its process ends), and held across passes by the process that has it."""

from __future__ import annotations

from service.core.replicas import LeaderLock
from service.storage.db import make_engine


async def test_one_process_holds_the_leader_lock_and_another_takes_it_over(database_url: str) -> None:
    engines = [make_engine(database_url) for _ in range(2)]
    first, second = (LeaderLock(e) for e in engines)
    try:
        assert await first.held()
        assert not await second.held()
        assert await first.held()  # kept, pass after pass
        await first.release()
        assert await second.held()
        assert not await first.held()
    finally:
        await first.release()
        await second.release()
        for e in engines:
            await e.dispose()
