"""Evaluations: queued after every training job (and on demand), run by the worker, judged by gates.

The candidate is compared with what serves the deployment when the evaluation is queued (its production
adapter, or the base model) on the same rows: the snapshot's validation split and, when the deployment
names one (`config.eval_dataset_id`), that dataset. Gates come from the deployment's `config.gates`.
A failed evaluation marks the adapter `rejected`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
import uuid
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.core.adapter_deletion import hold
from service.core.jobs import request_cancel
from service.errors import Conflict, NotFound
from service.storage.models import (
    Adapter,
    DatasetRecord,
    DatasetUpload,
    Deployment,
    Evaluation,
    Job,
    JobEvent,
    Snapshot,
)

if TYPE_CHECKING:
    from service.worker import WorkerContext

log = logging.getLogger("tuneloop.evaluations")


def evaluation_json(e: Evaluation) -> dict[str, Any]:
    ev = (e.result or {}).get("evaluation") or {}
    keys = ("rows", "label_like", "answer_choices", "backend", "task", "retention", "gates")
    summary = {k: ev.get(k) for k in keys} if ev else None
    return {"object": "evaluation", "id": e.id, "adapter_id": e.adapter_id, "job_id": e.job_id,
            "reference": e.reference, "status": e.status, "reasons": e.reasons, "summary": summary,
            "created_at": int(e.created_at), "finished_at": None if e.finished_at is None else int(e.finished_at)}


def evaluation_report_json(e: Evaluation) -> dict[str, Any]:
    """The stored report (`adapters.evaluation.report.report_json`) without the server-side HTML path."""
    return {"object": "evaluation.report", "id": e.id, "status": e.status, "reasons": e.reasons,
            **{k: v for k, v in (e.result or {}).items() if k != "html_path"}}


async def queue_evaluation(sessions: async_sessionmaker[AsyncSession], adapter: Adapter,
                           source_job: Job | None = None, extra: dict[str, Any] | None = None) -> str:
    async with sessions() as s, s.begin():
        await hold(s, adapter.id, "adapter_id")  # a concurrent delete waits, then refuses
        dep = await s.get(Deployment, adapter.deployment)
        reference = (dep.production_adapter_id if dep else None) or "base"
        if reference == adapter.id:
            reference = "base"
        job = Job(id="evjob-" + uuid.uuid4().hex[:20], kind="evaluation", deployment=adapter.deployment,
                  spec={"adapter_id": adapter.id, "reference": reference,
                        "source_job_id": source_job.id if source_job else None, **(extra or {})},
                  snapshot_id=adapter.snapshot_id)
        s.add(job)
        await s.flush()  # the job row first: the evaluation references it
        ev = Evaluation(id="eval-" + uuid.uuid4().hex[:20], adapter_id=adapter.id, job_id=job.id,
                        reference=reference, status="queued")
        s.add(ev)
        await s.flush()
        s.add(JobEvent(job_id=job.id, type="created", message=f"evaluation {ev.id} of {adapter.id} vs {reference}"))
        await s.execute(update(Adapter).where(Adapter.id == adapter.id).values(evaluation_id=ev.id))
    return ev.id


class EvaluationService:
    """Read side for the API."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        self.sessions = sessions

    async def request(self, adapter_id: str) -> Evaluation:
        async with self.sessions() as s:
            adapter = await s.get(Adapter, adapter_id)
        if adapter is None:
            raise NotFound(f"adapter {adapter_id!r} does not exist")
        return await self.get(await queue_evaluation(self.sessions, adapter))

    async def get(self, evaluation_id: str) -> Evaluation:
        async with self.sessions() as s:
            ev = await s.get(Evaluation, evaluation_id)
        if ev is None:
            raise NotFound(f"evaluation {evaluation_id!r} does not exist")
        return ev

    async def cancel(self, evaluation_id: str) -> Evaluation:
        """A queued evaluation is cancelled at once, a running one by its worker between two batches (partial
        results are discarded). The adapter keeps its status: a cancelled evaluation rejects nothing and passes
        nothing (an earlier passed one still counts for staging); `POST /v1/adapters/{id}/evaluations` runs
        another."""
        ev = await self.get(evaluation_id)
        if ev.status not in ("queued", "running"):
            raise Conflict(f"evaluation {evaluation_id} is already {ev.status}")
        async with self.sessions() as s, s.begin():
            if await request_cancel(s, ev.job_id):
                await s.execute(update(Evaluation).where(Evaluation.id == ev.id, Evaluation.status == "queued")
                                .values(status="cancelled", finished_at=time.time()))
        return await self.get(evaluation_id)

    async def for_adapter(self, adapter_id: str) -> list[Evaluation]:
        async with self.sessions() as s:
            return list((await s.execute(select(Evaluation).where(Evaluation.adapter_id == adapter_id)
                                         .order_by(Evaluation.created_at))).scalars())

    async def loss_curve(self, evaluation: Evaluation) -> list[dict[str, Any]]:
        async with self.sessions() as s:
            adapter = await s.get(Adapter, evaluation.adapter_id)
            if adapter is None or not adapter.job_id:
                return []
            rows = (await s.execute(select(JobEvent.data).where(JobEvent.job_id == adapter.job_id,
                                                                JobEvent.type.in_(("step", "validation")))
                                    .order_by(JobEvent.id))).scalars()
            return list(rows)


