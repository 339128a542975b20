"""The worker process: claims queued jobs from the database and runs them outside the API process.

Claiming is atomic on both databases: PostgreSQL uses `FOR UPDATE SKIP LOCKED`; SQLite serialises writers
(every transaction is BEGIN IMMEDIATE), and the UPDATE re-checks `status = 'queued'`. A running job carries
a heartbeat; a job whose worker died (heartbeat older than the timeout) goes back to the queue and resumes
from its last checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.settings import Settings
from service.storage.artifacts import ArtifactStore
from service.storage.db import make_engine, make_sessionmaker
from service.storage.models import Job

log = logging.getLogger("tuneloop.worker")

Handler = Callable[["WorkerContext", Job], Awaitable[None]]


class WorkerContext:
    def __init__(self, settings: Settings, sessions: async_sessionmaker[AsyncSession], worker_id: str) -> None:
        self.settings = settings
        self.sessions = sessions
        self.worker_id = worker_id
        self.artifacts = ArtifactStore(sessions, settings.data_dir, settings.artifacts_in_database)
        self.stopping = asyncio.Event()


async def claim_job(sessions: async_sessionmaker[AsyncSession], worker_id: str, kinds: tuple[str, ...]) -> Job | None:
    """Atomically move the oldest queued job to `running` for this worker."""
    async with sessions() as s, s.begin():
        q = select(Job.id).where(Job.status == "queued", Job.kind.in_(kinds)).order_by(Job.created_at).limit(1)
        if s.bind.dialect.name == "postgresql":
            q = q.with_for_update(skip_locked=True)
        job_id = (await s.execute(q)).scalar_one_or_none()
        if job_id is None:
            return None
        now = time.time()
        res = await s.execute(update(Job).where(Job.id == job_id, Job.status == "queued").values(
            status="running", worker_id=worker_id, heartbeat_at=now, attempts=Job.attempts + 1))
        if res.rowcount != 1:  # type: ignore[attr-defined]
            return None
        job = await s.get(Job, job_id)
        assert job is not None
        if job.started_at is None:
            job.started_at = now
        return job


async def requeue_stale(sessions: async_sessionmaker[AsyncSession], timeout: float) -> list[str]:
    """Jobs whose worker stopped heartbeating go back to the queue (they resume from their checkpoint)."""
    cutoff = time.time() - timeout
    async with sessions() as s, s.begin():
        ids = list((await s.execute(select(Job.id).where(Job.status == "running", Job.heartbeat_at < cutoff)))
                   .scalars())
        if ids:
            await s.execute(update(Job).where(Job.id.in_(ids), Job.status == "running")
                            .values(status="queued", worker_id=None))
    for i in ids:
        log.warning("job %s lost its worker; re-queued", i)
    return ids


async def heartbeat(sessions: async_sessionmaker[AsyncSession], job_id: str, worker_id: str) -> bool:
    """Refresh the heartbeat; returns True when a cancel was requested."""
    async with sessions() as s, s.begin():
        await s.execute(update(Job).where(Job.id == job_id, Job.worker_id == worker_id)
                        .values(heartbeat_at=time.time()))
        job = await s.get(Job, job_id)
        return bool(job and job.cancel_requested)


def handlers() -> dict[str, Handler]:
    """Job kinds this worker can run (imported lazily: they pull in torch)."""
    try:
        from service.core.drift import run_drift_job
        from service.core.erasure import run_erasure_job
        from service.core.job_runner import run_evaluation_job, run_fine_tune_job, run_snapshot_job
    except ImportError:  # training extras not installed: an idle worker
        return {}
    return {"fine_tune": run_fine_tune_job, "evaluation": run_evaluation_job, "snapshot": run_snapshot_job,
            "drift": run_drift_job, "erasure": run_erasure_job}


# Each lane runs one job at a time; data work (curation, drift, erasure) has its own lane so it never waits behind
# an hour of training.
LANES = (("fine_tune", "evaluation"), ("snapshot", "drift", "erasure"))


async def run_worker(settings: Settings) -> None:
    engine = make_engine(settings.database)
    sessions = make_sessionmaker(engine)
    wid = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    ctx = WorkerContext(settings, sessions, wid)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, ctx.stopping.set)
    table = handlers()
    lanes = [kinds for kinds in (tuple(k for k in lane if k in table) for lane in LANES) if kinds]
    log.info("worker %s started (lanes: %s)", wid, "; ".join(", ".join(k) for k in lanes))
    try:
        await asyncio.gather(*(_lane(ctx, table, kinds) for kinds in lanes), _sweep_deleted(ctx))
    finally:
        await engine.dispose()


async def _sweep_deleted(ctx: WorkerContext) -> None:
    """Remove this machine's files of deleted adapters and snapshots (a worker on a machine of its own has no API process to
    do it), every `monitor_interval_seconds` until the worker stops."""
    from service.core.deleted_files import DeletedFiles

    files = DeletedFiles(ctx.sessions, ctx.artifacts, ctx.settings.data_dir, ctx.settings.adapter_delete_grace_seconds)
    while not ctx.stopping.is_set():
        try:
            await files.sweep()
        except Exception:
            log.exception("removing the files of deleted adapters and snapshots failed; retried at the next pass")
        try:
            await asyncio.wait_for(ctx.stopping.wait(), timeout=ctx.settings.monitor_interval_seconds)
        except TimeoutError:
            pass


async def _lane(ctx: WorkerContext, table: dict[str, Handler], kinds: tuple[str, ...]) -> None:
    """Claim and run jobs of these kinds, one at a time, until the worker stops."""
    settings = ctx.settings
    while not ctx.stopping.is_set():
        await requeue_stale(ctx.sessions, settings.heartbeat_timeout_seconds)
        job = await claim_job(ctx.sessions, ctx.worker_id, kinds)
        if job is None:
            try:
                await asyncio.wait_for(ctx.stopping.wait(), timeout=settings.worker_poll_seconds)
            except TimeoutError:
                pass
            continue
        log.info("worker %s took job %s (%s, attempt %d)", ctx.worker_id, job.id, job.kind, job.attempts)
        await table[job.kind](ctx, job)
