"""A training job's newest checkpoint, kept in the artifact store so that any machine's worker resumes it.

A job whose worker died goes back to the queue (heartbeat timeout) and resumes from its last checkpoint, which
the trainer wrote under `<data>/jobs/<job>/output` of the machine that ran it. With the artifact store on (the
default on PostgreSQL), the worker also stores the checkpoints it is told of in the database (at most one a
minute, `Storer`), each replacing the one before (`ckpt-<job id>`: adapter weights, optimizer, scheduler and RNG
state), and a worker that takes the job up on a machine without the files fetches that one into the same place
first. It is dropped when the job ends.

A hyperparameter search resumes from its Optuna study (the trials it finished) and the best trial's adapter, not
from a trainer's checkpoint: the worker stores those (`store_search`, under the same id) as each trial starts,
when the trials before it are final in the study, so a resume elsewhere repeats at most the trial in progress.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession

from service.storage.artifacts import ArtifactStore
from service.storage.models import Job, JobEvent

if TYPE_CHECKING:
    from service.worker import WorkerContext

log = logging.getLogger("tuneloop.jobs")
SEARCH_STATE = "search-state"  # what a stored search state is named in the job's checkpoint events


def artifact_id(job_id: str) -> str:
    return f"ckpt-{job_id}"


class Storer:
    """Stores a job's checkpoints as the trainer reports them, but not more often than every
    `MIN_INTERVAL_SECONDS` nor for more than 1/20 of the time: storing competes with training for the same CPU
    (every checkpoint of a short job cost it 9 % here, `benchmarks/checkpoint_store.py`), and a resume elsewhere
    repeats at most about that much training."""

    MIN_INTERVAL_SECONDS = 60.0

    def __init__(self, ctx: WorkerContext, job: Job, output_dir: Path) -> None:
        self.ctx, self.job, self.output_dir = ctx, job, output_dir
        self.on = ctx.artifacts.store
        self.search = bool(job.spec.get("search"))
        self.next_at = 0.0  # the first checkpoint is always stored

    async def offer(self, event: dict[str, Any]) -> None:
        """A trainer's event: a `checkpoint` (stored, throttled), or in a search the start of a trial after
        the first (the search state stored)."""
        if not self.on:
            return
        if self.search:
            if event.get("type") == "trial" and event.get("state") == "running" and event.get("number"):
                await store_search(self.ctx, self.job, self.output_dir, event)
            return
        if event.get("type") != "checkpoint" or time.monotonic() < self.next_at:
            return
        started = time.monotonic()
        await store(self.ctx, self.job, self.output_dir, event)
        took = time.monotonic() - started
        self.next_at = time.monotonic() + max(self.MIN_INTERVAL_SECONDS, 20 * took)


async def store(ctx: WorkerContext, job: Job, output_dir: Path, event: dict[str, Any]) -> None:
    """Store the checkpoint a `checkpoint` event names, replacing the job's previous one, and note in the
    event where it goes under the output directory (`stored`). The trainer may prune it meanwhile (it keeps
    the newest two): then it is skipped, and the next one is stored."""
    path = Path(str(event.get("path", "")))
    try:
        rel = path.relative_to(output_dir)
        async with ctx.sessions() as s, s.begin():
            await ArtifactStore.remove(s, artifact_id(job.id))
            await ctx.artifacts.add(s, artifact_id(job.id), path)
    except (OSError, ValueError) as exc:
        log.warning("job %s: checkpoint %s not stored (%s); the next one will be", job.id, path, exc)
        return
    event["stored"] = rel.as_posix()


def _copy_search_state(output_dir: Path, into: Path) -> None:
    """The study (a consistent copy, though the trainer may be writing to it) and the best complete trial's
    adapter, which is all the search's end needs of the trials it finished."""
    import optuna
    from optuna.storages import RDBStorage
    from optuna.trial import TrialState

    from adapters.training.common import ADAPTER_DIR

    src, dst = sqlite3.connect(output_dir / "search.db"), sqlite3.connect(into / "search.db")
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()
    storage = RDBStorage(f"sqlite:///{into / 'search.db'}")
    try:
        study = optuna.load_study(study_name="search", storage=storage)
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    finally:
        storage.engine.dispose()
    if complete:
        best = min(complete, key=lambda t: t.value)
        rel = Path("trials") / f"trial-{best.number}" / ADAPTER_DIR
        shutil.copytree(output_dir / rel, into / rel)


async def store_search(ctx: WorkerContext, job: Job, output_dir: Path, event: dict[str, Any]) -> None:
    """Store a search's state as trial `event["number"]` starts, replacing the previous one; note it in the
    event (`stored`)."""
    try:
        with tempfile.TemporaryDirectory(dir=output_dir) as tmp:
            await asyncio.to_thread(_copy_search_state, output_dir, Path(tmp))
            async with ctx.sessions() as s, s.begin():
                await ArtifactStore.remove(s, artifact_id(job.id))
                await ctx.artifacts.add(s, artifact_id(job.id), Path(tmp))
    except (OSError, sqlite3.Error, SQLAlchemyError, KeyError) as exc:  # the search goes on; the next trial stores it
        log.warning("job %s: search state not stored at trial %s (%s)", job.id, event.get("number"), exc)
        return
    event["stored"] = SEARCH_STATE


async def fetch(ctx: WorkerContext, job: Job, output_dir: Path) -> bool:
    """On a machine without the job's files: put its stored checkpoint (or search state) where the trainer
    resumes from. True when it did."""
    async with ctx.sessions() as s:
        events = (await s.execute(select(JobEvent.data).where(
            JobEvent.job_id == job.id, JobEvent.type.in_(("checkpoint", "trial"))).order_by(JobEvent.id.desc()))).scalars()
        rel = next((e["stored"] for e in events if isinstance(e, dict) and e.get("stored")), None)
    if rel is None or (output_dir / ("search.db" if rel == SEARCH_STATE else rel)).exists():
        return False
    fetched = Path(await ctx.artifacts.local(artifact_id(job.id), str(output_dir / rel)))
    if fetched == output_dir / rel or not fetched.is_dir():
        return False  # not stored (any more)
    if rel == SEARCH_STATE:  # the study and the best trial's folder go where the search keeps them
        shutil.copytree(fetched, output_dir, dirs_exist_ok=True)
    else:
        (output_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(fetched, output_dir / rel)  # same data directory: a rename
    shutil.rmtree(ctx.artifacts.cached(artifact_id(job.id)), ignore_errors=True)
    return True


async def forget(s: AsyncSession, job_id: str) -> None:
    """Drop the job's stored checkpoint (in `s`'s transaction): the job has ended."""
    await ArtifactStore.remove(s, artifact_id(job_id))
