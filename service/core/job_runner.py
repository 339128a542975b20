"""Runs claimed jobs in the worker process: curation in a thread, training in a subprocess, events into
the database.

Training runs as `python -m adapters.training.run spec.json` so that a cancel (SIGTERM → stop after the
current optimizer step) and a crash never take the worker down, and so that the kernel kills the trainer
if the worker dies (PDEATHSIG): the job is then re-queued by heartbeat timeout and resumes from its
last checkpoint, because the spec and its output directory are the same on every attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import update

from adapters.base_model import model_hash, prepare_base_model
from service.core import checkpoints
from service.core.adapters import register_adapter_dir
from service.process import parent_death_signal
from service.storage.models import Adapter, Job, JobEvent, Snapshot

if TYPE_CHECKING:
    from service.worker import WorkerContext

log = logging.getLogger("tuneloop.jobs")
EXIT_OK, EXIT_ERROR, EXIT_CANCELLED = 0, 1, 3
_EVENT_FLUSH_SECONDS = 1.0


def _message(ev: dict[str, Any]) -> str:
    t = ev.get("type")
    if t == "step":
        return (f"step {ev.get('step')}/{ev.get('total_steps')}: loss {ev.get('loss', float('nan')):.4f}, "
                f"lr {ev.get('learning_rate', 0):.2e}, {ev.get('tokens_per_second', 0):.0f} tok/s, "
                f"eta {ev.get('eta_seconds', 0):.0f}s")
    if t == "validation":
        return f"step {ev.get('step')}: validation loss {ev.get('val_loss', float('nan')):.4f}"
    if t == "replay" and "rows" in ev:
        return (f"replay: {ev.get('rows')} rows of base-model answers ({ev.get('cached')} from the cache), "
                f"{ev.get('unfinished')} of them cut at the token limit")
    if t == "replay":
        return f"replay: {ev.get('generated')}/{ev.get('total')} base-model answers generated"
    if t == "trial":
        return f"trial {ev.get('trial')}: {ev.get('state', '')} {ev.get('value', '')}"
    return str(ev.get("message") or t)


async def _add_events(ctx: WorkerContext, job_id: str, events: list[dict[str, Any]]) -> None:
    if not events:
        return
    async with ctx.sessions() as s, s.begin():
        s.add_all([JobEvent(job_id=job_id, type=str(e.get("type", "info"))[:32],
                            level="error" if e.get("type") == "error" else "info", message=_message(e)[:2000],
                            data=e) for e in events])


async def _finish(ctx: WorkerContext, job_id: str, **values: Any) -> None:
    async with ctx.sessions() as s, s.begin():
        await s.execute(update(Job).where(Job.id == job_id).values(finished_at=time.time(), **values))
        await checkpoints.forget(s, job_id)


def _job_dir(ctx: WorkerContext, job: Job) -> Path:
    return (ctx.settings.data_dir / "jobs" / job.id).resolve()


async def _resolve_hyperparameters(ctx: WorkerContext, job: Job, snap: Snapshot, base_path: str) -> dict[str, Any]:
    if job.hyperparameters:
        return dict(job.hyperparameters)
    from adapters.training.config import auto_hyperparameters

    train = Path(await ctx.artifacts.local(snap.id, snap.path)) / "train.jsonl"
    n, chars = 0, 0
    with train.open() as f:
        for line in f:
            n += 1
            chars += len(line)
    cfg = json.loads((Path(base_path) / "config.json").read_text()) if Path(base_path, "config.json").exists() else {}
    params = int(cfg.get("hidden_size", 576) ** 2 * 12 * cfg.get("num_hidden_layers", 30))
    hp = auto_hyperparameters(n, chars / max(n, 1) / 4, params, job.spec.get("method", "sft")).to_dict()
    if job.spec.get("seed") is not None:
        hp["seed"] = job.spec["seed"]
    async with ctx.sessions() as s, s.begin():
        await s.execute(update(Job).where(Job.id == job.id).values(hyperparameters=hp))
    await _add_events(ctx, job.id, [{"type": "info", "message": f"auto hyperparameters for {n} rows: {hp}"}])
    return hp


class _Cancelled(Exception):
    """Raised between curation steps when the job was cancelled or its worker is stopping."""


async def _stop_or_requeue(ctx: WorkerContext, job_id: str, cancelled_by_user: bool) -> None:
    """End a stopped job: cancelled if the user asked; back to the queue if this worker is shutting down."""
    if ctx.stopping.is_set() and not cancelled_by_user:
        async with ctx.sessions() as s, s.begin():
            await s.execute(update(Job).where(Job.id == job_id).values(status="queued", worker_id=None))
        await _add_events(ctx, job_id, [{"type": "requeued", "message": "worker stopped; job re-queued"}])
        return
    await _finish(ctx, job_id, status="cancelled")
    await _add_events(ctx, job_id, [{"type": "cancelled", "message": "job cancelled"}])


async def curate(ctx: WorkerContext, job: Job, base_path: str) -> Snapshot | None:
    """Build the snapshot of `job.spec["sources"]`: one progress event per curation step, heartbeats, and a
    cancel between steps. Records the snapshot on the job; None when the job stopped or failed."""
    from adapters.base_model import token_counter
    from service.core.datasets import DatasetService, SnapshotSources
    from service.errors import ServiceError
    from service.worker import heartbeat

    sources = SnapshotSources.from_json(job.spec["sources"])
    datasets = DatasetService(ctx.sessions, ctx.settings.data_dir, token_counter(base_path), ctx.artifacts)
    stop = threading.Event()
    progress: deque[dict[str, Any]] = deque()  # appended by the curation thread, drained by the watcher
    cancelled_by_user = False

    def on_step(rep: Any, rows_left: int) -> None:  # in the curation thread
        progress.append({"type": "curation", "step": rep.name, "removed": rep.removed, "rows": rows_left,
                         "message": f"curation {rep.name}: {rows_left} rows"
                                    + (f" ({rep.removed} removed)" if rep.removed else "")})
        if stop.is_set():
            raise _Cancelled

    def drain() -> list[dict[str, Any]]:
        return [progress.popleft() for _ in range(len(progress))]

    curated = asyncio.Event()

    async def watch() -> None:  # ends itself, never cancelled: a cancel mid-insert would lose drained events
        nonlocal cancelled_by_user
        while not curated.is_set():
            cancel = await heartbeat(ctx.sessions, job.id, ctx.worker_id)
            if cancel or ctx.stopping.is_set():
                cancelled_by_user = cancelled_by_user or cancel
                stop.set()
            await _add_events(ctx, job.id, drain())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(curated.wait(), 0.5)

    parts = [*sources.dataset_ids, *(["feedback"] if sources.include_feedback else [])]
    await _add_events(ctx, job.id, [{"type": "curation", "message": f"curating {' + '.join(parts)}"}])
    watcher = asyncio.create_task(watch())
    try:
        snap = await datasets.build_snapshot(sources, on_step, job_id=job.id)
    except _Cancelled:
        snap = None
    except Exception as exc:  # the job fails with the reason; the worker carries on
        if not isinstance(exc, ServiceError):
            log.exception("curation of job %s failed", job.id)
        await _finish(ctx, job.id, status="failed", error={"message": getattr(exc, "detail", str(exc)),
                                                           "code": "curation_error"})
        return None
    finally:
        curated.set()
        await watcher
        await _add_events(ctx, job.id, drain())
    if snap is None:  # a cancel that came after the last step keeps the finished snapshot
        await _stop_or_requeue(ctx, job.id, cancelled_by_user)
        return None
    await _add_events(ctx, job.id, [{"type": "snapshot", "snapshot_id": snap.id, "counts": snap.counts,
                                     "message": f"snapshot {snap.id}: {snap.counts}"}])
    return snap


async def run_snapshot_job(ctx: WorkerContext, job: Job) -> None:
    """`POST /v1/datasets/{id}/snapshots`: curate, then succeed with the snapshot's id."""
    base_path = await asyncio.to_thread(prepare_base_model, ctx.settings.base_model, ctx.settings.data_dir)
    snap = await curate(ctx, job, base_path)
    if snap is not None:
        await _finish(ctx, job.id, status="succeeded")
        await _add_events(ctx, job.id, [{"type": "succeeded", "message": f"snapshot {snap.id}",
                                         "snapshot_id": snap.id}])


