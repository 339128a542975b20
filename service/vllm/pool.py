"""Clients for one or many vLLM OpenAI servers behind the gateway (framework-free).

Why a pool: the embedded default runs one supervised server, a larger deployment points the gateway at
several external replicas (`--vllm-url`). Every replica must hold the same adapters, so adapter
load/unload fans out to all of them, and requests go round-robin to the replicas that are ready.

Two HTTP clients per server, on purpose: every gateway request goes through `VLLMServer.send` (aiohttp),
rare admin calls (adapter load/unload/probe, health, model list) through `client` (httpx). Against an
instant upstream, one request cost 0.64 ms with httpx and 0.30 ms with aiohttp on this CPU, and a profile
of the gateway put over half of its request CPU in httpx/httpcore/anyio (benchmarks/README.md,
gateway_overhead.py): on a 2-core box that CPU is taken from vLLM.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import aiohttp
import httpx

if TYPE_CHECKING:
    from service.vllm.supervisor import VLLMSupervisor

logger = logging.getLogger(__name__)

#: Generation can take minutes on a busy CPU: generous read timeout, short connect timeout.
DEFAULT_TIMEOUT = httpx.Timeout(connect=5.0, read=600.0, write=60.0, pool=60.0)
DEFAULT_LIMITS = httpx.Limits(max_connections=512, max_keepalive_connections=128, keepalive_expiry=60.0)
#: The same bounds for the request path: no overall deadline (a stream may run long), 10 min between bytes.
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5.0, sock_read=600.0)
#: What a failed upstream request raises on the request path (connection refused/reset, read timeout).
TRANSPORT_ERRORS = (aiohttp.ClientError, asyncio.TimeoutError)


class VLLMUnavailable(Exception):
    """No vLLM server can take the request now (starting, restarting, down). Maps to 503 + Retry-After."""

    def __init__(self, message: str = "no vLLM server is ready", retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class VLLMRequestError(Exception):
    """A vLLM server refused or failed an admin call (adapter load/unload/probe)."""

    def __init__(self, base_url: str, action: str, status_code: int | None, detail: str) -> None:
        super().__init__(f"vLLM {base_url}: {action} failed ({status_code or 'no response'}): {detail}")
        self.base_url = base_url
        self.action = action
        self.status_code = status_code
        self.detail = detail


def _error_detail(response: httpx.Response) -> str:
    """vLLM answers {"error": {"message": ...}}; fall back to the raw body."""
    with contextlib.suppress(ValueError, AttributeError, TypeError, KeyError):
        body = response.json()
        error = body.get("error", body)
        return str(error.get("message", error) if isinstance(error, dict) else error)
    return response.text[:500]


class VLLMServer:
    """One vLLM server: its base URL, a keep-alive HTTP client and whether it is ready.

    A supervised server takes readiness from its supervisor (`ready_fn`); an external one from the
    pool's health loop (`healthy`).
    """

    def __init__(
        self,
        base_url: str,
        *,
        ready_fn: Callable[[], bool] | None = None,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        limits: httpx.Limits = DEFAULT_LIMITS,
    ) -> None:
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.client = httpx.AsyncClient(base_url=self.base_url, timeout=timeout, limits=limits)
        self._session: aiohttp.ClientSession | None = None  # made in the event loop, on first use
        self._max_connections = limits.max_connections or 0
        self._ready_fn = ready_fn
        self.healthy = False

    @property
    def supervised(self) -> bool:
        return self._ready_fn is not None

    @property
    def ready(self) -> bool:
        return self._ready_fn() if self._ready_fn is not None else self.healthy

    async def check_health(self, timeout: float = 5.0) -> bool:
        try:
            response = await self.client.get("/health", timeout=timeout)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def post(self, action: str, path: str, payload: dict[str, Any]) -> httpx.Response:
        """POST that turns transport errors into VLLMRequestError (status None)."""
        try:
            return await self.client.post(path, json=payload)
        except httpx.HTTPError as exc:
            raise VLLMRequestError(self.base_url, action, None, f"{type(exc).__name__}: {exc}") from exc

    async def send(self, path: str, payload: dict[str, Any]) -> aiohttp.ClientResponse:
        """POST a request of the gateway; the caller reads the response (whole or as a stream) and must
        `release()` it. Raises one of TRANSPORT_ERRORS when the server cannot be reached."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=60.0)
            self._session = aiohttp.ClientSession(connector=connector, timeout=REQUEST_TIMEOUT, read_bufsize=2**20)
        return await self._session.post(self.base_url + path, json=payload)

    async def aclose(self) -> None:
        await self.client.aclose()
        if self._session is not None:
            await self._session.close()

    def __repr__(self) -> str:
        return f"VLLMServer({self.base_url!r}, ready={self.ready})"


