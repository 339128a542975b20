"""Erasing one user's data from a deployment, as a worker job (kind `erasure`, ids `erasejob-...`).

An application that logs its users' requests under `user` must be able to take one user's data back (a
deletion request under GDPR and the like). The job deletes the deployment's completions logged with that `user`
and the feedback on them, in batches of `BATCH` rows, each its own transaction (on SQLite the gateway's commits
wait for the write lock a batch holds), until none is left; it reports progress as events and stops between
batches when cancelled (what was deleted stays deleted; a new job finishes the rest).

Copies the job cannot delete are named in its result: snapshots whose curated rows may include the user's
feedback (their `feedback_range` covers one of the deleted feedback ids; `DELETE /v1/snapshots/{id}` removes
their files) and adapters trained on such feedback (`DELETE /v1/adapters/{id}`, if the application's policy
wants models trained on the data gone too). Aggregates stay: experiment statistics (a running experiment loses
the user's units), fairness and drift numbers. The job record keeps the user id as the record of the erasure.

Feedback racing the erasure: a feedback insert for a completion a batch deleted fails on the foreign key
(PostgreSQL: the batch locks its completions first, so the insert waits for the batch and then fails), and
`FeedbackService` answers it as feedback on an unknown completion.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.errors import NotFound, Unprocessable
from service.storage.models import (
    MAX_USER,
    Adapter,
    Completion,
    Deployment,
    Feedback,
    Job,
    JobEvent,
    Snapshot,
)

if TYPE_CHECKING:
    from service.worker import WorkerContext

log = logging.getLogger("tuneloop.erasure")
BATCH = 100  # rows per transaction, as the completion retention's: ~5 ms of SQLite's write lock


@dataclass
class Erased:
    """What an erasure deleted so far, and the copies it could not delete."""
    completions: int = 0
    feedback: int = 0
    snapshots: set[str] = field(default_factory=set)
    adapters: set[str] = field(default_factory=set)

    def to_dict(self) -> dict[str, Any]:
        return {"completions": self.completions, "feedback": self.feedback,
                "snapshots": sorted(self.snapshots), "adapters": sorted(self.adapters)}


async def erase_user(sessions: async_sessionmaker[AsyncSession], deployment: str, user: str, *,
                     progress: Callable[[Erased], Awaitable[bool]] | None = None, batch: int = BATCH) -> Erased:
    """Delete `deployment`'s completions of `user` and their feedback, batch by batch, until none is left.

    `progress` is awaited after every batch; returning False stops the erasure there."""
    async with sessions() as s:  # what holds copies of feedback: snapshots and adapters name the id range they used
        copies = [(kind, row_id, lo, hi) for model, kind in ((Snapshot, "snapshot"), (Adapter, "adapter"))
                  for row_id, (lo, hi) in (await s.execute(select(model.id, model.feedback_range).where(
                      model.deployment == deployment, model.feedback_range.is_not(None),
                      model.deleted_at.is_(None)))).all()]
    erased = Erased()
    c = Completion
    while True:
        async with sessions() as s, s.begin():
            # Locked first (PostgreSQL; SQLite's write transaction already excludes other writers), so that a
            # feedback insert on one of them waits for this batch and then fails, instead of making it fail.
            ids = list((await s.execute(select(c.id).where(c.user == user, c.deployment == deployment)
                                        .limit(batch).with_for_update())).scalars())
            if not ids:
                break
            feedback_ids = list((await s.execute(delete(Feedback).where(Feedback.completion_id.in_(ids))
                                                 .returning(Feedback.id))).scalars())
            erased.completions += (await s.execute(delete(c).where(c.id.in_(ids)))).rowcount
        erased.feedback += len(feedback_ids)
        for kind, row_id, lo, hi in copies:
            if any(lo <= f <= hi for f in feedback_ids):
                (erased.snapshots if kind == "snapshot" else erased.adapters).add(row_id)
        if progress is not None and not await progress(erased):
            break
    return erased


# --- the job -------------------------------------------------------------------------------------------------
def erasure_job_json(j: Job) -> dict[str, Any]:
    return {"object": "erasure.job", "id": j.id, "status": j.status, "deployment": j.deployment,
            "user": j.spec.get("user"), "result": j.metrics or None, "error": j.error,
            "created_at": int(j.created_at), "started_at": None if j.started_at is None else int(j.started_at),
            "finished_at": None if j.finished_at is None else int(j.finished_at), "attempts": j.attempts}


async def queue_erasure(sessions: async_sessionmaker[AsyncSession], deployment: Any, user: Any) -> Job:
    """An erasure job for the user: the one already queued or running for them, else a new one."""
    if not isinstance(user, str) or not 0 < len(user) <= MAX_USER:
        raise Unprocessable(f"user must be the `user` the application sent with its requests (1..{MAX_USER} "
                            "characters)", field="user")
    if not isinstance(deployment, str):
        raise Unprocessable("deployment is required", field="deployment")
    async with sessions() as s, s.begin():
        if await s.get(Deployment, deployment) is None:
            raise NotFound(f"deployment {deployment!r} does not exist", field="deployment")
        pending = (await s.execute(select(Job).where(Job.kind == "erasure", Job.deployment == deployment,
                                                     Job.status.in_(("queued", "running")))
                                   .order_by(Job.created_at))).scalars()
        for job in pending:
            if job.spec.get("user") == user:
                return job
        job = Job(id="erasejob-" + uuid.uuid4().hex[:20], kind="erasure", deployment=deployment, status="queued",
                  spec={"user": user})
        s.add(job)
        s.add(JobEvent(job_id=job.id, type="created", message="erasure queued"))
    return job


async def run_erasure_job(ctx: WorkerContext, job: Job) -> None:
    """Erase the user's data: an `erasing` event and a heartbeat (which carries a cancel) every second or so."""
    from service.core.job_runner import _add_events, _finish, _stop_or_requeue
    from service.worker import heartbeat

    last = time.monotonic()
    cancelled = False

    async def progress(erased: Erased) -> bool:
        nonlocal last, cancelled
        if time.monotonic() - last < 1.0:
            return True
        last = time.monotonic()
        await _add_events(ctx, job.id, [{"type": "erasing", **erased.to_dict(), "message":
                                         f"deleted {erased.completions} completions and {erased.feedback} feedback "
                                         "so far"}])
        cancelled = await heartbeat(ctx.sessions, job.id, ctx.worker_id)
        return not (cancelled or ctx.stopping.is_set())

    user = job.spec["user"]
    erased = await erase_user(ctx.sessions, job.deployment, user, progress=progress)
    result = erased.to_dict()
    if cancelled:  # what was deleted stays deleted: the result says how much
        await _finish(ctx, job.id, status="cancelled", metrics=result)
        await _add_events(ctx, job.id, [{"type": "cancelled", **result, "message": "erasure cancelled"}])
        return
    if ctx.stopping.is_set():  # back to the queue: the next attempt erases the rest
        await _stop_or_requeue(ctx, job.id, False)
        return
    await _finish(ctx, job.id, status="succeeded", metrics=result)
    copies = f"; copies in snapshots {result['snapshots']}, adapters {result['adapters']}" \
        if erased.snapshots or erased.adapters else ""
    await _add_events(ctx, job.id, [{"type": "succeeded", **result, "message":
                                     f"deleted {erased.completions} completions and {erased.feedback} feedback{copies}"}])
    log.info("%s: erased a user's data (%s completions, %s feedback)", job.deployment, erased.completions,
             erased.feedback)
