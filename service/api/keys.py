"""API key management (admin)."""

from __future__ import annotations

from typing import Any

from litestar import Request, post

from service.api import bodies, responses
from service.api.common import ctx_of, json_object
from service.api.openapi import operation
from service.auth import admin_scope


@post("/v1/api-keys", guards=[admin_scope], status_code=201,
      operation_class=operation(responses.ApiKey, bodies.ApiKeyCreate))
async def create_key(request: Request[Any, Any, Any]) -> dict[str, Any]:
    body = await json_object(request, bodies.ApiKeyCreate)
    row, key = await ctx_of(request).keys.create(body.get("name"), body.get("scope", "app"))  # type: ignore[arg-type]
    # The only time the key is ever shown.
    return {"object": "api_key", "id": row.id, "name": row.name, "scope": row.scope, "key": key,
            "created_at": int(row.created_at)}