class VLLMPool:
    """Round-robin over ready servers; adapter admin on every server (one lock per adapter name)."""

    def __init__(
        self, urls: Iterable[str] | None = None, *, servers: Iterable[VLLMServer] | None = None
    ) -> None:
        self.servers: list[VLLMServer] = [VLLMServer(u) for u in (urls or ())] + list(servers or ())
        if not self.servers:
            raise ValueError("urls: at least one vLLM server URL is required")
        self._cycle = itertools.count()
        self._adapter_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    @classmethod
    def from_supervisor(cls, supervisor: VLLMSupervisor) -> VLLMPool:
        """A pool of the one supervised server; readiness is the supervisor's (health + on_ready)."""
        return cls(servers=[VLLMServer(supervisor.base_url, ready_fn=lambda: supervisor.ready)])

    @property
    def ready(self) -> bool:
        """All servers are ready (the readiness probe of the service)."""
        return all(s.ready for s in self.servers)

    @property
    def any_ready(self) -> bool:
        return any(s.ready for s in self.servers)

    def pick(self) -> VLLMServer:
        """The next ready server, round-robin; VLLMUnavailable when none is ready."""
        n = len(self.servers)
        start = next(self._cycle)
        for i in range(n):
            server = self.servers[(start + i) % n]
            if server.ready:
                return server
        raise VLLMUnavailable()

    # -- adapters -----------------------------------------------------------------------------
    async def _fan_out(
        self, servers: Iterable[VLLMServer] | None, call: Callable[[VLLMServer], Awaitable[None]]
    ) -> None:
        targets = list(self.servers if servers is None else servers)
        results = await asyncio.gather(*(call(s) for s in targets), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for error in errors[1:]:
            logger.warning("vLLM pool: %s", error)
        if errors:
            raise errors[0]

    async def load_adapter(self, name: str, path: str, servers: Iterable[VLLMServer] | None = None) -> None:
        """Load (or reload in place) a PEFT adapter dir under `name` on every server; raise on any failure.

        `load_inplace` makes it idempotent, so a retry after a partial failure, or a reload after a
        restart, succeeds. Names are versioned, so one name always means one set of weights.
        `servers` limits the call to some servers (e.g. one that just came back).
        """

        async def load(server: VLLMServer) -> None:
            payload = {"lora_name": name, "lora_path": path, "load_inplace": True}
            response = await server.post("load adapter", "/v1/load_lora_adapter", payload)
            if response.status_code != 200:
                raise VLLMRequestError(
                    server.base_url, f"load adapter {name!r}", response.status_code, _error_detail(response)
                )

        async with self._adapter_locks[name]:
            await self._fan_out(servers, load)

    async def unload_adapter(self, name: str, servers: Iterable[VLLMServer] | None = None) -> None:
        """Unload `name` from every server; a server that does not hold it counts as success."""

        async def unload(server: VLLMServer) -> None:
            response = await server.post("unload adapter", "/v1/unload_lora_adapter", {"lora_name": name})
            if response.status_code not in (200, 404):
                raise VLLMRequestError(
                    server.base_url, f"unload adapter {name!r}", response.status_code, _error_detail(response)
                )

        async with self._adapter_locks[name]:
            await self._fan_out(servers, unload)

    async def probe(self, name: str, servers: Iterable[VLLMServer] | None = None) -> None:
        """One 1-token completion with `model=name` on every server: proves the adapter really serves."""

        async def one(server: VLLMServer) -> None:
            payload = {"model": name, "prompt": "Hi", "max_tokens": 1, "temperature": 0.0}
            response = await server.post(f"probe {name!r}", "/v1/completions", payload)
            if response.status_code != 200:
                raise VLLMRequestError(
                    server.base_url, f"probe {name!r}", response.status_code, _error_detail(response)
                )

        await self._fan_out(servers, one)

    async def models(self, server: VLLMServer | None = None) -> list[str]:
        """Model ids one server serves (base + loaded adapters); the first server by default."""
        target = server or self.servers[0]
        try:
            response = await target.client.get("/v1/models")
        except httpx.HTTPError as exc:
            raise VLLMRequestError(target.base_url, "list models", None, str(exc)) from exc
        if response.status_code != 200:
            raise VLLMRequestError(
                target.base_url, "list models", response.status_code, _error_detail(response)
            )
        return [m["id"] for m in response.json().get("data", [])]

    # -- health of external servers -----------------------------------------------------------
    async def check_health(
        self,
        timeout: float = 5.0,
        on_server_ready: Callable[[VLLMServer], Awaitable[None]] | None = None,
    ) -> None:
        """One health round over the unsupervised servers.

        A server that turns healthy is marked ready only after `on_server_ready` succeeded (use it to
        load the routable adapters onto a replica that restarted: `load_adapter(..., servers=[s])`).
        """

        async def one(server: VLLMServer) -> None:
            ok = await server.check_health(timeout)
            if ok and not server.healthy and on_server_ready is not None:
                try:
                    await on_server_ready(server)
                except Exception:
                    logger.exception("vLLM %s: on_server_ready failed; stays not ready", server.base_url)
                    return
            if ok != server.healthy:
                logger.log(
                    logging.INFO if ok else logging.WARNING,
                    "vLLM %s is %s", server.base_url, "ready" if ok else "unhealthy",
                )  # fmt: skip
            server.healthy = ok

        await asyncio.gather(*(one(s) for s in self.servers if not s.supervised))

    async def health_loop(
        self,
        interval: float = 5.0,
        timeout: float = 5.0,
        on_server_ready: Callable[[VLLMServer], Awaitable[None]] | None = None,
    ) -> None:
        """Poll /health of the external servers forever (run it as a task; cancel to stop)."""
        while True:
            await self.check_health(timeout, on_server_ready)
            await asyncio.sleep(interval)

    async def aclose(self) -> None:
        await asyncio.gather(*(s.aclose() for s in self.servers))
