"""Data drift of a deployment's traffic, as a worker job (kind `drift`, ids `driftjob-...`).

The API's monitor queues one per deployment on each slow tick, and `POST /v1/monitoring/run` queues one at
once. The worker loads the two windows of traffic, runs evidently in a child process (killed on cancel, so
a cancel takes effect within a heartbeat), stores a `MonitorRun` with the HTML report, and reports every
stage as a job event. The worker is not scraped: the API exports each deployment's newest drift run.

Reference window: the first window of traffic served by the current production target (after its
promotion); without enough of it, the production adapter's training snapshot (its prompts and answers);
without a production adapter, the deployment's first window of traffic. Current: the last window.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters.evaluation.metrics import is_label_like
from monitoring import metrics
from service.storage.artifacts import ArtifactStore
from service.storage.models import (
    Adapter,
    Completion,
    Deployment,
    DeploymentEvent,
    Feedback,
    Job,
    JobEvent,
    MonitorRun,
    Snapshot,
)

if TYPE_CHECKING:
    from service.worker import WorkerContext

log = logging.getLogger("tuneloop.drift")
MIN_ROWS = 30


def last_user(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt or [] if isinstance(m, dict) and m.get("role") == "user"]
    return str(users[-1]) if users else ""


class TrafficWindows:
    """Windows of a deployment's logged traffic (prompt, answer, attributes, rating), as drift and fairness
    read them."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], window: int, artifacts: ArtifactStore) -> None:
        self.sessions = sessions
        self.window = window
        self.artifacts = artifacts

    def _window(self, deployment: str, *, newest: bool, since: float | None = None,
                adapter: str | None = None) -> Any:
        """The query of a window's completions (successful ones, oldest or newest first)."""
        q = select(Completion.id, Completion.prompt, Completion.output, Completion.attributes, Completion.adapter) \
            .where(Completion.deployment == deployment, Completion.error.is_(None))
        if since is not None:
            q = q.where(Completion.created_at >= since)
        if adapter is not None:
            q = q.where(Completion.adapter_id == adapter)
        return q.order_by(Completion.created_at.desc() if newest else Completion.created_at).limit(self.window)

    async def records(self, deployment: str, *, newest: bool, since: float | None = None,
                      adapter: str | None = None) -> list[dict[str, Any]]:
        async with self.sessions() as s:
            rows = (await s.execute(self._window(deployment, newest=newest, since=since, adapter=adapter))).all()
            ratings = dict((await s.execute(select(Feedback.completion_id, Feedback.rating).where(
                Feedback.completion_id.in_([r.id for r in rows]), Feedback.rating.is_not(None)))).all())
        return [{"prompt": last_user(r.prompt), "output": r.output, "attributes": r.attributes or {},
                 "rating": ratings.get(r.id)} for r in rows]

    async def _promoted_at(self, s: AsyncSession, dep: Deployment) -> float | None:
        return (await s.execute(select(func.max(DeploymentEvent.created_at)).where(
            DeploymentEvent.deployment == dep.name,
            DeploymentEvent.adapter_id == dep.production_adapter_id))).scalar_one_or_none()

    async def reference(self, dep: Deployment) -> tuple[list[dict[str, Any]], str]:
        if dep.production_adapter_id:
            async with self.sessions() as s:
                promoted = await self._promoted_at(s, dep)
                adapter = await s.get(Adapter, dep.production_adapter_id)
                snap = await s.get(Snapshot, adapter.snapshot_id) if adapter and adapter.snapshot_id else None
            first = await self.records(dep.name, newest=False, since=promoted, adapter=dep.production_adapter_id)
            if len(first) >= MIN_ROWS:
                return first, "first traffic window after promotion"
            if snap is not None:
                rows = []
                with (Path(await self.artifacts.local(snap.id, snap.path)) / "train.jsonl").open() as f:
                    for line in f:
                        r = json.loads(line)
                        rows.append({"prompt": last_user(r.get("prompt")), "output": r.get("completion") or
                                     r.get("chosen") or "", "attributes": r.get("attributes") or {}})
                        if len(rows) >= self.window:
                            break
                return rows, "training snapshot of the production adapter"
        return await self.records(dep.name, newest=False), "first traffic window"

    async def reference_ids(self, dep: Deployment) -> list[str]:
        """The completions the traffic reference is made of, or will be once it fills: completion retention
        keeps them, so the reference stays the same rows however old they get."""
        async with self.sessions() as s:
            if dep.production_adapter_id:
                q = self._window(dep.name, newest=False, since=await self._promoted_at(s, dep),
                                 adapter=dep.production_adapter_id)
            else:
                q = self._window(dep.name, newest=False)
            return list((await s.execute(select(q.subquery().c.id))).scalars())

    @staticmethod
    def attribute_keys(records: list[dict[str, Any]], max_cardinality: int = 20) -> list[str]:
        values: dict[str, set[str]] = {}
        for r in records:
            for k, v in (r.get("attributes") or {}).items():
                values.setdefault(k, set()).add(v)
        return sorted(k for k, v in values.items() if 2 <= len(v) <= max_cardinality)


