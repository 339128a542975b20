"""Fine-tuning jobs, adapters and evaluations: thin routes over the core services."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from litestar import Request, Response, delete, get, post
from litestar.background_tasks import BackgroundTask
from litestar.response import File, Stream
from sqlalchemy import select

from service.api import bodies, responses
from service.api.common import ctx_of, json_body, json_object, limited_body, row_cursor, wants_html
from service.api.openapi import BINARY, TEXT, operation
from service.auth import admin_scope
from service.core import adapter_deletion
from service.core.datasets import snapshot_job_json
from service.core.drift import drift_job_json
from service.core.erasure import erasure_job_json
from service.core.evaluations import evaluation_json, evaluation_report_json, queue_evaluation
from service.core.jobs import TERMINAL, event_json, job_json
from service.core.serving import history_json
from service.errors import NotFound, Unprocessable, UnsupportedMediaType
from service.storage.models import Adapter


def adapter_json(a: Adapter) -> dict[str, Any]:
    return {"object": "adapter", "id": a.id, "deployment": a.deployment, "version": a.version, "status": a.status,
            "method": a.method, "path": a.path, "base_model": a.base_model, "base_model_hash": a.base_model_hash,
            "job_id": a.job_id, "snapshot_id": a.snapshot_id, "feedback_range": a.feedback_range,
            "hyperparameters": a.hyperparameters, "metrics": a.metrics, "evaluation_id": a.evaluation_id,
            "parent_adapter_id": a.parent_adapter_id, "created_at": int(a.created_at),
            "deleted_at": int(a.deleted_at) if a.deleted_at is not None else None, "deleted_reason": a.deleted_reason}


# --- jobs -------------------------------------------------------------------------------------------------
@post("/v1/fine_tuning/jobs", guards=[admin_scope], status_code=201,
      operation_class=operation(responses.FineTuningJob, bodies.JobCreate))
async def create_job(request: Request[Any, Any, Any]) -> dict[str, Any]:
    return job_json(await ctx_of(request).jobs.create(await json_body(request)))


@get("/v1/fine_tuning/jobs", guards=[admin_scope], operation_class=operation(responses.Page[responses.FineTuningJob]))
async def list_jobs(request: Request[Any, Any, Any], deployment: str | None = None, after: str | None = None,
                    limit: int = 20) -> dict[str, Any]:
    if not 1 <= limit <= 100:
        raise Unprocessable("limit must be in 1..100", field="limit")
    jobs = await ctx_of(request).jobs.list(deployment, after, limit + 1)
    return {"object": "list", "data": [job_json(j) for j in jobs[:limit]], "has_more": len(jobs) > limit}


@get("/v1/fine_tuning/jobs/{job_id:str}", guards=[admin_scope], operation_class=operation(responses.FineTuningJob))
async def get_job(request: Request[Any, Any, Any], job_id: str) -> dict[str, Any]:
    return job_json(await ctx_of(request).jobs.get(job_id))


@post("/v1/fine_tuning/jobs/{job_id:str}/cancel", guards=[admin_scope], status_code=200,
      operation_class=operation(responses.FineTuningJob))
async def cancel_job(request: Request[Any, Any, Any], job_id: str) -> dict[str, Any]:
    return job_json(await ctx_of(request).jobs.cancel(job_id))


@get(["/v1/fine_tuning/jobs/{job_id:str}/events", "/v1/snapshot_jobs/{job_id:str}/events",
      "/v1/monitoring/drift_jobs/{job_id:str}/events", "/v1/erasure_jobs/{job_id:str}/events"], guards=[admin_scope],
     operation_class=operation(responses.Page[responses.JobEvent], alternatives={"text/event-stream": TEXT}))
async def job_events(request: Request[Any, Any, Any], job_id: str, after: int | None = None, limit: int = 1000,
                     stream: bool = False) -> Response[Any]:
    """Events as a JSON list, or as a server-sent event stream (`?stream=true` or `Accept: text/event-stream`)."""
    ctx = ctx_of(request)
    job = await ctx.jobs.get(job_id, kind=(await _kind(ctx, job_id)))
    after = row_cursor(after, "after")
    if stream or "text/event-stream" in request.headers.get("accept", ""):
        async def sse() -> AsyncIterator[bytes]:
            cursor = after
            while True:
                events = await ctx.jobs.events(job.id, cursor, 500)
                for e in events:
                    cursor = e.id
                    yield f"id: {e.id}\nevent: {e.type}\ndata: {json.dumps(event_json(e))}\n\n".encode()
                current = await ctx.jobs.get(job.id, kind=job.kind)
                if current.status in TERMINAL and not events:
                    final = {"snapshot": snapshot_job_json, "drift": drift_job_json,
                             "erasure": erasure_job_json}.get(current.kind, job_json)(current)
                    yield f"event: end\ndata: {json.dumps(final)}\n\n".encode()
                    return
                if not events:
                    await asyncio.sleep(1.0)
        return Stream(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    limit = min(max(limit, 1), 10_000)
    events = await ctx.jobs.events(job.id, after, limit + 1)
    return Response({"object": "list", "data": [event_json(e) for e in events[:limit]],
                     "has_more": len(events) > limit})


async def _kind(ctx: Any, job_id: str) -> str:
    return {"evjob": "evaluation", "snapjob": "snapshot", "driftjob": "drift",
            "erasejob": "erasure"}.get(job_id.split("-")[0], "fine_tune")


@get("/v1/fine_tuning/jobs/{job_id:str}/checkpoints", guards=[admin_scope],
     operation_class=operation(responses.Page[responses.Checkpoint]))
async def job_checkpoints(request: Request[Any, Any, Any], job_id: str) -> dict[str, Any]:
    ctx = ctx_of(request)
    job = await ctx.jobs.get(job_id)
    events = [e for e in await ctx.jobs.events(job.id, None, 10_000) if e.type == "checkpoint"]
    data = [{"object": "fine_tuning.job.checkpoint", "id": f"{job.id}:{e.data.get('step')}", "step_number":
             e.data.get("step"), "path": e.data.get("path"), "metrics": {k: v for k, v in e.data.items()
                                                                         if k not in ("type", "step", "path", "stored")},
             "exists": bool(e.data.get("path")) and Path(str(e.data.get("path"))).exists(),
             "created_at": int(e.created_at)} for e in events]
    return {"object": "list", "data": data}


# --- adapters ---------------------------------------------------------------------------------------------
@get("/v1/adapters", guards=[admin_scope], operation_class=operation(responses.Page[responses.Adapter]))
async def list_adapters(request: Request[Any, Any, Any], deployment: str | None = None) -> dict[str, Any]:
    q = select(Adapter).order_by(Adapter.created_at)
    if deployment:
        q = q.where(Adapter.deployment == deployment)
    async with ctx_of(request).sessions() as s:
        return {"object": "list", "data": [adapter_json(a) for a in (await s.execute(q)).scalars()]}


TAR_TYPES = {"application/x-tar", "application/tar", "application/gzip", "application/x-gzip",
             "application/octet-stream"}


@post("/v1/adapters", guards=[admin_scope], status_code=201,
      operation_class=operation(responses.Adapter, BINARY, body_media_type="application/x-tar"))
async def import_adapter(request: Request[Any, Any, Any], deployment: str) -> dict[str, Any]:
    """Register a LoRA adapter trained elsewhere (a tar of its PEFT folder) as a candidate of `deployment`,
    checked against the base model, and queue its evaluation."""
    ctx = ctx_of(request)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in TAR_TYPES:
        raise UnsupportedMediaType(f"upload the adapter as application/x-tar (gzip allowed), got {ctype or 'none'}")
    adapter = await ctx.archives.import_archive(deployment, limited_body(request, ctx.settings.max_upload_bytes),
                                                ctx.settings.max_upload_bytes)
    await queue_evaluation(ctx.sessions, adapter)
    async with ctx.sessions() as s:
        return adapter_json(await s.get(Adapter, adapter.id))  # type: ignore[arg-type]


@get("/v1/adapters/{adapter_id:str}/archive", guards=[admin_scope],
     operation_class=operation(alternatives={"application/x-tar": BINARY}))
async def export_adapter(request: Request[Any, Any, Any], adapter_id: str) -> File:
    """The adapter's files as a tar under `<adapter id>/`: a PEFT folder any PEFT or vLLM loads."""
    archive = await ctx_of(request).archives.export(adapter_id)
    return File(archive, filename=f"{adapter_id}.tar", media_type="application/x-tar",
                background=BackgroundTask(archive.unlink, missing_ok=True))


