"""The gateway's upstream transport (aiohttp) against a scripted upstream: what reaches the client and the
log when the upstream answers, is unreachable, ends a stream early, or loses its client mid-stream.

The upstream here is a small aiohttp server, not vLLM: these are the failure paths a real vLLM does not
produce on demand. The real-vLLM paths are in tests/integration/test_gateway.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from service.core.gateway import Gateway
from service.core.routing import Router, Target
from service.errors import Unavailable
from service.storage.models import Completion
from service.vllm.pool import VLLMPool, VLLMServer
from service.vllm.supervisor import free_port


class RecordingLog:
    """Stands in for CompletionLog: keeps the rows the gateway commits."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    async def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)


class Upstream:
    """Chat completions: whole, a stream that stops before [DONE], or a slow endless stream."""

    def __init__(self) -> None:
        self.stream_cancelled = asyncio.Event()
        self.bodies: list[dict[str, Any]] = []

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        content = body["messages"][0]["content"]
        if not body.get("stream"):
            return web.json_response({"id": "up-1", "model": body["model"], "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "card_arrival"}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 2}})
        resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {"id": "up-1", "model": body["model"], "choices": [{"index": 0, "delta": {"content": "tok "}}]}
        try:
            for _ in range(2 if content == "cut" else 10_000):
                await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                await asyncio.sleep(0.01)
        except (asyncio.CancelledError, ConnectionResetError):
            self.stream_cancelled.set()
            raise
        if content == "cut":  # the upstream goes away without [DONE]
            assert request.transport is not None
            request.transport.close()
        return resp


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, str]]:
    up = Upstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", up.chat)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield up, f"http://127.0.0.1:{port}"
    await runner.cleanup()


def _gateway(url: str) -> tuple[Gateway, Router, RecordingLog, VLLMPool]:
    router = Router(production={"router": Target("router--adp-1", "adp-1", "/x")})
    log = RecordingLog()
    pool = VLLMPool(servers=[VLLMServer(url, ready_fn=lambda: True)])
    return Gateway(pool, router, log, {"router"}), router, log, pool  # type: ignore[arg-type]


def _body(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "router", "messages": [{"role": "user", "content": content}], "user": "u1", **extra}


async def test_a_whole_answer_is_relabelled_and_logged(upstream) -> None:
    up, url = upstream
    gw, router, log, pool = _gateway(url)
    try:
        result = await gw.complete("chat", _body("hi", metadata={"segment": "retail"}))
    finally:
        await pool.aclose()
    data = json.loads(result.body)
    assert data["model"] == "router" and data["id"].startswith("chatcmpl-") and data["id"] != "up-1"
    assert up.bodies[0]["model"] == "router--adp-1" and "metadata" not in up.bodies[0]
    assert result.headers["x-tuneloop-adapter"] == "router--adp-1"
    (row,) = log.rows
    assert (row["id"], row["output"], row["prompt_tokens"], row["completion_tokens"]) == (data["id"], "card_arrival", 7, 2)
    assert row["attributes"] == {"segment": "retail"} and not router.inflight
    # exactly the table's columns: what SQLite's raw fast path in CompletionLog needs (else it takes the thread)
    assert row.keys() == {c.key for c in Completion.__table__.columns}


async def test_an_unreachable_upstream_is_unavailable_and_logs_nothing() -> None:
    gw, router, log, pool = _gateway(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    try:
        with pytest.raises(Unavailable):
            await gw.complete("chat", _body("hi"))
        with pytest.raises(Unavailable):
            await gw.open_stream("chat", _body("hi", stream=True))
    finally:
        await pool.aclose()
    assert log.rows == [] and not router.inflight


async def test_a_stream_cut_before_done_is_logged_as_an_error(upstream) -> None:
    _, url = upstream
    gw, router, log, pool = _gateway(url)
    try:
        events, _ = await gw.open_stream("chat", _body("cut", stream=True))
        chunks = [c async for c in events]
    finally:
        await pool.aclose()
    assert len(chunks) == 2 and all(c.startswith(b"data: {") for c in chunks)  # no [DONE] is invented
    (row,) = log.rows
    assert row["output"] == "tok tok " and row["error"] is not None and not router.inflight


async def test_a_client_leaving_mid_stream_stops_the_upstream_generation(upstream) -> None:
    up, url = upstream
    gw, router, log, pool = _gateway(url)
    try:
        events, _ = await gw.open_stream("chat", _body("long", stream=True))
        first = await anext(events)
        assert first.startswith(b"data: ") and router.inflight["router--adp-1"] == 1
        await events.aclose()  # what the server does when the client disconnects
        await asyncio.wait_for(up.stream_cancelled.wait(), 10)
    finally:
        await pool.aclose()
    (row,) = log.rows  # what was streamed is still logged
    assert row["output"] == "tok " and not router.inflight
