"""Put the declared request and response types (`bodies`, `responses`) into each route's OpenAPI operation.

Handlers parse their bodies and build their responses themselves, so litestar cannot infer either; a route
names them with `operation_class=operation(...)`. Every operation also documents its errors as problem+json
(`responses.Problem`, what `service.errors.problem_response` sends) instead of litestar's own 400 shape.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from litestar.openapi.spec import Operation, RequestBody
from litestar.openapi.spec.media_type import OpenAPIMediaType
from litestar.openapi.spec.response import OpenAPIResponse

from service.api.responses import Problem

TEXT = {"type": "string"}
BINARY = {"type": "string", "format": "binary"}


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """msgspec's schema with every `$ref` replaced by its definition: litestar rebuilds the document's
    component schemas from its own registry, so references into them would dangle."""
    if isinstance(node, dict):
        if "$ref" in node:
            return _inline(defs[node["$ref"].rsplit("/", 1)[1]], defs)
        return {k: _inline(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


# What the types cannot say, applied to msgspec's definition of that name.
_DEFINITION_FIXES: dict[str, Callable[[dict[str, Any]], Any]] = {
    # `Policy.guardrails` comes from the experiment body's top-level `guardrails`, not from `policy`.
    "Policy": lambda d: d["properties"].pop("guardrails", None),
    "FeedbackItem": lambda d: d.update(anyOf=[{"required": ["rating"]}, {"required": ["correction"]}]),
}


def json_schema(struct_type: Any) -> dict[str, Any]:
    schema = msgspec.json.schema(struct_type)
    defs = schema.pop("$defs", {})
    for name, fix in _DEFINITION_FIXES.items():
        if name in defs:
            fix(defs[name])
    return _inline(schema, defs)  # type: ignore[no-any-return]


def _content(schemas: dict[str, Any]) -> dict[str, OpenAPIMediaType]:
    return {media: OpenAPIMediaType(schema=schema) for media, schema in schemas.items()}  # type: ignore[arg-type]


_ERRORS = {
    "4XX": OpenAPIResponse(description="a client error: problem details naming the field or line at fault",
                           content=_content({"application/problem+json": json_schema(Problem)})),
    "5XX": OpenAPIResponse(description="the service or its model server is unavailable (503 with Retry-After)",
                           content=_content({"application/problem+json": json_schema(Problem)})),
}


def operation(response: Any = None, body: Any = None, *, also: tuple[int, ...] = (),
              body_media_type: str = "application/json", alternatives: dict[str, Any] | None = None) -> type[Operation]:
    """An `operation_class` documenting `body` as the request body, `response` as the JSON answer for the
    route's success status and the statuses in `also` (None: no JSON answer), `alternatives` as other media
    types of that answer (`{"text/html": TEXT}`), and the problem+json errors."""
    content = {"application/json": json_schema(response)} if response is not None else {}
    content.update(alternatives or {})
    success = OpenAPIResponse(description="success", content=_content(content) if content else None)
    request_body = None
    if body is not None:  # a type, or a dict that is the schema itself (BINARY)
        schema = body if isinstance(body, dict) else json_schema(body)
        request_body = RequestBody(content=_content({body_media_type: schema}), required=True)

    @dataclass
    class Documented(Operation):
        def __post_init__(self) -> None:
            codes = [code for code in self.responses or {} if code.startswith("2")]  # the route's status_code
            self.responses = {**_ERRORS, **{code: success for code in (*codes, *map(str, also))}}
            if request_body is not None:
                self.request_body = request_body

    return Documented
