"""Storage on real SQLite and real PostgreSQL: migrations, the group-committed completion log, job claiming."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from service.core.completion_log import CompletionLog
from service.core.feedback import FeedbackService
from service.errors import NotFound, Unprocessable
from service.storage.db import make_sqlite_writer
from service.storage.models import Completion, Feedback, Job
from service.worker import claim_job, requeue_stale


def _row(i: int) -> dict:
    return {"id": f"chatcmpl-{i}", "deployment": "default", "adapter": "base", "adapter_id": None,
            "experiment_id": None, "variant": None, "user": f"u{i}", "attributes": {"segment": "retail"},
            "kind": "chat", "prompt": [{"role": "user", "content": f"hi {i}"}], "prompt_hash": str(i),
            "output": "hello", "finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 1,
            "latency_seconds": 0.1, "stream": False, "error": None, "created_at": time.time()}


async def test_completion_log_commits_every_concurrent_write(sessions, database_url: str) -> None:
    log = CompletionLog(sessions, sqlite_writer=make_sqlite_writer(database_url))  # as the service builds it
    assert (log._writer is not None) == database_url.startswith("sqlite")
    log.start()
    try:
        await asyncio.gather(*(log.write(_row(i)) for i in range(299)), log.write({**_row(299), "stream": True}))
        # SQLite: every row took the loop's raw-sqlite3 path; what SQLAlchemy reads back below checks its binds
        assert log.inline_commits == (300 if database_url.startswith("sqlite") else 0)
    finally:
        await log.stop()
    async with sessions() as s:
        assert (await s.execute(select(func.count()).select_from(Completion))).scalar_one() == 300
        last = await s.get(Completion, "chatcmpl-299")
        assert last is not None and last.stream is True and last.finish_reason == "stop" and last.error is None
        c = await s.get(Completion, "chatcmpl-7")
    assert c is not None and c.attributes == {"segment": "retail"} and c.prompt[0]["content"] == "hi 7"
    assert c.stream is False and c.prompt_tokens == 3 and abs(c.latency_seconds - 0.1) < 1e-12


async def test_completion_log_reports_a_failed_commit(sessions, database_url: str) -> None:
    log = CompletionLog(sessions, sqlite_writer=make_sqlite_writer(database_url))
    log.start()
    try:
        await log.write(_row(1))
        with pytest.raises(IntegrityError):  # duplicate primary key: the waiter learns the write failed
            await log.write(_row(1))
        await log.write(_row(2))  # the writer survives a failed batch
    finally:
        await log.stop()


async def test_sqlite_completion_log_never_blocks_the_event_loop_on_the_lock(tmp_path) -> None:
    """A free write lock: the row commits right away on the loop. A lock held by another writer (another
    process, an upload): the write waits on the writer thread while the loop keeps serving, then lands."""
    from service.storage.db import make_engine, make_sessionmaker
    from service.storage.migrate import upgrade

    url = f"sqlite+aiosqlite:///{tmp_path / 'tuneloop.db'}"
    await asyncio.to_thread(upgrade, url)
    engine = make_engine(url)
    log = CompletionLog(make_sessionmaker(engine), sqlite_writer=make_sqlite_writer(url))
    log.start()
    other = sqlite3.connect(tmp_path / "tuneloop.db", isolation_level=None)
    # The loop's connection gives up at once when the lock is taken, instead of SQLite's busy wait, and its
    # commits are durable (synchronous=FULL is 2).
    conn = log._inline.driver_connection
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 0
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2
    try:
        await log.write(_row(1))
        assert log.inline_commits == 1
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        pending = asyncio.create_task(log.write(_row(2)))
        await asyncio.sleep(0.2)
        assert not pending.done() and log.inline_commits == 1  # went to the writer thread, which waits
        other.execute("COMMIT")
        await asyncio.wait_for(pending, 30)
        await log.write(_row(3))
        assert log.inline_commits == 2  # the fast path is back once the lock is free
    finally:
        other.close()
        await log.stop()
        await engine.dispose()
    count = sqlite3.connect(tmp_path / "tuneloop.db").execute("SELECT count(*) FROM completions").fetchone()[0]
    assert count == 3


async def test_feedback_joins_cached_and_stored_completions(sessions) -> None:
    """Feedback finds a completion logged by this process (memory) and one logged earlier (database)."""
    earlier = CompletionLog(sessions)
    await earlier.write({**_row(1), "variant": "b", "attributes": {"segment": "retail"}})  # another process
    log = CompletionLog(sessions)
    await log.write(_row(2))
    fb = FeedbackService(sessions, log)
    fb.writer.start()
    try:
        assert "chatcmpl-1" not in log._refs and "chatcmpl-2" in log._refs
        ids = await asyncio.gather(
            fb.submit([{"completion_id": "chatcmpl-1", "rating": 1, "attributes": {"channel": "app"}},
                       {"completion_id": "chatcmpl-2", "correction": "card_arrival", "id": "k1"}], None),
            fb.submit({"completion_id": "chatcmpl-2", "rating": 0.25, "id": "k1"}, None),  # same client id
            fb.submit({"completion_id": "chatcmpl-2", "rating": 0.5}, "hdr"))
        assert ids[1] == [ids[0][1]] and len({*ids[0], *ids[2]}) == 3
        with pytest.raises(NotFound):
            await fb.submit({"completion_id": "chatcmpl-404", "rating": 1}, None)
        with pytest.raises(Unprocessable) as bad:
            await fb.submit([{"completion_id": "chatcmpl-1", "rating": 1},
                             {"completion_id": "chatcmpl-404", "rating": 1}], None)
        assert bad.value.errors[0]["index"] == 1
    finally:
        await fb.writer.stop()
    async with sessions() as s:
        rows = {f.id: f for f in (await s.execute(select(Feedback))).scalars()}
    assert len(rows) == 3  # the retried client id and the rejected batch stored nothing more
    first = rows[ids[0][0]]
    assert first.deployment == "default" and first.attributes == {"segment": "retail", "channel": "app"}
    k1 = rows[ids[0][1]]  # whichever of the two "k1" posts committed first owns the id
    assert k1.client_id == "k1" and (k1.correction, k1.rating) in {("card_arrival", None), (None, 0.25)}


async def test_two_workers_never_claim_the_same_job(sessions) -> None:
    async with sessions() as s, s.begin():
        s.add_all([Job(id=f"ftjob-{i}", kind="fine_tune", deployment="default") for i in range(5)])
    claims = await asyncio.gather(*(claim_job(sessions, f"w{i}", ("fine_tune",)) for i in range(12)))
    got = [c.id for c in claims if c is not None]
    assert sorted(got) == [f"ftjob-{i}" for i in range(5)]
    assert len(got) == len(set(got))


async def test_stale_running_job_is_requeued(sessions) -> None:
    async with sessions() as s, s.begin():
        s.add(Job(id="ftjob-x", kind="fine_tune", deployment="default"))
    job = await claim_job(sessions, "dead-worker", ("fine_tune",))
    assert job is not None and job.status == "running" and job.attempts == 1
    assert await requeue_stale(sessions, timeout=3600) == []
    assert await requeue_stale(sessions, timeout=-1) == ["ftjob-x"]
    again = await claim_job(sessions, "w2", ("fine_tune",))
    assert again is not None and again.attempts == 2 and again.worker_id == "w2"
