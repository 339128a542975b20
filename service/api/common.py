"""Helpers shared by the thin route modules."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from litestar import Request

from service.context import AppContext
from service.errors import BadRequest, PayloadTooLarge, Unprocessable, UnsupportedMediaType

MAX_ROW_ID = 2**63 - 1  # SQLite's and PostgreSQL's largest integer key


def ctx_of(request: Request[Any, Any, Any]) -> AppContext:
    return request.app.state.ctx  # type: ignore[no-any-return]


async def json_body(request: Request[Any, Any, Any], max_bytes: int | None = None) -> Any:
    """Parse a JSON body ourselves: one clear problem response for bad JSON or content type."""
    ctype = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if ctype and ctype != "application/json" and not ctype.endswith("+json"):
        raise UnsupportedMediaType(f"expected application/json, got {ctype}")
    raw = await request.body()
    if max_bytes is not None and len(raw) > max_bytes:
        raise PayloadTooLarge(f"request body exceeds {max_bytes} bytes")
    try:
        body = json.loads(raw or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        line = getattr(exc, "lineno", None)
        raise BadRequest(f"the body is not valid JSON: {exc}", extra={"line": line}) from exc
    if (at := nul_at(body)) is not None:
        raise Unprocessable(NUL_MESSAGE, field=at or None)
    return body


def limited_body(request: Request[Any, Any, Any], limit: int) -> AsyncIterator[bytes]:
    """The streamed body, refused with 413 as soon as it passes `limit` bytes (or declares more up front)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the upload is larger than the limit of {limit} bytes")

    async def chunks() -> AsyncIterator[bytes]:
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                raise PayloadTooLarge(f"the upload is larger than the limit of {limit} bytes")
            yield chunk

    return chunks()


NUL_MESSAGE = "text must not contain the NUL character (U+0000): PostgreSQL cannot store it"


def nul_at(value: Any, path: str = "") -> str | None:
    """The path of the first string (or key) holding U+0000, else None: checked once at the edge so that
    no NUL reaches a database that cannot store it (a 500 on PostgreSQL, found by schemathesis)."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            if "\x00" in k or (sub := nul_at(v, sub)) is not None:
                return sub
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if (sub := nul_at(v, f"{path}[{i}]")) is not None:
                return sub
    return None


async def reject_nul_parameters(request: Request[Any, Any, Any]) -> None:
    """`before_request` of the app: a path or query parameter holding U+0000 is a 422 naming it. Async though it
    awaits nothing: Litestar runs a sync hook in a worker thread, a thread hop on every request."""
    for name, value in [*request.path_params.items(), *request.query_params.items()]:
        if isinstance(value, str) and "\x00" in value:
            raise Unprocessable(NUL_MESSAGE, field=name)


async def json_object(request: Request[Any, Any, Any], body_type: Any, *, optional: bool = False) -> dict[str, Any]:
    """A JSON object body with only the fields `body_type` (a `service.api.bodies` Struct, the OpenAPI
    document's description of it) declares: anything else is a 422 naming the first unknown field."""
    body = await json_body(request)
    if body is None and optional:
        return {}
    fields = body_type.__struct_fields__
    if not isinstance(body, dict):
        raise Unprocessable(f"body must be an object with fields {', '.join(fields)}")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise Unprocessable(f"unknown field(s): {', '.join(unknown)}", field=unknown[0])
    return body


def row_cursor(value: int | None, field: str) -> int | None:
    """A pagination cursor (a row id) the database can compare: a 422 naming the field, not an overflow."""
    if value is not None and not 0 <= value <= MAX_ROW_ID:
        raise Unprocessable(f"{field} must be a row id in 0..{MAX_ROW_ID}", field=field)
    return value


def wants_html(request: Request[Any, Any, Any]) -> bool:
    """Content negotiation for reports: HTML only when the client prefers it over JSON."""
    accept = request.headers.get("accept", "")
    html, json_ = accept.find("text/html"), accept.find("application/json")
    return html >= 0 and (json_ < 0 or html < json_)
