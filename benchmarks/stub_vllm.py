"""A stand-in for vLLM that answers at once: isolates the gateway's own cost (`gateway_overhead.py --stub`).

It serves what `tuneloop serve --vllm-url` touches: `/health`, `/v1/models`, the LoRA load/unload endpoints
and both completion endpoints, whose answers are fixed (a Banking77 label, OpenAI-shaped, with usage). With no
model time in the way, the gateway's added latency and its CPU cost per request are what is left.

    python benchmarks/stub_vllm.py --port 8011
    python benchmarks/stub_vllm.py --port 8011 --delay-ms 200   # answers after vLLM's time, without its load
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aiohttp import web

ANSWER = "card_arrival"
DELAY = web.AppKey("delay_s", float)  # how long a completion takes (--delay-ms)


async def chat(request: web.Request) -> web.Response:
    body = await request.json()
    await asyncio.sleep(request.app[DELAY])
    return web.json_response({
        "id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()), "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}})


async def text(request: web.Request) -> web.Response:
    body = await request.json()
    await asyncio.sleep(request.app[DELAY])
    return web.json_response({
        "id": "cmpl-stub", "object": "text_completion", "created": int(time.time()), "model": body["model"],
        "choices": [{"index": 0, "text": ANSWER, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}})


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "base", "object": "model"}]})


async def ok(request: web.Request) -> web.Response:
    return web.Response(text="")


def app(delay_s: float = 0.0) -> web.Application:
    a = web.Application()
    a[DELAY] = delay_s
    a.router.add_get("/health", ok)
    a.router.add_get("/v1/models", models)
    a.router.add_post("/v1/chat/completions", chat)
    a.router.add_post("/v1/completions", text)
    a.router.add_post("/v1/load_lora_adapter", ok)
    a.router.add_post("/v1/unload_lora_adapter", ok)
    return a


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--delay-ms", type=float, default=0.0, help="answer completions after this long")
    args = p.parse_args()
    if args.delay_ms < 0:
        p.error("--delay-ms must be >= 0")
    web.run_app(app(args.delay_ms / 1000), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