def _compute(reference: list[dict[str, Any]], current: list[dict[str, Any]], attribute_keys: list[str],
             html: bool) -> dict[str, Any]:
    """Runs in the worker's child process (evidently is imported once there)."""
    import os

    os.environ.setdefault("DO_NOT_TRACK", "1")
    from monitoring.drift import DriftSpec, compute_drift, traffic_frame

    ref, cur = traffic_frame(reference, attribute_keys), traffic_frame(current, attribute_keys)
    note = None
    try:
        result = compute_drift(ref, cur, DriftSpec.default(attribute_keys, render_html=html))
    except ValueError as exc:
        # Degenerate prompt text (e.g. one repeated prompt) leaves the text classifier no vocabulary:
        # report the other features rather than nothing.
        note = f"text drift skipped: {exc}"
        result = compute_drift(ref, cur, DriftSpec.default(attribute_keys, render_html=html, text=()))
    return {**result.as_dict(), "html": result.html, "note": note}


# --- the job -------------------------------------------------------------------------------------------------
def drift_job_json(j: Job) -> dict[str, Any]:
    return {"object": "drift.job", "id": j.id, "status": j.status, "deployment": j.deployment,
            "result": j.metrics or None, "error": j.error, "created_at": int(j.created_at),
            "started_at": None if j.started_at is None else int(j.started_at),
            "finished_at": None if j.finished_at is None else int(j.finished_at), "attempts": j.attempts}


async def queue_drift_job(sessions: async_sessionmaker[AsyncSession], deployment: str) -> Job:
    """A drift job for the deployment: the one already queued or running, else a new one."""
    async with sessions() as s, s.begin():
        pending = (await s.execute(select(Job).where(Job.kind == "drift", Job.deployment == deployment,
                                                     Job.status.in_(("queued", "running")))
                                   .order_by(Job.created_at).limit(1))).scalar_one_or_none()
        if pending is not None:
            return pending
        job = Job(id="driftjob-" + uuid.uuid4().hex[:20], kind="drift", deployment=deployment, status="queued")
        s.add(job)
        s.add(JobEvent(job_id=job.id, type="created", message="drift job queued"))
    return job


_pool: ProcessPoolExecutor | None = None  # one child per worker; replaced after a cancel kills it


def _kill_pool() -> None:
    global _pool
    if _pool is not None:
        for proc in list(getattr(_pool, "_processes", {}).values()):
            proc.kill()
        _pool.shutdown(wait=False, cancel_futures=True)
        _pool = None


