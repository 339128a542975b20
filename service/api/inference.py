"""OpenAI-compatible inference routes: thin wrappers over `service.core.gateway.Gateway`."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get, post
from litestar.response import Stream

from service.api import bodies, responses
from service.api.common import ctx_of, json_body
from service.api.openapi import TEXT, operation
from service.auth import admin_scope, app_scope
from service.errors import NotFound
from service.storage.models import Completion

SSE = {"text/event-stream": TEXT}  # `"stream": true`: OpenAI-style chunks, then `data: [DONE]`


async def _serve(request: Request[Any, Any, Any], kind: str) -> Response[Any]:
    ctx = ctx_of(request)
    body = await json_body(request, ctx.settings.max_request_bytes)
    if isinstance(body, dict) and body.get("stream"):
        events, headers = await ctx.gateway.open_stream(kind, body)  # type: ignore[arg-type]
        return Stream(events, media_type="text/event-stream",
                      headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    result = await ctx.gateway.complete(kind, body)  # type: ignore[arg-type]
    return Response(result.body, media_type="application/json", headers=result.headers)


@post("/v1/chat/completions", guards=[app_scope], status_code=200,
      operation_class=operation(responses.ChatCompletion, bodies.ChatCompletionRequest, alternatives=SSE))
async def chat_completions(request: Request[Any, Any, Any]) -> Response[Any]:
    return await _serve(request, "chat")


@post("/v1/completions", guards=[app_scope], status_code=200,
      operation_class=operation(responses.TextCompletion, bodies.CompletionRequest, alternatives=SSE))
async def completions(request: Request[Any, Any, Any]) -> Response[Any]:
    return await _serve(request, "text")


@get("/v1/models", guards=[app_scope], operation_class=operation(responses.Page[responses.Model]))
async def list_models(request: Request[Any, Any, Any]) -> dict[str, Any]:
    deps = await ctx_of(request).deployments.list()
    return {"object": "list", "data": [{"id": d.name, "object": "model", "created": int(d.created_at),
                                        "owned_by": "tuneloop"} for d in deps]}


def completion_json(c: Completion) -> dict[str, Any]:
    return {"object": "completion.log", "id": c.id, "deployment": c.deployment, "adapter": c.adapter,
            "adapter_id": c.adapter_id, "experiment_id": c.experiment_id, "variant": c.variant, "user": c.user,
            "metadata": c.attributes, "kind": c.kind,
            ("messages" if c.kind == "chat" else "prompt"): c.prompt, "output": c.output,
            "finish_reason": c.finish_reason, "usage": {"prompt_tokens": c.prompt_tokens,
                                                        "completion_tokens": c.completion_tokens,
                                                        "total_tokens": c.prompt_tokens + c.completion_tokens},
            "latency_seconds": c.latency_seconds, "stream": c.stream, "error": c.error,
            "created_at": int(c.created_at)}


@get("/v1/completions/{completion_id:str}", guards=[admin_scope], operation_class=operation(responses.CompletionLog))
async def get_completion(request: Request[Any, Any, Any], completion_id: str) -> dict[str, Any]:
    async with ctx_of(request).sessions() as s:
        c = await s.get(Completion, completion_id)
    if c is None:
        raise NotFound(f"completion {completion_id!r} does not exist")
    return completion_json(c)