@get("/v1/adapters/{adapter_id:str}", guards=[admin_scope], operation_class=operation(responses.Adapter))
async def get_adapter(request: Request[Any, Any, Any], adapter_id: str) -> dict[str, Any]:
    async with ctx_of(request).sessions() as s:
        a = await s.get(Adapter, adapter_id)
    if a is None:
        raise NotFound(f"adapter {adapter_id!r} does not exist")
    return adapter_json(a)


@delete("/v1/adapters/{adapter_id:str}", guards=[admin_scope], status_code=200,
        operation_class=operation(responses.Adapter))
async def delete_adapter(request: Request[Any, Any, Any], adapter_id: str) -> dict[str, Any]:
    """Delete an adapter that nothing uses (409 saying what does): its record stays with status "deleted", its
    files go from the database now and from each machine after `TUNELOOP_ADAPTER_DELETE_GRACE_SECONDS`."""
    ctx = ctx_of(request)
    return adapter_json(await adapter_deletion.delete_adapter(ctx.sessions, ctx.artifacts, adapter_id,
                                                              "deleted via API"))


@post("/v1/adapters/{adapter_id:str}/evaluations", guards=[admin_scope], status_code=201,
      operation_class=operation(responses.Evaluation))
async def request_evaluation(request: Request[Any, Any, Any], adapter_id: str) -> dict[str, Any]:
    return evaluation_json(await ctx_of(request).evaluations.request(adapter_id))


