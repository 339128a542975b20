"""Erasing one user's data on real SQLite and PostgreSQL: exactly their completions and feedback on the one
deployment go, in batches; the snapshots and adapters that may hold copies of their feedback are named; a stop
between batches keeps the rest; feedback racing the erasure is refused as feedback on an unknown completion and
never outlives it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import func, insert, select

from service.core.completion_log import CompletionLog
from service.core.erasure import Erased, erase_user, queue_erasure
from service.core.feedback import FeedbackService
from service.errors import NotFound, Unprocessable
from service.storage.models import Adapter, Completion, Deployment, Feedback, Job, Snapshot
from tests.integration.test_retention import completion


@pytest.fixture
async def feedback(sessions: Any) -> AsyncIterator[FeedbackService]:
    """Deployment `app`, and a running completion log and feedback service over it, as the API process has them."""
    async with sessions() as s, s.begin():
        s.add(Deployment(name="app", base_model="m"))
    log = CompletionLog(sessions)
    log.start()
    service = FeedbackService(sessions, log)
    service.writer.start()
    yield service
    await service.writer.stop()
    await log.stop()


async def _feedback_ids(sessions: Any, rows: list[dict[str, Any]]) -> list[int]:
    async with sessions() as s, s.begin():
        return list((await s.execute(insert(Feedback).returning(Feedback.id, sort_by_parameter_order=True), [
            {"completion_id": r["id"], "deployment": r["deployment"], "rating": 1.0, "attributes": {}}
            for r in rows])).scalars())


async def _count(sessions: Any, model: Any, *where: Any) -> int:
    async with sessions() as s:
        return (await s.execute(select(func.count()).select_from(model).where(*where))).scalar_one()


async def test_only_the_users_data_on_the_deployment_goes(sessions: Any) -> None:
    now = time.time()
    async with sessions() as s, s.begin():
        s.add_all([Deployment(name="app", base_model="m"), Deployment(name="other", base_model="m")])
    alice = [completion("app", now - i, user="alice") for i in range(23)]
    bob = [completion("app", now - i, user="bob") for i in range(5)]
    anonymous = [completion("app", now)]
    alice_elsewhere = [completion("other", now, user="alice")]
    async with sessions() as s, s.begin():
        await s.execute(insert(Completion), alice + bob + anonymous + alice_elsewhere)
    bob_feedback = await _feedback_ids(sessions, bob[:2])
    alice_feedback = await _feedback_ids(sessions, alice[:4])
    elsewhere_feedback = await _feedback_ids(sessions, alice_elsewhere)
    async with sessions() as s, s.begin():
        s.add_all([  # which copies of feedback may hold alice's: their feedback id ranges tell
            Snapshot(id="snap-alice", deployment="app", path="p", feedback_range=[bob_feedback[0], alice_feedback[0]]),
            Snapshot(id="snap-bob", deployment="app", path="p", feedback_range=bob_feedback),
            Snapshot(id="snap-deleted", deployment="app", path="p", feedback_range=alice_feedback,
                     deleted_at=now),
            Snapshot(id="snap-other", deployment="other", path="p", feedback_range=elsewhere_feedback * 2),
            Snapshot(id="snap-data-only", deployment="app", path="p"),
            Adapter(id="ad-alice", deployment="app", version=1, path="p", base_model="m", base_model_hash="h",
                    feedback_range=[alice_feedback[-1], alice_feedback[-1]]),
            Adapter(id="ad-bob", deployment="app", version=2, path="p", base_model="m", base_model_hash="h",
                    feedback_range=bob_feedback)])
    batches: list[int] = []

    async def progress(erased: Erased) -> bool:
        batches.append(erased.completions)
        return True

    erased = await erase_user(sessions, "app", "alice", progress=progress, batch=10)
    assert erased.to_dict() == {"completions": 23, "feedback": 4, "snapshots": ["snap-alice"],
                                "adapters": ["ad-alice"]}
    assert batches == [10, 20, 23]
    assert await _count(sessions, Completion, Completion.user == "alice", Completion.deployment == "app") == 0
    assert await _count(sessions, Feedback, Feedback.id.in_(alice_feedback)) == 0
    # everyone else's data, and alice's on the other deployment, stay
    assert await _count(sessions, Completion, Completion.deployment == "app") == len(bob + anonymous)
    assert await _count(sessions, Feedback) == len(bob_feedback + elsewhere_feedback)
    assert await _count(sessions, Completion, Completion.deployment == "other") == 1
    assert (await erase_user(sessions, "app", "alice")).to_dict() == {
        "completions": 0, "feedback": 0, "snapshots": [], "adapters": []}


async def test_a_stop_between_batches_keeps_the_rest_for_the_next_job(sessions: Any) -> None:
    async with sessions() as s, s.begin():
        s.add(Deployment(name="app", base_model="m"))
        await s.execute(insert(Completion), [completion("app", time.time(), user="carol") for _ in range(25)])

    async def stop(erased: Erased) -> bool:
        return False

    assert (await erase_user(sessions, "app", "carol", progress=stop, batch=10)).completions == 10
    assert await _count(sessions, Completion, Completion.user == "carol") == 15
    assert (await erase_user(sessions, "app", "carol", batch=10)).completions == 15
    assert await _count(sessions, Completion) == 0


async def test_an_erasure_is_queued_once_per_user(sessions: Any) -> None:
    async with sessions() as s, s.begin():
        s.add(Deployment(name="app", base_model="m"))
    first = await queue_erasure(sessions, "app", "dave")
    assert (await queue_erasure(sessions, "app", "dave")).id == first.id  # still queued: the same job
    assert (await queue_erasure(sessions, "app", "erin")).id != first.id
    for deployment, user, field in (("app", "", "user"), ("app", "x" * 257, "user"), ("app", 7, "user"),
                                    (None, "dave", "deployment")):
        with pytest.raises(Unprocessable) as bad:
            await queue_erasure(sessions, deployment, user)
        assert bad.value.field == field
    with pytest.raises(NotFound) as unknown:
        await queue_erasure(sessions, "nope", "dave")
    assert unknown.value.field == "deployment"
    assert await _count(sessions, Job, Job.kind == "erasure") == 2


async def test_feedback_on_an_erased_completion_is_refused_even_from_the_cache(sessions: Any, feedback: Any) -> None:
    log = feedback.completions
    erased, kept = completion("app", time.time(), user="frank"), completion("app", time.time(), user="gina")
    for row in (erased, kept):
        await log.write(row)  # remembered: feedback on them is checked without a database read
    await erase_user(sessions, "app", "frank")
    with pytest.raises(NotFound) as single:
        await feedback.submit({"completion_id": erased["id"], "rating": 1}, None)
    assert single.value.field == "completion_id"
    with pytest.raises(Unprocessable) as batch:
        await feedback.submit([{"completion_id": kept["id"], "rating": 1},
                               {"completion_id": erased["id"], "rating": 0}], None)
    assert batch.value.field == "[1].completion_id"
    assert await _count(sessions, Feedback) == 0  # nothing of the batch was stored
    assert len(await feedback.submit({"completion_id": kept["id"], "rating": 1}, None)) == 1


async def test_feedback_racing_the_erasure_never_outlives_its_completion(sessions: Any, feedback: Any) -> None:
    """Feedback posted on the user's completions while they are erased either lands before its batch (and goes
    with it) or is refused; the erasure itself never fails on a feedback row that arrived under it."""
    log = feedback.completions
    rows = [completion("app", time.time() - i, user="hana") for i in range(200)]
    for row in rows:
        await log.write(row)
    outcomes = {"stored": 0, "refused": 0}

    async def post_feedback() -> None:
        for row in reversed(rows):  # the erasure's batches come in no set order: meet them somewhere
            try:
                await feedback.submit({"completion_id": row["id"], "rating": 1}, None)
                outcomes["stored"] += 1
            except NotFound:
                outcomes["refused"] += 1
            await asyncio.sleep(0)

    poster = asyncio.create_task(post_feedback())
    await asyncio.sleep(0.02)
    erased = await erase_user(sessions, "app", "hana", batch=5)
    await poster
    assert erased.completions == len(rows)
    assert outcomes["stored"] + outcomes["refused"] == len(rows) and outcomes["refused"] > 0
    assert erased.feedback == outcomes["stored"]  # what was stored before its batch went with it
    assert await _count(sessions, Completion) == 0
    assert await _count(sessions, Feedback) == 0