async def run_fine_tune_job(ctx: WorkerContext, job: Job) -> None:
    """Run one fine-tuning job to a terminal state (or back to the queue if this worker is stopping).
    A job created from datasets/feedback first curates its snapshot."""
    from service.core.jobs import check_snapshot_fits
    from service.errors import ServiceError

    base_path = await asyncio.to_thread(prepare_base_model, ctx.settings.base_model, ctx.settings.data_dir)
    if job.snapshot_id is None and job.spec.get("sources"):
        snap = await curate(ctx, job, base_path)
        if snap is None:
            return
        try:
            check_snapshot_fits(snap, job.spec.get("search"))
        except ServiceError as exc:
            await _finish(ctx, job.id, status="failed", error={"message": exc.detail, "code": "curation_error"})
            return
    else:
        async with ctx.sessions() as s:
            snap = await s.get(Snapshot, job.snapshot_id) if job.snapshot_id else None
    if snap is None:
        await _finish(ctx, job.id, status="failed", error={"message": "the job's snapshot is missing"})
        return
    hp = await _resolve_hyperparameters(ctx, job, snap, base_path)
    parent_path = None
    if job.spec.get("parent_adapter_id"):
        from adapters.training.config import inherit_lora_shape

        parent_path = await _parent_adapter_path(ctx, job, job.spec["parent_adapter_id"], base_path)
        if parent_path is None:
            return  # failed with the reason
        hp = inherit_lora_shape(hp, parent_path)  # "auto" hyperparameters get the parent's LoRA shape too
        async with ctx.sessions() as s, s.begin():
            await s.execute(update(Job).where(Job.id == job.id).values(hyperparameters=hp))
    jdir = _job_dir(ctx, job)
    jdir.mkdir(parents=True, exist_ok=True)
    snap_dir = Path(await ctx.artifacts.local(snap.id, snap.path))
    validation = snap_dir / "validation.jsonl"
    has_val = validation.exists() and validation.stat().st_size > 0
    if not has_val:
        hp["early_stopping_patience"] = 0
    spec = {"method": job.spec.get("method", "sft"), "base_model_path": base_path,
            "train_path": str(snap_dir / "train.jsonl"),
            "validation_path": str(validation) if has_val else None,
            "output_dir": str(jdir / "output"), "hyperparameters": hp, "search": job.spec.get("search"),
            "init_adapter_path": parent_path, "replay_cache_dir": str(ctx.settings.data_dir / "replay_cache")}
    spec_path = jdir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    if job.attempts > 1 and await checkpoints.fetch(ctx, job, jdir / "output"):
        log.info("job %s: fetched its stored checkpoint (its last worker was on another machine)", job.id)
    resumed = (any((jdir / "output" / "checkpoints").glob("step-*")) or (jdir / "output" / "search.db").exists()
               if (jdir / "output").exists() else False)
    await _add_events(ctx, job.id, [{"type": "started", "message":
                                     f"attempt {job.attempts} on worker {ctx.worker_id}"
                                     + (" (resuming from checkpoint)" if resumed else "")}])

    with (jdir / "train.log").open("ab") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "adapters.training.run", str(spec_path), stdout=asyncio.subprocess.PIPE,
            stderr=stderr, preexec_fn=parent_death_signal, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    last: dict[str, Any] = {}
    error: str | None = None
    pending: list[dict[str, Any]] = []
    flushed = time.monotonic()
    cancelled_by_user = False
    saw_cancelled = False

    async def watch() -> None:
        """Heartbeat and poll for a cancel every second; forward it (or this worker's shutdown) once as SIGTERM."""
        nonlocal cancelled_by_user
        from service.worker import heartbeat

        signalled = False
        while proc.returncode is None:
            cancel = await heartbeat(ctx.sessions, job.id, ctx.worker_id)
            if (cancel or ctx.stopping.is_set()) and not signalled and proc.returncode is None:
                cancelled_by_user = cancel
                signalled = True
                proc.send_signal(signal.SIGTERM)  # the trainer stops after its current optimizer step
            await asyncio.sleep(1.0)

    watcher = asyncio.create_task(watch())
    storer = checkpoints.Storer(ctx, job, jdir / "output")
    assert proc.stdout is not None
    async for raw in proc.stdout:
        try:
            ev = json.loads(raw)
        except ValueError:
            continue
        pending.append(ev)
        t = ev.get("type")
        if t == "step":
            last["loss"] = ev.get("loss")
        elif t == "validation":
            last["val_loss"] = ev.get("val_loss")
        elif t == "error":
            error = ev.get("message")
        elif t == "cancelled":
            saw_cancelled = True
        elif t in ("checkpoint", "trial"):
            await storer.offer(ev)
        if time.monotonic() - flushed > _EVENT_FLUSH_SECONDS or t in ("checkpoint", "trial", "error", "done",
                                                                      "cancelled"):
            await _add_events(ctx, job.id, pending)
            pending, flushed = [], time.monotonic()
    code = await proc.wait()
    watcher.cancel()
    await _add_events(ctx, job.id, pending)

    if code == EXIT_CANCELLED or saw_cancelled or (code != EXIT_OK and ctx.stopping.is_set()):
        # a shutting-down worker hands the job back; the next worker resumes the checkpoint
        await _stop_or_requeue(ctx, job.id, cancelled_by_user)
        return
    if code != EXIT_OK:
        await _finish(ctx, job.id, status="failed",
                      error={"message": error or f"trainer exited with code {code}", "code": "training_error"})
        return
    result = json.loads((jdir / "output" / "result.json").read_text())
    adapter = await register_adapter(ctx, job, snap, base_path, jdir / "output" / "adapter", result)
    await _finish(ctx, job.id, status="succeeded", adapter_id=adapter.id,
                  trained_tokens=int(result.get("trained_tokens") or 0),
                  metrics=_clean({**(result.get("metrics") or {}), **{f"last_{k}": v for k, v in last.items()}}))
    await _add_events(ctx, job.id, [{"type": "succeeded", "message": f"adapter {adapter.id} v{adapter.version}",
                                     "adapter_id": adapter.id}])
    await enqueue_evaluation(ctx, adapter, job)


