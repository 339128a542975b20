"""The periodic monitor of the API process: experiment decisions, job gauges, drift, fairness, triggers.

Fast tick (`experiment_interval_seconds`): experiment decisions, job-state gauges, the newest drift runs, and
removing this machine's files of deleted adapters and snapshots (`service.core.deleted_files`).
Slow tick (`monitor_interval_seconds`), per deployment: queue a drift job (the worker runs it, see
`service.core.drift`), fairness over recent traffic and feedback (fairlearn), the retraining triggers, then
the `keep_adapters` and `keep_snapshots` policies and the pruning of old drift reports.
Every run is stored (`monitor_runs`) and exported to Prometheus.

Where several API processes share the database, decisions (experiments, drift, fairness, triggers) are made
by the one holding the leader lock (`service.core.replicas`); staging, standbys and gauges are per process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from monitoring import metrics
from service.core import adapter_deletion, snapshot_deletion
from service.core.deleted_files import DeletedFiles
from service.core.drift import (
    MIN_ROWS,
    TrafficWindows,
    export_latest_drift,
    prune_drift_reports,
    queue_drift_job,
)
from service.core.replicas import LeaderLock
from service.core.retention import CompletionRetention, prune_monitor_history
from service.storage.models import Completion, Deployment, Evaluation, Feedback, Job, MonitorRun

if TYPE_CHECKING:
    from service.context import AppContext

log = logging.getLogger("tuneloop.monitor")


class Monitor:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.window = ctx.settings.drift_window
        self._fairness_seen: dict[str, int] = {}  # deployment -> newest feedback id of its last fairness run
        retention = ctx.settings.completion_retention_seconds
        self.retention = CompletionRetention(ctx.sessions, TrafficWindows(ctx.sessions, self.window, ctx.artifacts),
                                             ctx.experiments, retention) if retention else None

    async def run(self) -> None:
        self.leader = LeaderLock(self.ctx.engine)
        settings = self.ctx.settings
        deleted_files = DeletedFiles(self.ctx.sessions, self.ctx.artifacts, settings.data_dir,
                                     settings.adapter_delete_grace_seconds)
        last_slow = time.monotonic()
        try:
            while True:
                await asyncio.sleep(self.ctx.settings.experiment_interval_seconds)
                leader = await self._is_leader()
                if leader:
                    await self._safe(self.ctx.experiments.tick())
                await self._safe(self.ctx.serving.stage_passed())
                await self._safe(self.ctx.serving.restore_standby())
                await self._safe(self.job_gauges())
                await self._safe(export_latest_drift(self.ctx.sessions))
                await self._safe(deleted_files.sweep(self.ctx.serving.loaded_adapter_ids))
                if leader and time.monotonic() - last_slow >= self.ctx.settings.monitor_interval_seconds:
                    last_slow = time.monotonic()
                    await self._safe(self.run_all())
        finally:
            await self.leader.release()

    async def _is_leader(self) -> bool:
        try:
            return await self.leader.held()
        except Exception:
            log.exception("the leader lock could not be checked; not deciding in this pass")
            return False

    async def _safe(self, coro: Any) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("monitor step failed")

    async def job_gauges(self) -> None:
        """Training and evaluation metrics from the database (the worker process is not scraped)."""
        async with self.ctx.sessions() as s:
            rows = (await s.execute(select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status))).all()
            evals = (await s.execute(select(Job.deployment, Evaluation.status, func.count())
                                     .join(Job, Job.id == Evaluation.job_id)
                                     .where(Evaluation.status.in_(("passed", "failed")))
                                     .group_by(Job.deployment, Evaluation.status))).all()
            latest = {}
            for job in (await s.execute(select(Job).where(Job.kind == "fine_tune", Job.finished_at.is_not(None))
                                        .order_by(Job.finished_at))).scalars():
                latest[job.deployment] = job
            last_eval = {}
            for dep, result in (await s.execute(select(Job.deployment, Evaluation.result)
                                                .join(Job, Job.id == Evaluation.job_id)
                                                .where(Evaluation.status.in_(("passed", "failed")))
                                                .order_by(Evaluation.finished_at))).all():
                last_eval[dep] = result
        for kind in ("fine_tune", "evaluation"):
            for state in ("queued", "running", "succeeded", "failed", "cancelled"):
                metrics.JOBS.labels(kind, state).set(0)
        for kind, state, n in rows:
            metrics.JOBS.labels(kind, state).set(n)
        # every known label set is exported (zero included) so that increase() sees the first event
        finished = {(k, st): 0 for k in ("fine_tune", "evaluation") for st in ("succeeded", "failed", "cancelled")}
        finished.update({(k, st): n for k, st, n in rows if (k, st) in finished})
        metrics.JOBS_FINISHED.set_all(finished)
        outcomes = {(dep, st): 0 for dep in {d for d, _, _ in evals} | set(latest) for st in ("passed", "failed")}
        outcomes.update({(dep, st): n for dep, st, n in evals})
        metrics.EVALUATIONS.set_all(outcomes)
        for dep, job in latest.items():
            if job.started_at:
                metrics.JOB_DURATION.labels(dep, "fine_tune").set(job.finished_at - job.started_at)
            for split, key in (("train", "last_loss"), ("validation", "last_val_loss")):
                value = (job.metrics or {}).get(key)
                if isinstance(value, int | float):
                    metrics.TRAIN_LOSS.labels(dep, split).set(value)
        for dep, result in last_eval.items():
            task = ((result or {}).get("evaluation") or {}).get("task") or {}
            for model in ("candidate", "reference"):
                for name, value in (task.get(model) or {}).items():
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        metrics.EVALUATION_METRIC.labels(dep, name, model).set(value)

    async def run_all(self) -> None:
        async with self.ctx.sessions() as s:
            deployments = list((await s.execute(select(Deployment.name, Deployment.config))).all())
        for name, config in deployments:
            if await self._new_traffic(name):
                await self._safe(queue_drift_job(self.ctx.sessions, name))
            await self._safe(self.fairness(name))
            await self._safe(self.triggers(name))
            if keep := (config or {}).get("keep_adapters"):
                await self._safe(adapter_deletion.keep_newest(self.ctx.sessions, self.ctx.artifacts, name, int(keep)))
            if keep := (config or {}).get("keep_snapshots"):  # after keep_adapters, which frees snapshots
                await self._safe(snapshot_deletion.keep_newest(self.ctx.sessions, self.ctx.artifacts, name,
                                                               int(keep)))
            await self._safe(prune_drift_reports(self.ctx.sessions, name, self.ctx.settings.drift_reports_kept))
            if self.retention is not None:
                await self._safe(self.retention.prune(name))
            if history := self.ctx.settings.monitor_history_seconds:
                await self._safe(prune_monitor_history(self.ctx.sessions, name, time.time() - history))

    async def _new_traffic(self, deployment: str) -> bool:
        """Drift is worth recomputing once a window's minimum of completions arrived since the last drift job."""
        async with self.ctx.sessions() as s:
            since = (await s.execute(select(func.max(Job.created_at)).where(
                Job.kind == "drift", Job.deployment == deployment))).scalar_one_or_none() or 0.0
            newer = (await s.execute(select(Completion.id).where(
                Completion.deployment == deployment, Completion.created_at > since).limit(MIN_ROWS))).all()
        return len(newer) >= MIN_ROWS

    # -- fairness -----------------------------------------------------------------------------------------
    async def fairness(self, deployment: str) -> dict[str, Any] | None:
        """Fairness over the newest feedback, stored as a run; None when there is too little of it, or none
        newer than this process's last run (the same rows give the same report: no run, no work)."""
        async with self.ctx.sessions() as s:
            rows = (await s.execute(select(Feedback.id, Completion.output, Completion.attributes, Feedback.rating,
                                           Feedback.correction).join(Feedback, Feedback.completion_id == Completion.id)
                                    .where(Completion.deployment == deployment)
                                    .order_by(Feedback.id.desc()).limit(self.window * 4))).all()
        if len(rows) < MIN_ROWS or self._fairness_seen.get(deployment) == rows[0].id:
            return None
        # off the event loop, which serves the gateway meanwhile: the first call imports pandas and fairlearn,
        # a few hundred ms that used to stall every request in flight (benchmarks/README.md, gateway_overhead)
        reports = await asyncio.to_thread(fairness_reports, [tuple(r)[1:] for r in rows])
        self._fairness_seen[deployment] = rows[0].id
        if reports is None:
            return None
        for k, rep in reports.items():
            for g in rep["groups"]:
                if g.get("mean_rating") is not None:
                    metrics.FAIRNESS_GROUP_RATING.labels(deployment, k, str(g["group"])).set(g["mean_rating"])
            for metric, value in rep["gaps"].items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    metrics.FAIRNESS_GAP.labels(deployment, k, metric).set(value)
        data = json.loads(json.dumps({"attributes": reports, "rows": len(rows)}, default=str))
        async with self.ctx.sessions() as s, s.begin():
            s.add(MonitorRun(deployment=deployment, kind="fairness", data=data))
        return data

    # -- retraining triggers ------------------------------------------------------------------------------
    async def triggers(self, deployment: str) -> dict[str, Any] | None:
        """Per-deployment `config.triggers`: {corrections, drift_share, schedule_seconds, job: {...}}.

        Safe to call from several passes and API processes at once: the trigger run is inserted before
        the job is created, naming the run it follows, and that name is unique in the database."""
        async with self.ctx.sessions() as s:
            dep = await s.get(Deployment, deployment)
            cfg = (dep.config or {}).get("triggers") if dep else None
            if not cfg:
                return None
            busy = (await s.execute(select(func.count()).select_from(Job).where(
                Job.deployment == deployment, Job.kind == "fine_tune",
                Job.status.in_(("queued", "running"))))).scalar_one()
            last = (await s.execute(select(MonitorRun).where(MonitorRun.deployment == deployment,
                                                             MonitorRun.kind == "trigger")
                                    .order_by(MonitorRun.id.desc()).limit(1))).scalar_one_or_none()
            last_fb = int((last.data or {}).get("feedback_max_id") or 0) if last else 0
            new_corrections = (await s.execute(select(func.count()).select_from(Feedback).where(
                Feedback.deployment == deployment, Feedback.correction.is_not(None), Feedback.id > last_fb)
            )).scalar_one()
            fb_max = (await s.execute(select(func.max(Feedback.id)).where(Feedback.deployment == deployment)
                                      )).scalar_one() or 0
            drift = (await s.execute(select(MonitorRun).where(MonitorRun.deployment == deployment,
                                                              MonitorRun.kind == "drift")
                                     .order_by(MonitorRun.id.desc()).limit(1))).scalar_one_or_none()
        if busy:
            return None
        reasons = []
        if cfg.get("corrections") and new_corrections >= int(cfg["corrections"]):
            reasons.append(f"{new_corrections} new corrections (threshold {cfg['corrections']})")
        if cfg.get("drift_share") is not None and drift is not None and \
                (drift.created_at > (last.created_at if last else 0)) and \
                drift.data.get("share", 0) >= float(cfg["drift_share"]):
            reasons.append(f"drift share {drift.data['share']:.2f} ≥ {cfg['drift_share']}")
        if cfg.get("schedule_seconds") and time.time() - (last.created_at if last else dep.created_at) \
                >= float(cfg["schedule_seconds"]):
            reasons.append(f"schedule: every {cfg['schedule_seconds']} s")
        if not reasons:
            return None
        body = {"deployment": deployment, "include_feedback": True, **(cfg.get("job") or {})}
        data: dict[str, Any] = {"reasons": reasons, "feedback_max_id": fb_max, "outcome": "pending"}
        run = MonitorRun(deployment=deployment, kind="trigger", data=data, follows=last.id if last else 0)
        try:
            async with self.ctx.sessions() as s, s.begin():
                s.add(run)
        except IntegrityError:
            log.info("%s: another pass fired this trigger first", deployment)
            return None
        try:
            job = await self.ctx.jobs.create(body)
            data["job_id"] = job.id
            outcome = "job_created"
        except Exception as exc:  # noqa: BLE001 - recorded as the trigger's outcome
            data["error"] = str(exc)
            outcome = "failed"
        data["outcome"] = outcome
        async with self.ctx.sessions() as s, s.begin():
            await s.execute(update(MonitorRun).where(MonitorRun.id == run.id).values(data=data))
        for r in reasons:
            metrics.TRIGGERS.labels(deployment, r.split(" ")[0] if not r[0].isdigit() else "corrections").inc()
        log.info("%s: retraining trigger (%s) → %s", deployment, "; ".join(reasons), outcome)
        return data


def fairness_reports(rows: list[tuple[Any, Any, Any, Any]]) -> dict[str, Any] | None:
    """Per attribute, fairlearn's group report over (output, attributes, rating, correction) rows; None when
    the rows carry no attribute. Blocking (imports, pandas, fairlearn): the monitor runs it in a thread."""
    import pandas as pd

    from monitoring.fairness import group_report

    records = [{"output": o, "attributes": a or {}} for o, a, _, _ in rows]
    keys = TrafficWindows.attribute_keys(records)
    if not keys:
        return None
    frame = pd.DataFrame([{
        **{f"attr_{k}": (a or {}).get(k, "(missing)") for k in keys},
        "rating": r, "y_pred": (o or "").strip(),
        # corrections give labels; a positive rating without correction confirms the answer
        "y_true": c.strip() if c else ((o or "").strip() if r is not None and r >= 0.5 else None),
    } for o, a, r, c in rows])
    has_labels = frame["y_true"].notna().sum() >= MIN_ROWS
    return {k: group_report(frame, f"attr_{k}", "y_true" if has_labels else None, "y_pred" if has_labels else None,
                            "rating", 20, None, 5) for k in keys}