@get("/v1/adapters/{adapter_id:str}/evaluations", guards=[admin_scope],
     operation_class=operation(responses.Page[responses.Evaluation]))
async def adapter_evaluations(request: Request[Any, Any, Any], adapter_id: str) -> dict[str, Any]:
    return {"object": "list", "data": [evaluation_json(e) for e in
                                       await ctx_of(request).evaluations.for_adapter(adapter_id)]}


@get("/v1/evaluations/{evaluation_id:str}", guards=[admin_scope], operation_class=operation(responses.Evaluation))
async def get_evaluation(request: Request[Any, Any, Any], evaluation_id: str) -> dict[str, Any]:
    return evaluation_json(await ctx_of(request).evaluations.get(evaluation_id))


@post("/v1/evaluations/{evaluation_id:str}/cancel", guards=[admin_scope], status_code=200,
      operation_class=operation(responses.Evaluation))
async def cancel_evaluation(request: Request[Any, Any, Any], evaluation_id: str) -> dict[str, Any]:
    return evaluation_json(await ctx_of(request).evaluations.cancel(evaluation_id))


@get("/v1/evaluations/{evaluation_id:str}/report", guards=[admin_scope],
     operation_class=operation(responses.EvaluationReport, alternatives={"text/html": TEXT}))
async def evaluation_report(request: Request[Any, Any, Any], evaluation_id: str) -> Response[Any]:
    ctx = ctx_of(request)
    ev = await ctx.evaluations.get(evaluation_id)
    if ev.status in ("queued", "running"):
        raise NotFound(f"evaluation {evaluation_id} is {ev.status}; the report exists once it has finished",
                       headers={"Retry-After": "30"})
    html_path = (ev.result or {}).get("html_path")
    if html_path:
        html_path = await ctx.artifacts.local(ev.id, html_path)
    if wants_html(request) and html_path and Path(html_path).exists():
        return Response(Path(html_path).read_text(), media_type="text/html")
    return Response(evaluation_report_json(ev))


# --- serving: promote / rollback / history --------------------------------------------------------------
@post("/v1/deployments/{name:str}/promote", guards=[admin_scope], status_code=200,
      operation_class=operation(responses.DeploymentEvent, bodies.Promote))
async def promote(request: Request[Any, Any, Any], name: str) -> dict[str, Any]:
    body = await json_object(request, bodies.Promote)
    if "adapter_id" not in body:
        raise Unprocessable("body must be {adapter_id, force?}", field="adapter_id")
    force = body.get("force", False)
    if not isinstance(force, bool):
        raise Unprocessable("force must be a boolean", field="force")
    event = await ctx_of(request).serving.promote(name, body["adapter_id"], force=force,
                                                  reason=str(body.get("reason", "promoted via API"))[:500])
    return history_json(event)


@post("/v1/deployments/{name:str}/rollback", guards=[admin_scope], status_code=200,
      operation_class=operation(responses.DeploymentEvent))
async def rollback(request: Request[Any, Any, Any], name: str) -> dict[str, Any]:
    return history_json(await ctx_of(request).serving.rollback(name))


@get("/v1/deployments/{name:str}/history", guards=[admin_scope], operation_class=operation(responses.Page[responses.DeploymentEvent]))
async def history(request: Request[Any, Any, Any], name: str) -> dict[str, Any]:
    return {"object": "list", "data": [history_json(e) for e in await ctx_of(request).serving.history(name)]}
