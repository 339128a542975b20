"""Shared fixtures: the base model, real databases (SQLite + PostgreSQL), one real vLLM, a running service.

One vLLM server is started per test session (`vllm_supervisor`, from tests/conftest_vllm.py) and the
session-scoped `service` (a real `tuneloop serve` subprocess) points at it with `--vllm-url`.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests import openapi_conformance

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
PG_URL = os.environ.get("TUNELOOP_TEST_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")

pytest_plugins = ["tests.conftest_vllm"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prepare_base_model() -> str:
    from adapters.base_model import BUILTIN_SMOLLM2, prepare_base_model

    return prepare_base_model(BUILTIN_SMOLLM2, ROOT / "var")


def pytest_sessionstart(session: pytest.Session) -> None:
    """Convert the bundled SmolLM2 once, before any fixture (tests/conftest_vllm.py reads ./var/models)."""
    _prepare_base_model()


@pytest.fixture(scope="session")
def base_model_dir() -> str:
    """The bundled SmolLM2, converted once into the repo's ./var (the same place `make run` uses)."""
    return _prepare_base_model()


@pytest.fixture(scope="session")
def banking77_dir() -> Path:
    path = SHARED / "datasets" / "banking77"
    assert path.is_dir(), f"{path} is missing: the shared datasets must sit beside the repository"
    return path


# --- databases ----------------------------------------------------------------------------------------
def _reset_pg() -> None:
    """A clean public schema in the `test` database (the tests own it)."""
    import asyncio

    import asyncpg

    async def reset() -> None:
        conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/test")
        try:
            await conn.execute("DROP SCHEMA IF EXISTS public CASCADE; CREATE SCHEMA public;")
        finally:
            await conn.close()

    asyncio.run(reset())


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'tuneloop.db'}"
    _reset_pg()
    return PG_URL


@pytest.fixture
async def sessions(database_url: str) -> AsyncIterator[object]:
    """A migrated database and its session factory (real SQLite file / real PostgreSQL)."""
    import asyncio

    from service.storage.db import make_engine, make_sessionmaker
    from service.storage.migrate import upgrade

    await asyncio.to_thread(upgrade, database_url)
    engine = make_engine(database_url)
    yield make_sessionmaker(engine)
    await engine.dispose()


# --- a running service --------------------------------------------------------------------------------
@dataclass
class Service:
    url: str
    admin_key: str
    data_dir: Path
    proc: subprocess.Popen[bytes]
    log_path: Path

    def client(self, key: str | None = None, timeout: float = 120.0) -> httpx.Client:
        """A client whose every JSON response is checked against the OpenAPI document (`openapi_conformance`)."""
        return httpx.Client(base_url=self.url, timeout=timeout, event_hooks={"response": [openapi_conformance.check]},
                            headers={"Authorization": f"Bearer {key or self.admin_key}"})

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def make_snapshot(c: httpx.Client, dataset_id: str, body: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """POST a snapshot (202: a worker curates it), wait for its job and return the snapshot."""
    r = c.post(f"/v1/datasets/{dataset_id}/snapshots", json=body)
    assert r.status_code == 202, r.text
    job = r.json()
    deadline = time.monotonic() + timeout
    while job["status"] not in ("succeeded", "failed", "cancelled"):
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
        job = c.get(f"/v1/snapshot_jobs/{job['id']}").json()
    assert job["status"] == "succeeded", job
    return c.get(f"/v1/snapshots/{job['snapshot_id']}").json()  # type: ignore[no-any-return]


def start_service(data_dir: Path, base_model: str, vllm_urls: list[str] | None, *,
                  database_url: str | None = None, env: dict[str, str] | None = None,
                  wait_ready: bool = True, timeout: float = 600.0) -> Service:
    port = free_port()
    admin_key = "tl-test-admin-" + uuid.uuid4().hex
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = data_dir / "serve.log"
    cmd = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--data-dir", str(data_dir),
           "--base-model", base_model]
    for u in vllm_urls or []:
        cmd += ["--vllm-url", u]
    if database_url:
        cmd += ["--database-url", database_url]
    full_env = {**os.environ, "TUNELOOP_ADMIN_KEY": admin_key, **(env or {})}
    with log_path.open("ab") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT)
    svc = Service(f"http://127.0.0.1:{port}", admin_key, data_dir, proc, log_path)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"tuneloop serve exited with {proc.returncode}:\n{svc.log_text()[-4000:]}")
        try:
            r = httpx.get(svc.url + ("/ready" if wait_ready else "/health"), timeout=5)
            if r.status_code == 200:
                return svc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_service(svc)
            raise TimeoutError(f"service not ready in {timeout} s:\n{svc.log_text()[-4000:]}")
        time.sleep(0.5)


def start_worker(data_dir: Path, log: Path, base_model: str, database_url: str, **env: str) -> subprocess.Popen[bytes]:
    """A `tuneloop worker` process with its own data directory (as on a machine of its own)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--data-dir", str(data_dir), "--database-url", database_url,
             "--base-model", base_model], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
            env={**os.environ, "TUNELOOP_HEARTBEAT_SECONDS": "1", **env})


def banking77_sample(banking77_dir: Path, seed: int, n: int, intents: int = 4) -> list[dict[str, Any]]:
    """`n` chat rows of the first `intents` Banking77 intents, in a seeded order: a tiny real training set."""
    from examples.banking77.prepare import read_rows, to_chat

    rows = read_rows(banking77_dir / "train.csv")
    random.Random(seed).shuffle(rows)
    names = sorted({label for _, label in rows})[:intents]
    return [to_chat(text, label) for text, label in rows if label in names][:n]


def stop_service(svc: Service, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
    if svc.proc.poll() is None:
        svc.proc.send_signal(sig)
        try:
            svc.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            svc.proc.kill()
            svc.proc.wait()
    return svc.proc.returncode


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory, base_model_dir: str, vllm_supervisor: object) -> Iterator[Service]:
    """A real `tuneloop serve` on SQLite, in front of the session's real vLLM server."""
    svc = start_service(tmp_path_factory.mktemp("service"), base_model_dir,
                        [vllm_supervisor.base_url],  # type: ignore[attr-defined]
                        env={"TUNELOOP_HEARTBEAT_SECONDS": "1", "TUNELOOP_HEARTBEAT_TIMEOUT_SECONDS": "8"})
    yield svc
    stop_service(svc)
