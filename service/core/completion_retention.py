"""Completion retention: the completion log keeps `TUNELOOP_COMPLETION_RETENTION_DAYS` of traffic.

Every gateway request leaves a row (its prompt, answer and routing), so without a bound the log grows with
traffic forever. The monitor's leader deletes older rows in short batches (on SQLite each batch holds the
write lock the gateway's own commits wait for), except those something still reads:

- completions with feedback: feedback is training data and names its completion;
- completions of an experiment that has not finished, or finished less than the retention ago: a finished
  experiment's statistics are first frozen into it (`ExperimentService.freeze_finished`);
- the drift reference (`TrafficWindows.reference_ids`): the first window of the production target's traffic.

Feedback is accepted only while its completion is younger than the retention less an hour
(`FeedbackService.window`), so a feedback insert never races the delete of its completion.
"""

from __future__ import annotations

import time

from sqlalchemy import delete, exists, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from monitoring import metrics
from service.core.drift import TrafficWindows
from service.core.experiments import ExperimentService
from service.storage.models import Completion, Deployment, Feedback

BATCH = 500


async def prune_completions(sessions: async_sessionmaker[AsyncSession], windows: TrafficWindows,
                            experiments: ExperimentService, deployment: str, retention_seconds: float, *,
                            now: float | None = None, max_batches: int = 100) -> int:
    """Delete the deployment's completions older than the retention that nothing reads; the number deleted.

    At most `max_batches` batches per call: a backlog (a retention just turned on) clears over passes."""
    cutoff = (now if now is not None else time.time()) - retention_seconds
    async with sessions() as s:
        dep = await s.get(Deployment, deployment)
    if dep is None:
        return 0
    frozen = await experiments.freeze_finished(deployment, before=cutoff)
    keep = await windows.reference_ids(dep)
    c = Completion
    no_feedback = ~exists().where(Feedback.completion_id == c.id)
    prunable = select(c.id).where(
        c.deployment == deployment, c.created_at < cutoff, no_feedback,
        or_(c.experiment_id.is_(None), c.experiment_id.in_(frozen)) if frozen else c.experiment_id.is_(None))
    if keep:
        prunable = prunable.where(c.id.not_in(keep))
    deleted = 0
    for _ in range(max_batches):
        async with sessions() as s, s.begin():
            ids = list((await s.execute(prunable.order_by(c.created_at).limit(BATCH))).scalars())
            if ids:  # the feedback check again, in the deleting statement
                deleted += (await s.execute(delete(c).where(c.id.in_(ids), no_feedback))).rowcount
        if len(ids) < BATCH:
            break
    if deleted:
        metrics.COMPLETIONS_PRUNED.labels(deployment).inc(deleted)
    return deleted
