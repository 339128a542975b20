"""Feedback, datasets, uploads, snapshots and erasures: thin routes over `service.core.feedback` / `datasets` /
`erasure`."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, delete, get, post
from litestar.response import Response as LResponse

from service.api import bodies, responses
from service.api.common import ctx_of, json_body, json_object, limited_body, row_cursor, wants_html
from service.api.openapi import TEXT, operation
from service.auth import admin_scope, app_scope
from service.core import dataset_deletion, snapshot_deletion
from service.core.datasets import checked_curation, dataset_json, snapshot_job_json, snapshot_json
from service.core.erasure import erasure_job_json, queue_erasure
from service.core.feedback import feedback_json
from service.errors import Gone, NotFound, Unprocessable, UnsupportedMediaType

NDJSON_TYPES = {"application/x-ndjson", "application/jsonl", "application/json-lines", "application/ndjson"}


@post("/v1/feedback", guards=[app_scope], status_code=201,
      operation_class=operation(responses.FeedbackIds, bodies.FeedbackBody))
async def post_feedback(request: Request[Any, Any, Any]) -> dict[str, Any]:
    ctx = ctx_of(request)
    body = await json_body(request, ctx.settings.max_request_bytes)
    ids = await ctx.feedback.submit(body, request.headers.get("idempotency-key"))
    return {"object": "list", "ids": ids}


@get("/v1/feedback", guards=[admin_scope], operation_class=operation(responses.FeedbackPage))
async def list_feedback(request: Request[Any, Any, Any], deployment: str | None = None, since: float | None = None,
                        cursor: int | None = None, limit: int = 100) -> dict[str, Any]:
    if not 1 <= limit <= 1000:
        raise Unprocessable("limit must be in 1..1000", field="limit")
    rows, next_cursor = await ctx_of(request).feedback.list(deployment, since, row_cursor(cursor, "cursor"), limit)
    return {"object": "list", "data": [feedback_json(f) for f in rows], "next_cursor": next_cursor,
            "has_more": next_cursor is not None}


@post("/v1/datasets", guards=[admin_scope], status_code=201,
      operation_class=operation(responses.Dataset, bodies.DatasetCreate))
async def create_dataset(request: Request[Any, Any, Any]) -> dict[str, Any]:
    body = await json_object(request, bodies.DatasetCreate)
    return dataset_json(await ctx_of(request).datasets.create(body.get("name"), body.get("deployment")), 0)


@get("/v1/datasets", guards=[admin_scope], operation_class=operation(responses.Page[responses.Dataset]))
async def list_datasets(request: Request[Any, Any, Any], deployment: str | None = None) -> dict[str, Any]:
    return {"object": "list", "data": [dataset_json(d) for d in await ctx_of(request).datasets.list(deployment)]}


@get("/v1/datasets/{dataset_id:str}", guards=[admin_scope], operation_class=operation(responses.Dataset))
async def get_dataset(request: Request[Any, Any, Any], dataset_id: str) -> dict[str, Any]:
    svc = ctx_of(request).datasets
    return dataset_json(await svc.get(dataset_id), await svc.record_count(dataset_id))


@delete("/v1/datasets/{dataset_id:str}", guards=[admin_scope], status_code=200,
        operation_class=operation(responses.Dataset))
async def delete_dataset(request: Request[Any, Any, Any], dataset_id: str) -> dict[str, Any]:
    """Delete a dataset's records (409 naming the job or deployment that uses it); its record stays, marked
    deleted. Snapshots curated from it keep their copy of the rows until they are deleted too."""
    return dataset_json(await dataset_deletion.delete_dataset(ctx_of(request).sessions, dataset_id), 0)


@post("/v1/datasets/{dataset_id:str}/records", guards=[app_scope], status_code=201,
      operation_class=operation(responses.UploadResult, bodies.Upload, body_media_type="application/x-ndjson"))
async def upload_records(request: Request[Any, Any, Any], dataset_id: str, on_error: str = "reject") -> dict[str, Any]:
    ctx = ctx_of(request)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in NDJSON_TYPES:
        raise UnsupportedMediaType(f"upload records as application/x-ndjson (one JSON object per line), got {ctype or 'none'}")
    charset = request.headers.get("content-type", "").lower().partition("charset=")[2].strip()
    if charset and charset not in ("utf-8", "utf8"):
        raise UnsupportedMediaType(f"records must be UTF-8, got charset={charset}")
    body = limited_body(request, ctx.settings.max_upload_bytes)
    await ctx.datasets.get(dataset_id)  # 404 before reading the body
    result = await ctx.datasets.upload(dataset_id, body, on_error)
    return result.to_json()


@post("/v1/datasets/{dataset_id:str}/snapshots", guards=[admin_scope], status_code=202,
      operation_class=operation(responses.SnapshotJob, bodies.SnapshotCreate))
async def create_snapshot(request: Request[Any, Any, Any], dataset_id: str) -> dict[str, Any]:
    """Queue the curation of a snapshot; poll `GET /v1/snapshot_jobs/{id}` for its `snapshot_id`."""
    ctx = ctx_of(request)
    body = await json_object(request, bodies.SnapshotCreate, optional=True)
    dataset = await ctx.datasets.get(dataset_id)
    sources = await ctx.datasets.check_sources(dataset.deployment, [dataset_id], body.get("include_feedback", False),
                                               checked_curation(body.get("curation")))
    return snapshot_job_json(await ctx.datasets.queue_snapshot(sources))


@get("/v1/snapshot_jobs/{job_id:str}", guards=[admin_scope], operation_class=operation(responses.SnapshotJob))
async def get_snapshot_job(request: Request[Any, Any, Any], job_id: str) -> dict[str, Any]:
    return snapshot_job_json(await ctx_of(request).jobs.get(job_id, kind="snapshot"))


@post("/v1/snapshot_jobs/{job_id:str}/cancel", guards=[admin_scope], status_code=200,
      operation_class=operation(responses.SnapshotJob))
async def cancel_snapshot_job(request: Request[Any, Any, Any], job_id: str) -> dict[str, Any]:
    return snapshot_job_json(await ctx_of(request).jobs.cancel(job_id, kind="snapshot"))


@get("/v1/snapshots/{snapshot_id:str}", guards=[admin_scope], operation_class=operation(responses.Snapshot))
async def get_snapshot(request: Request[Any, Any, Any], snapshot_id: str) -> dict[str, Any]:
    return snapshot_json(await ctx_of(request).datasets.get_snapshot(snapshot_id))


@delete("/v1/snapshots/{snapshot_id:str}", guards=[admin_scope], status_code=200,
        operation_class=operation(responses.Snapshot))
async def delete_snapshot(request: Request[Any, Any, Any], snapshot_id: str) -> dict[str, Any]:
    """Delete a snapshot that no job or adapter uses (409 saying which does): its record and JSON report stay,
    its files go from the database now and from each machine after `TUNELOOP_ADAPTER_DELETE_GRACE_SECONDS`."""
    ctx = ctx_of(request)
    return snapshot_json(await snapshot_deletion.delete_snapshot(ctx.sessions, ctx.artifacts, snapshot_id,
                                                                 "deleted via API"))


@get("/v1/snapshots/{snapshot_id:str}/report", guards=[admin_scope],
     operation_class=operation(responses.SnapshotReport, alternatives={"text/html": TEXT}))
async def snapshot_report(request: Request[Any, Any, Any], snapshot_id: str) -> Response[Any]:
    datasets = ctx_of(request).datasets
    snap = await datasets.get_snapshot(snapshot_id)
    if wants_html(request):
        if snap.deleted_at is not None:
            raise Gone(f"snapshot {snap.id} was deleted; its files are gone (the JSON report stays)")
        html = await datasets.snapshot_dir(snap) / "report.html"
        if not html.is_file():
            raise NotFound(f"snapshot {snap.id}'s files are not on this machine and not in the database "
                           "(TUNELOOP_ARTIFACT_STORE=database stores them there for processes on other machines)")
        return LResponse(html.read_text(), media_type="text/html")
    return LResponse({"object": "snapshot.report", "snapshot_id": snap.id, **snap.report})


@post("/v1/erasure_jobs", guards=[admin_scope], status_code=202,
      operation_class=operation(responses.ErasureJob, bodies.ErasureCreate))
async def create_erasure_job(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """Queue the erasure of one user's completions and feedback on a deployment; poll `GET /v1/erasure_jobs/{id}`."""
    body = await json_object(request, bodies.ErasureCreate)
    return erasure_job_json(await queue_erasure(ctx_of(request).sessions, body.get("deployment"), body.get("user")))


