"""Every JSON response a test gets from the real service must match what the OpenAPI document says of it.

`Service.client()` installs `check` as an httpx response hook, so the whole integration suite checks the
documented response schemas (`service/api/responses.py`) against what the handlers really send: a field
renamed in a `*_json` function and not in its declared type fails the test that received it.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import httpx
from jsonschema import Draft202012Validator

JSON_TYPES = ("application/json", "application/problem+json")


@functools.cache
def _document(base_url: str) -> dict[str, Any]:
    return httpx.get(base_url + "/schema/openapi.json", timeout=30).raise_for_status().json()  # type: ignore[no-any-return]


def documented_schema(document: dict[str, Any], method: str, path: str, status: int,
                      media_type: str) -> dict[str, Any] | None:
    """The schema the document gives this response; None for a path the document doesn't have (a 404 route)."""
    op = next((op for template, ops in document["paths"].items() for m, op in ops.items()
               if m == method.lower() and re.fullmatch(re.sub(r"\{[^/]+\}", "[^/]+", template), path)), None)
    if op is None:
        return None
    responses = op["responses"]
    spec = responses.get(str(status)) or responses.get(f"{status // 100}XX") or responses.get("default")
    assert spec is not None, f"{method} {path}: status {status} is not documented ({sorted(responses)})"
    content = spec.get("content") or {}
    assert media_type in content, f"{method} {path} {status}: {media_type} is not documented ({sorted(content)})"
    return content[media_type]["schema"]  # type: ignore[no-any-return]


def violations(document: dict[str, Any], method: str, path: str, status: int, media_type: str,
               body: Any) -> list[str]:
    """What is wrong with this response by the document (empty: it conforms, or the path is not documented)."""
    schema = documented_schema(document, method, path, status, media_type)
    if schema is None:
        return []
    return [f"{list(e.path)}: {e.message}" for e in sorted(Draft202012Validator(schema).iter_errors(body), key=str)]


def check(response: httpx.Response) -> None:
    media_type = response.headers.get("content-type", "").split(";")[0].strip()
    if media_type not in JSON_TYPES:
        return
    request = response.request
    response.read()
    document = _document(f"{request.url.scheme}://{request.url.netloc.decode()}")
    wrong = violations(document, request.method, request.url.path, response.status_code, media_type, response.json())
    assert not wrong, (f"{request.method} {request.url.path} {response.status_code}: the response does not match "
                       f"the documented schema: " + "; ".join(wrong[:5]))
