"""Drift, fairness and retraining-trigger history; the latest evidently drift report; drift jobs."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from litestar import Request, Response, get, post
from sqlalchemy import select

from service.api import responses
from service.api.common import ctx_of
from service.api.openapi import TEXT, operation
from service.auth import admin_scope
from service.core.drift import drift_job_json, queue_drift_job
from service.errors import NotFound, Unprocessable
from service.storage.models import Deployment, MonitorRun


async def _runs(request: Request[Any, Any, Any], deployment: str, kind: str, limit: int) -> list[MonitorRun]:
    if not 1 <= limit <= 1000:
        raise Unprocessable("limit must be in 1..1000", field="limit")
    async with ctx_of(request).sessions() as s:
        if await s.get(Deployment, deployment) is None:
            raise NotFound(f"deployment {deployment!r} does not exist", field="deployment")
        return list((await s.execute(select(MonitorRun).where(MonitorRun.deployment == deployment,
                                                              MonitorRun.kind == kind)
                                     .order_by(MonitorRun.id.desc()).limit(limit))).scalars())


def _run_json(r: MonitorRun) -> dict[str, Any]:
    return {"id": r.id, "deployment": r.deployment, "kind": r.kind, "created_at": r.created_at, **(r.data or {})}


@get("/v1/monitoring/drift", guards=[admin_scope], operation_class=operation(responses.Page[responses.MonitorRun]))
async def drift_history(request: Request[Any, Any, Any], deployment: str, limit: int = 50) -> dict[str, Any]:
    return {"object": "list", "data": [_run_json(r) for r in await _runs(request, deployment, "drift", limit)]}


@get("/v1/monitoring/drift/report", guards=[admin_scope], operation_class=operation(alternatives={"text/html": TEXT}))
async def drift_report(request: Request[Any, Any, Any], deployment: str) -> Response[str]:
    artifacts = ctx_of(request).artifacts
    for run in await _runs(request, deployment, "drift", 20):
        path = run.html_path and Path(await artifacts.local(f"drift-{run.id}", run.html_path))
        if path and path.exists():
            return Response(path.read_text(), media_type="text/html")
    raise NotFound(f"no drift report for {deployment} yet (it needs traffic; see GET /v1/monitoring/drift)")


@get("/v1/monitoring/fairness", guards=[admin_scope], operation_class=operation(responses.Page[responses.MonitorRun]))
async def fairness(request: Request[Any, Any, Any], deployment: str, attribute: str | None = None,
                   limit: int = 20) -> dict[str, Any]:
    out = []
    for r in await _runs(request, deployment, "fairness", limit):
        item = _run_json(r)
        if attribute is not None:
            item["attributes"] = {k: v for k, v in item.get("attributes", {}).items() if k == attribute}
        out.append(item)
    return {"object": "list", "data": out}


@get("/v1/monitoring/triggers", guards=[admin_scope], operation_class=operation(responses.Page[responses.MonitorRun]))
async def triggers(request: Request[Any, Any, Any], deployment: str, limit: int = 50) -> dict[str, Any]:
    return {"object": "list", "data": [_run_json(r) for r in await _runs(request, deployment, "trigger", limit)]}


@post("/v1/monitoring/run", guards=[admin_scope], status_code=202,
      operation_class=operation(responses.MonitorAccepted))
async def run_now(request: Request[Any, Any, Any], deployment: str) -> dict[str, Any]:
    """Queue a drift job (the worker runs it) and run fairness and the triggers now, in the background."""
    from service.core.monitor import Monitor

    ctx = ctx_of(request)
    await ctx.deployments.get(deployment)
    job = await queue_drift_job(ctx.sessions, deployment)
    monitor = ctx.extras.setdefault("monitor", Monitor(ctx))

    async def run() -> None:
        await monitor.fairness(deployment)
        await monitor.triggers(deployment)

    task = asyncio.create_task(run())
    ctx.extras.setdefault("background", set()).add(task)
    task.add_done_callback(ctx.extras["background"].discard)
    return {"status": "accepted", "deployment": deployment, "drift_job": drift_job_json(job)}


@get("/v1/monitoring/drift_jobs/{job_id:str}", guards=[admin_scope], operation_class=operation(responses.DriftJob))
async def get_drift_job(request: Request[Any, Any, Any], job_id: str) -> dict[str, Any]:
    return drift_job_json(await ctx_of(request).jobs.get(job_id, kind="drift"))


@post("/v1/monitoring/drift_jobs/{job_id:str}/cancel", guards=[admin_scope], status_code=200,
      operation_class=operation(responses.DriftJob))
async def cancel_drift_job(request: Request[Any, Any, Any], job_id: str) -> dict[str, Any]:
    return drift_job_json(await ctx_of(request).jobs.cancel(job_id, kind="drift"))