@get("/v1/erasure_jobs", guards=[admin_scope], operation_class=operation(responses.Page[responses.ErasureJob]))
async def list_erasure_jobs(request: Request[Any, Any, Any], deployment: str | None = None, after: str | None = None,
                            limit: int = 20) -> dict[str, Any]:
    """The erasures done and pending, newest first: the record an application keeps of its deletion requests."""
    if not 1 <= limit <= 100:
        raise Unprocessable("limit must be in 1..100", field="limit")
    jobs = await ctx_of(request).jobs.list(deployment, after, limit + 1, kind="erasure")
    return {"object": "list", "data": [erasure_job_json(j) for j in jobs[:limit]], "has_more": len(jobs) > limit}


@get("/v1/erasure_jobs/{job_id:str}", guards=[admin_scope], operation_class=operation(responses.ErasureJob))
async def get_erasure_job(request: Request[Any, Any, Any], job_id: str) -> dict[str, Any]:
    return erasure_job_json(await ctx_of(request).jobs.get(job_id, kind="erasure"))


@post("/v1/erasure_jobs/{job_id:str}/cancel", guards=[admin_scope], status_code=200,
      operation_class=operation(responses.ErasureJob))
async def cancel_erasure_job(request: Request[Any, Any, Any], job_id: str) -> dict[str, Any]:
    return erasure_job_json(await ctx_of(request).jobs.cancel(job_id, kind="erasure"))