async def _parent_adapter_path(ctx: WorkerContext, job: Job, parent_id: str, base_path: str) -> str | None:
    """The parent adapter's directory for a continued job; None (and the job failed) if it no longer fits."""
    async with ctx.sessions() as s:
        parent = await s.get(Adapter, parent_id)
    problem = None
    path = await ctx.artifacts.local(parent.id, parent.path) if parent is not None else None
    if path is None or not (Path(path) / "adapter_config.json").is_file():
        problem = f"the parent adapter {parent_id} or its files are gone"
    elif parent.base_model_hash != await asyncio.to_thread(model_hash, Path(base_path)):
        problem = f"the parent adapter {parent_id} was trained on another base model ({parent.base_model})"
    if problem:
        await _finish(ctx, job.id, status="failed", error={"message": problem, "code": "parent_adapter"})
        return None
    return path


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str))


async def register_adapter(ctx: WorkerContext, job: Job, snap: Snapshot, base_path: str, src: Path,
                           result: dict[str, Any]) -> Adapter:
    """Record the trained PEFT dir (copied under the data directory) with its lineage."""
    return await register_adapter_dir(
        ctx.sessions, ctx.artifacts, ctx.settings.data_dir, job.deployment, src, method=job.spec.get("method", "sft"),
        base_model=base_path, base_model_hash=await asyncio.to_thread(model_hash, Path(base_path)), job_id=job.id,
        snapshot_id=snap.id, feedback_range=snap.feedback_range, parent_adapter_id=job.spec.get("parent_adapter_id"),
        hyperparameters=result.get("hyperparameters") or {}, metrics=_clean(result.get("metrics") or {}))


async def enqueue_evaluation(ctx: WorkerContext, adapter: Adapter, job: Job | None) -> str | None:
    """Queue the evaluation of a new adapter (run by a worker, never in a request)."""
    from service.core.evaluations import queue_evaluation
    from service.errors import Conflict

    try:
        return await queue_evaluation(ctx.sessions, adapter, source_job=job)
    except Conflict as exc:  # deleted in the moment since it was registered (keep_adapters, or by hand)
        log.warning("adapter %s: no evaluation queued: %s", adapter.id, exc.detail)
        return None


async def run_evaluation_job(ctx: WorkerContext, job: Job) -> None:
    from service.core.evaluations import run_evaluation

    await run_evaluation(ctx, job)
