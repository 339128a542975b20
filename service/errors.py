"""One exception hierarchy and one mapper to RFC 9457 problem+json responses.

Domain code raises `ServiceError` subclasses; the Litestar app registers `problem_response` for them and
for Litestar's own HTTP/validation errors, so every error a client sees has the same shape and never a
stack trace.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

log = logging.getLogger("tuneloop.errors")
T = TypeVar("T")
_AT_PATH = re.compile(r" - at `\$\.?(.*)`$")


class ServiceError(Exception):
    status = 500
    title = "Internal Server Error"

    def __init__(self, detail: str, *, field: str | None = None, errors: list[dict[str, Any]] | None = None,
                 headers: dict[str, str] | None = None, extra: dict[str, Any] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.field = field
        self.errors = errors
        self.headers = headers or {}
        self.extra = extra or {}


class BadRequest(ServiceError):
    status, title = 400, "Bad Request"


class Unauthorized(ServiceError):
    status, title = 401, "Unauthorized"

    def __init__(self, detail: str = "missing or invalid API key", **kw: Any) -> None:
        kw.setdefault("headers", {"WWW-Authenticate": "Bearer"})
        super().__init__(detail, **kw)


class Forbidden(ServiceError):
    status, title = 403, "Forbidden"


class NotFound(ServiceError):
    status, title = 404, "Not Found"


class Conflict(ServiceError):
    status, title = 409, "Conflict"


class Gone(ServiceError):
    status, title = 410, "Gone"


class PayloadTooLarge(ServiceError):
    status, title = 413, "Payload Too Large"


class UnsupportedMediaType(ServiceError):
    status, title = 415, "Unsupported Media Type"


class Unprocessable(ServiceError):
    status, title = 422, "Unprocessable Content"


class Unavailable(ServiceError):
    status, title = 503, "Service Unavailable"

    def __init__(self, detail: str, retry_after: int = 5, **kw: Any) -> None:
        kw.setdefault("headers", {"Retry-After": str(retry_after)})
        super().__init__(detail, **kw)


def convert_or_422(value: Any, type_: type[T], field: str) -> T:
    """`msgspec.convert` for a body part handlers check by hand: a wrong type or range is a 422 naming the field
    at fault (`field` plus msgspec's path into it), not a stored value that fails later."""
    try:
        return msgspec.convert(value, type_)
    except msgspec.ValidationError as exc:
        at = _AT_PATH.search(str(exc))
        path = at.group(1).replace("`", "") if at and at.group(1) else ""
        raise Unprocessable(_AT_PATH.sub("", str(exc)), field=f"{field}.{path}" if path else field) from exc


@contextmanager
def fields_under(prefix: str) -> Iterator[None]:
    """Checks of a nested part: a 422 they raise names its field under `prefix` (`config.triggers.job.seed`)."""
    try:
        yield
    except Unprocessable as exc:
        exc.field = f"{prefix}.{exc.field}" if exc.field else prefix
        raise


def _problem(status: int, title: str, detail: str, instance: str, **more: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"type": "about:blank", "title": title, "status": status, "detail": detail,
                            "instance": instance}
    body.update({k: v for k, v in more.items() if v is not None})
    return body


def problem_response(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Map any exception to an application/problem+json response."""
    path = request.url.path
    if isinstance(exc, ServiceError):
        body = _problem(exc.status, exc.title, exc.detail, path, field=exc.field, errors=exc.errors, **exc.extra)
        return Response(body, status_code=exc.status, media_type="application/problem+json", headers=exc.headers)
    if isinstance(exc, ValidationException):
        errors = _validation_errors(exc.extra)
        field = errors[0].get("field") if errors else None
        detail = "; ".join(f"{e.get('field') or 'body'}: {e.get('message')}" for e in errors) or str(exc.detail)
        body = _problem(400 if exc.status_code == 400 else exc.status_code, "Bad Request", detail, path,
                        field=field, errors=errors)
        return Response(body, status_code=body["status"], media_type="application/problem+json")
    if isinstance(exc, HTTPException):
        body = _problem(exc.status_code, _title(exc.status_code), str(exc.detail), path)
        return Response(body, status_code=exc.status_code, media_type="application/problem+json",
                        headers=dict(exc.headers or {}))
    log.exception("unhandled error on %s", path, exc_info=exc)
    body = _problem(500, "Internal Server Error", "an internal error occurred; it has been logged", path)
    return Response(body, status_code=500, media_type="application/problem+json")


def _validation_errors(extra: Any) -> list[dict[str, Any]]:
    out = []
    for item in extra or []:
        if isinstance(item, dict):
            key = item.get("key") or None
            out.append({"field": key, "message": item.get("message", "invalid value")})
        else:
            out.append({"field": None, "message": str(item)})
    return out


def _title(status: int) -> str:
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"
