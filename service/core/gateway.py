"""The OpenAI-compatible gateway: route a request to vLLM, log it durably, return it.

Framework-free: the Litestar route only parses the body and turns `GatewayResponse` / the stream into HTTP.
The request body is passed to vLLM unchanged except `model` (the deployment becomes the served model
name), `metadata` (kept by us as group attributes; vLLM doesn't need it) and, for a deployment with answer
choices, the structured-output constraint that keeps answers to them.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

from monitoring import metrics
from service.core.completion_log import CompletionLog
from service.core.routing import Choice, Router
from service.errors import BadRequest, NotFound, ServiceError, Unavailable, Unprocessable
from service.storage.models import MAX_USER
from service.vllm.pool import TRANSPORT_ERRORS, VLLMPool, VLLMUnavailable

Kind = Literal["chat", "text"]
_PATHS = {"chat": "/v1/chat/completions", "text": "/v1/completions"}
_ID_PREFIX = {"chat": "chatcmpl-", "text": "cmpl-"}
#: Request keys that already constrain the output: a deployment's answer choices then stay out of the way.
_CONSTRAINT_KEYS = ("structured_outputs", "guided_choice", "guided_json", "guided_regex", "guided_grammar",
                    "response_format", "tools")


@dataclass
class GatewayResponse:
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def prompt_hash(prompt: Any) -> str:
    return hashlib.sha256(json.dumps(prompt, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class Gateway:
    def __init__(self, pool: VLLMPool, router: Router, log: CompletionLog, deployments: set[str],
                 answer_choices: dict[str, tuple[str, ...]] | None = None,
                 max_metadata_keys: int = 16, max_metadata_value_chars: int = 128) -> None:
        self.pool = pool
        self.router = router
        self.log = log
        self.deployments = deployments
        self.answer_choices = answer_choices if answer_choices is not None else {}
        self.max_keys = max_metadata_keys
        self.max_chars = max_metadata_value_chars

    # -- validation -------------------------------------------------------------------------------------
    def _validate(self, kind: Kind, body: Any) -> tuple[str, str | None, dict[str, str], Any]:
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise Unprocessable("`model` must be a deployment name", field="model")
        if kind == "chat":
            prompt = body.get("messages")
            if not isinstance(prompt, list) or not prompt or not all(isinstance(m, dict) for m in prompt):
                raise Unprocessable("`messages` must be a non-empty list of message objects", field="messages")
        else:
            prompt = body.get("prompt")
            if not isinstance(prompt, str) or not prompt:
                raise Unprocessable("`prompt` must be a non-empty string", field="prompt")
        user = body.get("user")
        if user is not None and (not isinstance(user, str) or len(user) > MAX_USER):
            raise Unprocessable(f"`user` must be a string of at most {MAX_USER} characters", field="user")
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise Unprocessable("`metadata` must be an object of strings", field="metadata")
        if len(metadata) > self.max_keys:
            raise Unprocessable(f"`metadata` has more than {self.max_keys} keys", field="metadata")
        for k, v in metadata.items():
            if not isinstance(v, str) or len(v) > self.max_chars or len(k) > 64:
                raise Unprocessable(f"metadata values must be strings of at most {self.max_chars} characters "
                                    "and keys at most 64", field=f"metadata.{k}")
        if model not in self.deployments:
            raise NotFound(f"deployment {model!r} does not exist", field="model")
        return model, user, metadata, prompt

    def _route(self, deployment: str, user: str | None) -> Choice:
        if not self.pool.ready:
            raise Unavailable("the model server is starting or restarting; retry shortly")
        choice = self.router.choose(deployment, user)
        if choice is None:
            raise NotFound(f"deployment {deployment!r} does not exist", field="model")
        return choice

    def _row(self, cid: str, kind: Kind, deployment: str, choice: Choice, user: str | None,
             metadata: dict[str, str], prompt: Any, stream: bool) -> dict[str, Any]:
        return {"id": cid, "deployment": deployment, "adapter": choice.target.served_name,
                "adapter_id": choice.target.adapter_id, "experiment_id": choice.experiment_id,
                "variant": choice.variant, "user": user, "attributes": metadata, "kind": kind,
                "prompt": prompt, "prompt_hash": prompt_hash(prompt), "output": "", "finish_reason": None,
                "prompt_tokens": 0, "completion_tokens": 0, "latency_seconds": 0.0, "stream": stream,
                "error": None, "created_at": time.time()}

    def _upstream(self, deployment: str, body: dict[str, Any], served_name: str, stream: bool) -> dict[str, Any]:
        """The body vLLM gets: the served model name, no `metadata`, and the deployment's answer choices
        as a structured-output constraint unless the request brings its own."""
        upstream = {**body, "model": served_name, "stream": stream}
        upstream.pop("metadata", None)
        choices = self.answer_choices.get(deployment)
        if choices and not any(k in body for k in _CONSTRAINT_KEYS):
            upstream["structured_outputs"] = {"choice": list(choices)}
        return upstream

    def _headers(self, choice: Choice, cid: str) -> dict[str, str]:
        h = {"x-tuneloop-adapter": choice.target.served_name, "x-tuneloop-completion-id": cid}
        if choice.variant:
            h["x-tuneloop-variant"] = choice.variant
        return h

    # -- non-streaming ----------------------------------------------------------------------------------
    async def complete(self, kind: Kind, body: dict[str, Any]) -> GatewayResponse:
        start = time.perf_counter()
        deployment, user, metadata, prompt = self._validate(kind, body)
        choice = self._route(deployment, user)
        cid = _ID_PREFIX[kind] + uuid.uuid4().hex
        row = self._row(cid, kind, deployment, choice, user, metadata, prompt, stream=False)
        upstream = self._upstream(deployment, body, choice.target.served_name, stream=False)
        labels = (deployment, choice.target.served_name, choice.variant or "")
        with self.router.track(choice.target.served_name):
            data = await self._post(kind, upstream, labels)
        data["id"] = cid
        data["model"] = deployment
        first = (data.get("choices") or [{}])[0]
        row["output"] = first.get("message", {}).get("content") or "" if kind == "chat" else first.get("text", "")
        row["finish_reason"] = first.get("finish_reason")
        usage = data.get("usage") or {}
        row["prompt_tokens"] = int(usage.get("prompt_tokens") or 0)
        row["completion_tokens"] = int(usage.get("completion_tokens") or 0)
        row["latency_seconds"] = time.perf_counter() - start
        await self.log.write(row)
        self._observe(labels, row)
        return GatewayResponse(json.dumps(data).encode(), self._headers(choice, cid))

    async def _post(self, kind: Kind, upstream: dict[str, Any], labels: tuple[str, str, str]) -> dict[str, Any]:
        try:
            resp = await self.pool.pick().send(_PATHS[kind], upstream)
            try:
                raw = await resp.read()
            finally:
                resp.release()
        except (VLLMUnavailable, *TRANSPORT_ERRORS) as exc:
            metrics.REQUEST_ERRORS.labels(*labels, "unavailable").inc()
            raise Unavailable("the model server is unavailable; retry shortly") from exc
        if resp.status >= 400:
            raise self._upstream_error(resp.status, raw.decode(errors="replace"), labels)
        return json.loads(raw)

    def _upstream_error(self, status: int, text: str, labels: tuple[str, str, str]) -> ServiceError:
        try:
            detail = json.loads(text).get("error", {}).get("message") or text
        except (ValueError, AttributeError):
            detail = text
        if status >= 500 or status == 404:
            # 404: vLLM lost the adapter (restart in progress); anything 5xx: upstream trouble.
            metrics.REQUEST_ERRORS.labels(*labels, "upstream").inc()
            return Unavailable(f"the model server could not answer: {detail[:300]}")
        metrics.REQUEST_ERRORS.labels(*labels, "invalid_request").inc()
        return BadRequest(f"the model server rejected the request: {detail[:500]}")

    def _observe(self, labels: tuple[str, str, str], row: dict[str, Any]) -> None:
        metrics.REQUESTS.labels(*labels, "ok").inc()
        metrics.REQUEST_DURATION.labels(*labels).observe(row["latency_seconds"])
        metrics.TOKENS.labels(*labels, "prompt").inc(row["prompt_tokens"])
        metrics.TOKENS.labels(*labels, "completion").inc(row["completion_tokens"])

    # -- streaming --------------------------------------------------------------------------------------
    async def open_stream(self, kind: Kind, body: dict[str, Any]) -> tuple[AsyncIterator[bytes], dict[str, str]]:
        """Validate, route and open the upstream stream (errors raise here, before any byte is sent)."""
        start = time.perf_counter()
        deployment, user, metadata, prompt = self._validate(kind, body)
        choice = self._route(deployment, user)
        cid = _ID_PREFIX[kind] + uuid.uuid4().hex
        row = self._row(cid, kind, deployment, choice, user, metadata, prompt, stream=True)
        client_wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        upstream = self._upstream(deployment, body, choice.target.served_name, stream=True)
        upstream["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        labels = (deployment, choice.target.served_name, choice.variant or "")
        tracker = self.router.track(choice.target.served_name)
        tracker.__enter__()
        try:
            resp = await self.pool.pick().send(_PATHS[kind], upstream)
            error_body = (await resp.read()).decode(errors="replace") if resp.status >= 400 else None
        except (VLLMUnavailable, *TRANSPORT_ERRORS) as exc:
            tracker.__exit__(None, None, None)
            metrics.REQUEST_ERRORS.labels(*labels, "unavailable").inc()
            raise Unavailable("the model server is unavailable; retry shortly") from exc
        if error_body is not None:
            resp.release()
            tracker.__exit__(None, None, None)
            raise self._upstream_error(resp.status, error_body, labels)

        async def events() -> AsyncIterator[bytes]:
            parts: list[str] = []
            done = False
            try:
                async for raw_line in resp.content:
                    line = raw_line.decode().rstrip("\r\n")
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(payload)
                    chunk["id"] = cid
                    chunk["model"] = deployment
                    for c in chunk.get("choices") or []:
                        piece = (c.get("delta") or {}).get("content") if kind == "chat" else c.get("text")
                        if piece:
                            parts.append(piece)
                        if c.get("finish_reason"):
                            row["finish_reason"] = c["finish_reason"]
                    usage = chunk.get("usage")
                    if usage:
                        row["prompt_tokens"] = int(usage.get("prompt_tokens") or 0)
                        row["completion_tokens"] = int(usage.get("completion_tokens") or 0)
                        if not chunk.get("choices") and not client_wants_usage:
                            continue
                        if not client_wants_usage:
                            chunk.pop("usage", None)
                    yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
                if not done:
                    row["error"] = "upstream stream ended early"
            except TRANSPORT_ERRORS as exc:
                row["error"] = f"upstream stream failed: {exc!r}"
                metrics.REQUEST_ERRORS.labels(*labels, "upstream").inc()
            finally:
                if done:
                    resp.release()  # the connection goes back to the pool
                else:
                    resp.close()  # stops the generation on vLLM (client gone or stream broken)
                tracker.__exit__(None, None, None)
                row["output"] = "".join(parts)
                row["latency_seconds"] = time.perf_counter() - start
                # The log row is committed before the closing [DONE] reaches the client.
                await self.log.write(row)
                if row["error"] is None:
                    self._observe(labels, row)
            if done:
                yield b"data: [DONE]\n\n"

        return events(), self._headers(choice, cid)