async def run_drift_job(ctx: WorkerContext, job: Job) -> None:
    """Load both windows, compute drift in the child process (heartbeats; a cancel kills it), store the run."""
    global _pool
    from service.core.job_runner import _add_events, _finish, _stop_or_requeue
    from service.worker import heartbeat

    async def finish(status: str, result: dict[str, Any], message: str) -> None:
        await _finish(ctx, job.id, status=status, metrics=result)
        await _add_events(ctx, job.id, [{"type": status, "message": message, **result}])

    windows = TrafficWindows(ctx.sessions, ctx.settings.drift_window, ctx.artifacts)
    async with ctx.sessions() as s:
        dep = await s.get(Deployment, job.deployment)
    if dep is None:
        await _finish(ctx, job.id, status="failed", error={"message": f"deployment {job.deployment} is gone"})
        return
    reference, source = await windows.reference(dep)
    current = await windows.records(dep.name, newest=True)
    sizes = {"reference_rows": len(reference), "current_rows": len(current), "reference_source": source}
    await _add_events(ctx, job.id, [{"type": "windows", **sizes, "message":
                                     f"reference: {len(reference)} rows ({source}); current: {len(current)} rows"}])
    if len(reference) < MIN_ROWS or len(current) < MIN_ROWS:
        await finish("succeeded", {**sizes, "skipped": f"each window needs at least {MIN_ROWS} rows"},
                     f"skipped: each window needs at least {MIN_ROWS} rows")
        return
    label_like = is_label_like([str(r.get("output") or "") for r in reference])
    for r in reference + current:
        r["label"] = str(r.get("output") or "").strip() if label_like else None
    keys = windows.attribute_keys(reference + current)
    await _add_events(ctx, job.id, [{"type": "computing", "attributes": keys,
                                     "message": f"evidently: text, lengths, {'labels, ' if label_like else ''}"
                                                f"attributes {keys or '(none)'}"}])
    if _pool is None:
        _pool = ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"))
    future = asyncio.wrap_future(_pool.submit(_compute, reference, current, keys, True))
    while not future.done():
        cancel = await heartbeat(ctx.sessions, job.id, ctx.worker_id)
        if cancel or ctx.stopping.is_set():
            _kill_pool()
            future.cancel()
            await _stop_or_requeue(ctx, job.id, cancel)
            return
        await asyncio.wait({future}, timeout=ctx.settings.heartbeat_seconds)
    try:
        result = future.result()
    except Exception as exc:  # the job fails with the reason; the worker carries on
        log.exception("drift job %s failed", job.id)
        await _finish(ctx, job.id, status="failed", error={"message": str(exc), "code": "drift_error"})
        return
    html = result.pop("html", None)
    html_path = None
    if html:
        out = ctx.settings.data_dir / "drift" / dep.name
        out.mkdir(parents=True, exist_ok=True)
        html_path = str(out / f"{int(time.time())}-{job.id}.html")
        Path(html_path).write_text(html)
    result["reference_source"] = source
    run = MonitorRun(deployment=dep.name, kind="drift", data=result, html_path=html_path)
    async with ctx.sessions() as s, s.begin():
        s.add(run)
        if html_path:
            await s.flush()  # the run's id names its report
            await ctx.artifacts.add(s, f"drift-{run.id}", Path(html_path))
    drifted = [f["feature"] for f in result["features"] if f["drifted"]]
    await finish("succeeded", {**sizes, "monitor_run_id": run.id, "share": result["share"], "drifted": drifted},
                 f"drift share {result['share']:.2f}; drifted: {', '.join(drifted) or 'none'}")


async def prune_drift_reports(sessions: async_sessionmaker[AsyncSession], deployment: str, keep: int) -> list[int]:
    """Drop the HTML reports of all but the newest `keep` drift runs of `deployment` (run by the monitor's leader):
    evidently writes several MB per run, and a busy deployment gets a run per monitor pass. The runs' numbers stay
    (`GET /v1/monitoring/drift`); the database's copy goes now, each machine's files with its `DeletedFiles` sweep.
    Returns the ids of the runs pruned."""
    async with sessions() as s, s.begin():
        ids = list((await s.execute(select(MonitorRun.id).where(
            MonitorRun.deployment == deployment, MonitorRun.kind == "drift", MonitorRun.html_path.is_not(None))
            .order_by(MonitorRun.id.desc()).offset(keep))).scalars())
        for run_id in ids:
            await ArtifactStore.remove(s, f"drift-{run_id}")
        if ids:
            await s.execute(update(MonitorRun).where(MonitorRun.id.in_(ids)).values(html_path=None))
    return ids


# --- Prometheus (API process) --------------------------------------------------------------------------------
async def export_latest_drift(sessions: async_sessionmaker[AsyncSession]) -> None:
    """Each deployment's newest drift run as gauges."""
    newest = select(func.max(MonitorRun.id)).where(MonitorRun.kind == "drift").group_by(MonitorRun.deployment)
    async with sessions() as s:
        runs = list((await s.execute(select(MonitorRun).where(MonitorRun.id.in_(newest)))).scalars())
    for run in runs:
        data = run.data or {}
        for f in data.get("features", []):
            if f.get("score") is not None:
                metrics.DRIFT_SCORE.labels(run.deployment, f["feature"], f["method"]).set(f["score"])
                metrics.DRIFT_DETECTED.labels(run.deployment, f["feature"]).set(1 if f["drifted"] else 0)
        if isinstance(data.get("share"), int | float):
            metrics.DRIFT_SHARE.labels(run.deployment).set(data["share"])
