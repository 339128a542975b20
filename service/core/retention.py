"""Retention by age: what the service records on every request or monitor pass is not kept forever.

Completions: the completion log keeps `TUNELOOP_COMPLETION_RETENTION_DAYS` of traffic (`CompletionRetention`).
Monitor history: fairness runs, drift runs and drift jobs older than `TUNELOOP_MONITOR_HISTORY_DAYS` go
(`prune_monitor_history`).

Every gateway request leaves a row (its prompt, answer and routing), so without a bound the log grows with
traffic forever. The monitor's leader deletes older rows in short batches, each found by a read and deleted in
its own transaction (on SQLite the gateway's commits wait for the write lock it holds), except those something still
reads:

- completions with feedback: feedback is training data and names its completion;
- completions of an experiment that has not finished, or finished less than the retention ago: a finished
  experiment's statistics are first frozen into it (`ExperimentService.freeze_finished`);
- the drift reference (`TrafficWindows.reference_ids`): the first window of the production target's traffic.

Feedback is accepted only while its completion is younger than the retention less an hour
(`FeedbackService.retention`), so a feedback insert never races the delete of its completion.

Kept rows are older than the retention forever (a tenth of the traffic may have feedback), so each deployment's
scan goes on from where the last pass ended instead of reading them all again; it starts over from the oldest
when the process starts, when an experiment is frozen and when the drift reference moves (their rows become
prunable behind the scan).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sqlalchemy import delete, exists, func, or_, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from monitoring import metrics
from service.core.drift import TrafficWindows
from service.core.experiments import ExperimentService
from service.storage.db import make_readonly_sessionmaker, refresh_statistics
from service.storage.models import Completion, Deployment, Experiment, Feedback, Job, JobEvent, MonitorRun

BATCH = 100  # rows per delete: 4 ms of SQLite's write lock here (benchmarks/completion_retention.py)


@dataclass
class _Scan:
    after: tuple[float, str] | None = None  # the last row deleted: the next pass starts there
    reference: list[str] = field(default_factory=list)


class CompletionRetention:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], windows: TrafficWindows,
                 experiments: ExperimentService, retention_seconds: float) -> None:
        self.sessions = sessions
        self.reads = make_readonly_sessionmaker(sessions.kw["bind"])  # on SQLite a read leaves the write lock free
        self.windows = windows
        self.experiments = experiments
        self.retention = retention_seconds
        self._scans: dict[str, _Scan] = {}
        self._analyzed = False

    async def prune(self, deployment: str, *, now: float | None = None, max_batches: int = 100) -> int:
        """Delete the deployment's completions older than the retention that nothing reads; the number deleted.

        At most `max_batches` batches per call: a backlog (a retention just turned on) clears over passes."""
        cutoff = (now if now is not None else time.time()) - self.retention
        async with self.reads() as s:
            dep = await s.get(Deployment, deployment)
            if not self._analyzed:  # PostgreSQL without statistics sorts the whole range for every batch
                await refresh_statistics(s, Completion.__tablename__)
                self._analyzed = True
        if dep is None:
            return 0
        scan = self._scans.setdefault(deployment, _Scan())
        if await self.experiments.freeze_finished(deployment, before=cutoff):  # their rows are behind the scan
            scan.after = None
        keep = await self.windows.reference_ids(dep)
        if keep != scan.reference:
            scan.after, scan.reference = None, keep
        c = Completion
        no_feedback = ~exists().where(Feedback.completion_id == c.id)
        frozen = select(Experiment.id).where(Experiment.deployment == deployment, Experiment.summary.is_not(None))
        prunable = select(c.id, c.created_at).where(
            c.deployment == deployment, c.created_at < cutoff, no_feedback,
            or_(c.experiment_id.is_(None), c.experiment_id.in_(frozen)))
        if keep:
            prunable = prunable.where(c.id.not_in(keep))
        deleted = 0
        for _ in range(max_batches):
            q = prunable if scan.after is None else prunable.where(tuple_(c.created_at, c.id) > scan.after)
            async with self.reads() as s:
                rows = (await s.execute(q.order_by(c.created_at, c.id).limit(BATCH))).all()
            if rows:
                async with self.sessions() as s, s.begin():  # the feedback check again, in the deleting statement
                    deleted += (await s.execute(delete(c).where(c.id.in_([r.id for r in rows]), no_feedback))).rowcount
                scan.after = (rows[-1].created_at, rows[-1].id)
            if len(rows) < BATCH:
                break
        if deleted:
            metrics.COMPLETIONS_PRUNED.labels(deployment).inc(deleted)
        return deleted


async def prune_monitor_history(sessions: async_sessionmaker[AsyncSession], deployment: str, before: float, *,
                                batch: int = 500, max_batches: int = 20) -> dict[str, int]:
    """Delete the deployment's monitor history older than `before`; how many of each went.

    A busy deployment gets a fairness run every monitor pass with new feedback, and a drift job with its events and
    drift run every pass that saw 30 new completions: thousands of rows a day. What goes: fairness runs but the
    newest; drift runs whose HTML report was already pruned (the newest keep theirs: `TUNELOOP_DRIFT_REPORTS_KEPT`);
    finished drift jobs, with their events, but the newest (the monitor measures new traffic from it). Trigger runs
    stay: they are few, and each names the one it follows. In batches, each its own transaction; a backlog clears
    over passes."""
    async with sessions() as s:
        newest_fairness = (await s.execute(select(func.max(MonitorRun.id)).where(
            MonitorRun.deployment == deployment, MonitorRun.kind == "fairness"))).scalar_one_or_none()
        newest_job = (await s.execute(select(func.max(Job.created_at)).where(
            Job.kind == "drift", Job.deployment == deployment))).scalar_one_or_none()
    runs = select(MonitorRun.id).where(
        MonitorRun.deployment == deployment, MonitorRun.created_at < before,
        or_((MonitorRun.kind == "fairness") & (MonitorRun.id != (newest_fairness or 0)),
            (MonitorRun.kind == "drift") & MonitorRun.html_path.is_(None))).limit(batch)
    jobs = select(Job.id).where(Job.kind == "drift", Job.deployment == deployment, Job.finished_at < before,
                                Job.status.in_(("succeeded", "failed", "cancelled")),
                                Job.created_at < (newest_job or 0)).limit(batch)
    deleted = {"monitor_runs": 0, "drift_jobs": 0}
    for _ in range(max_batches):
        async with sessions() as s, s.begin():
            run_ids = list((await s.execute(runs)).scalars())
            job_ids = list((await s.execute(jobs)).scalars())
            if run_ids:
                await s.execute(delete(MonitorRun).where(MonitorRun.id.in_(run_ids)))
            if job_ids:
                await s.execute(delete(JobEvent).where(JobEvent.job_id.in_(job_ids)))
                await s.execute(delete(Job).where(Job.id.in_(job_ids)))
        deleted["monitor_runs"] += len(run_ids)
        deleted["drift_jobs"] += len(job_ids)
        if len(run_ids) < batch and len(job_ids) < batch:
            break
    return deleted