# --- worker side -------------------------------------------------------------------------------------------
def _read_jsonl(path: Path, limit: int | None, seed: int = 0) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("kind", "sft") == "sft" and r.get("completion")]
    if limit is not None and len(rows) > limit:
        rows = random.Random(seed).sample(rows, limit)
    return rows


async def _dataset_rows(sessions: async_sessionmaker[AsyncSession], dataset_id: str) -> list[dict[str, Any]]:
    async with sessions() as s:
        rows = (await s.execute(select(DatasetRecord.row).join(DatasetUpload)
                                .where(DatasetRecord.dataset_id == dataset_id, DatasetUpload.committed.is_(True))
                                .order_by(DatasetRecord.id))).scalars()
        return [{"kind": "sft", **r} for r in rows if r.get("completion")]


async def run_evaluation(ctx: WorkerContext, job: Job) -> None:
    from adapters.evaluation.gates import GateConfig
    from adapters.evaluation.generate import BackendConfig, ModelRef
    from adapters.evaluation.report import report_html, report_json
    from adapters.evaluation.retention import load_retention_rows
    from adapters.evaluation.suites import EvaluationCancelled, evaluate
    from service.worker import heartbeat

    loop = asyncio.get_running_loop()
    async with ctx.sessions() as s:
        ev = (await s.execute(select(Evaluation).where(Evaluation.job_id == job.id))).scalar_one()
        adapter = await s.get(Adapter, job.spec["adapter_id"])
        dep = await s.get(Deployment, job.deployment)
        ref_adapter = await s.get(Adapter, job.spec["reference"]) if job.spec["reference"] != "base" else None
        snap = await s.get(Snapshot, adapter.snapshot_id) if adapter and adapter.snapshot_id else None
    assert adapter is not None and dep is not None
    config = dep.config or {}
    max_rows = int(config.get("eval_max_rows", 500))
    rows = _read_jsonl(Path(await ctx.artifacts.local(snap.id, snap.path)) / "validation.jsonl", max_rows) if snap else []
    if config.get("eval_dataset_id"):
        extra = await _dataset_rows(ctx.sessions, config["eval_dataset_id"])
        rows = extra if len(extra) <= config.get("eval_dataset_max_rows", 10**9) else \
            random.Random(0).sample(extra, config["eval_dataset_max_rows"])
    retention = load_retention_rows(config.get("retention_path"), limit=int(config.get("retention_rows", 100)))
    async with ctx.sessions() as s, s.begin():
        await s.execute(update(Evaluation).where(Evaluation.id == ev.id).values(status="running"))

    stop = threading.Event()

    def progress(event: dict[str, Any]) -> None:
        asyncio.run_coroutine_threadsafe(_event(ctx, job.id, {**event, "type": "progress"}), loop)

    async def beat() -> None:
        while True:
            if await heartbeat(ctx.sessions, job.id, ctx.worker_id) or ctx.stopping.is_set():
                stop.set()
            await asyncio.sleep(ctx.settings.heartbeat_seconds)

    backend = BackendConfig(kind=config.get("eval_backend", ctx.settings.eval_backend),  # type: ignore[arg-type]
                            vllm_base_url=(ctx.settings.vllm_urls or (None,))[0])
    base = adapter.base_model
    candidate = ModelRef(base, await ctx.artifacts.local(adapter.id, adapter.path), f"candidate v{adapter.version}")
    reference = ModelRef(base, await ctx.artifacts.local(ref_adapter.id, ref_adapter.path) if ref_adapter else None,
                         f"production v{ref_adapter.version}" if ref_adapter else "base")
    beater = asyncio.create_task(beat())
    started = time.time()
    try:
        gates = GateConfig.from_dict(config.get("gates"))
        if not rows:
            raise ValueError("no evaluation rows: the snapshot has no validation split and the deployment names "
                             "no evaluation dataset (config.eval_dataset_id)")
        result = await asyncio.to_thread(partial(evaluate, answer_choices=config.get("answer_choices")), candidate,
                                         reference, rows, retention, gates, backend, progress, stop.is_set)
    except EvaluationCancelled:
        status = "queued" if ctx.stopping.is_set() else "cancelled"
        await _close(ctx, job, ev, status if status == "cancelled" else "queued", None, [])
        return
    except Exception as exc:
        log.exception("evaluation %s failed", ev.id)
        await _close(ctx, job, ev, "error", {"error": f"{type(exc).__name__}: {exc}"}, [str(exc)])
        return
    finally:
        beater.cancel()
    curve = await EvaluationService(ctx.sessions).loss_curve(ev)
    payload = report_json(result, curve)
    html_path = ctx.settings.data_dir / "evaluations" / f"{ev.id}.html"
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(await asyncio.to_thread(report_html, result, curve))
    outcome = result.gates
    passed = bool(outcome and outcome.passed)
    payload["html_path"] = str(html_path)
    async with ctx.sessions() as s, s.begin():  # before the result that names it
        await ctx.artifacts.add(s, ev.id, html_path)
    payload["seconds"] = time.time() - started
    await _close(ctx, job, ev, "passed" if passed else "failed", payload, list(outcome.reasons) if outcome else [])
    if not passed:
        async with ctx.sessions() as s, s.begin():
            await s.execute(update(Adapter).where(Adapter.id == adapter.id, Adapter.status == "candidate")
                            .values(status="rejected"))
    if passed and job.spec.get("source_job_id"):
        await _auto_deploy(ctx, job.spec["source_job_id"], adapter)


