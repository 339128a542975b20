"""Liveness, readiness and the Prometheus endpoint."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from monitoring.metrics import REGISTRY
from service.api import responses
from service.api.common import ctx_of
from service.api.openapi import TEXT, operation
from service.auth import admin_scope


@get("/health", sync_to_thread=False, operation_class=operation(responses.Health))
def health() -> dict[str, str]:
    return {"status": "ok"}


@get("/ready", operation_class=operation(responses.Ready, also=(503,)))
async def ready(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    ctx = ctx_of(request)
    db_ok = True
    try:
        async with ctx.sessions() as s:
            await s.execute(text("SELECT 1"))
    except Exception:  # noqa: BLE001 - readiness reports, never raises
        db_ok = False
    vllm_ok = ctx.pool.ready
    ok = db_ok and vllm_ok
    body = {"status": "ready" if ok else "not ready", "database": db_ok, "vllm": vllm_ok}
    return Response(body, status_code=200 if ok else 503, headers={} if ok else {"Retry-After": "5"})


_METRICS = operation(alternatives={"text/plain": TEXT})  # the Prometheus text format


async def _metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


metrics_open = get("/metrics", name="metrics", operation_class=_METRICS)(_metrics)
metrics_admin = get("/metrics", name="metrics", guards=[admin_scope], operation_class=_METRICS)(_metrics)
