"""Cancelling an evaluation on the real databases: a queued one is cancelled at once and its job never runs; one a
worker has claimed is flagged, and the worker's next heartbeat sees the flag (the evaluation then stops between
batches, `tests/integration/test_training_api.py` shows it through the API); a finished one is a 409."""

from __future__ import annotations

import pytest

from service.core.evaluations import EvaluationService, queue_evaluation
from service.errors import Conflict
from service.storage.models import Adapter, Deployment, Job
from service.worker import claim_job, heartbeat


async def _adapter(sessions) -> Adapter:
    adapter = Adapter(id="adp-1", deployment="d", version=1, path="/nowhere", base_model="m", base_model_hash="h")
    async with sessions() as s, s.begin():
        s.add(Deployment(name="d", base_model="m"))
        s.add(adapter)
    return adapter


async def test_a_queued_evaluation_is_cancelled_at_once_and_never_claimed(sessions) -> None:
    evaluations = EvaluationService(sessions)
    ev = await evaluations.get(await queue_evaluation(sessions, await _adapter(sessions)))
    assert ev.status == "queued"

    cancelled = await evaluations.cancel(ev.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    async with sessions() as s:
        job = await s.get(Job, ev.job_id)
    assert job.status == "cancelled" and job.cancel_requested
    assert await claim_job(sessions, "w", ("evaluation",)) is None  # no worker will run it
    with pytest.raises(Conflict, match="already cancelled"):
        await evaluations.cancel(ev.id)
    async with sessions() as s:
        assert (await s.get(Adapter, "adp-1")).status == "candidate"  # cancelling judges nothing


async def test_a_claimed_evaluation_is_flagged_for_its_worker(sessions) -> None:
    evaluations = EvaluationService(sessions)
    ev = await evaluations.get(await queue_evaluation(sessions, await _adapter(sessions)))
    job = await claim_job(sessions, "w", ("evaluation",))
    assert job is not None and job.id == ev.job_id
    assert await heartbeat(sessions, job.id, "w") is False  # nothing asked yet

    flagged = await evaluations.cancel(ev.id)
    assert flagged.status == "queued"  # the worker has it: it marks the evaluation cancelled when it stops
    async with sessions() as s:
        assert (await s.get(Job, job.id)).status == "running"
    assert await heartbeat(sessions, job.id, "w") is True  # what stops the worker's generation