async def _event(ctx: WorkerContext, job_id: str, data: dict[str, Any]) -> None:
    async with ctx.sessions() as s, s.begin():
        s.add(JobEvent(job_id=job_id, type=str(data.get("type"))[:32], message=str(data.get("stage", ""))[:500],
                       data=json.loads(json.dumps(data, default=str))))


async def _close(ctx: WorkerContext, job: Job, ev: Evaluation, status: str, result: dict[str, Any] | None,
                 reasons: list[str]) -> None:
    now = time.time()
    job_status = {"passed": "succeeded", "failed": "succeeded", "error": "failed", "cancelled": "cancelled",
                  "queued": "queued"}[status]
    async with ctx.sessions() as s, s.begin():
        await s.execute(update(Evaluation).where(Evaluation.id == ev.id).values(
            status=status, result=json.loads(json.dumps(result or {}, default=str)), reasons=reasons,
            finished_at=None if status == "queued" else now))
        await s.execute(update(Job).where(Job.id == job.id).values(
            status=job_status, finished_at=None if status == "queued" else now,
            worker_id=None if status == "queued" else job.worker_id,
            error={"message": reasons[0]} if status == "error" and reasons else None))
        s.add(JobEvent(job_id=job.id, type=status, message="; ".join(reasons)[:2000]))


async def _auto_deploy(ctx: WorkerContext, source_job_id: str, adapter: Adapter) -> None:
    """A job created with `auto_deploy` starts an experiment of its adapter against production."""
    async with ctx.sessions() as s:
        src = await s.get(Job, source_job_id)
    spec = (src.spec or {}).get("auto_deploy") if src else None
    if not spec:
        return
    try:
        from service.core.experiments import request_auto_experiment
    except ImportError:  # pragma: no cover
        return
    try:
        await request_auto_experiment(ctx.sessions, adapter, spec)
    except Conflict as exc:  # deleted since its evaluation started
        log.warning("adapter %s: no experiment started: %s", adapter.id, exc.detail)
