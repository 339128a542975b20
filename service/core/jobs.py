"""Fine-tuning jobs (OpenAI fine-tuning shaped): validation at creation, queue, events, cancel.

Creating a job validates everything that can be validated without training (deployment, snapshot,
method, hyperparameters with field and range, search space) so a bad request is a 422 and no job exists.
The worker process runs it (see `service.core.job_runner`).
"""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters.training.config import (
    METHODS,
    Hyperparameters,
    SearchSpec,
    check_search_keeps_shape,
    inherit_lora_shape,
)
from service.core import checkpoints, dataset_deletion, snapshot_deletion
from service.core.adapter_deletion import hold
from service.core.datasets import DatasetService, checked_curation
from service.core.experiments import checked_auto_deploy
from service.errors import Conflict, NotFound, Unprocessable
from service.storage.models import Adapter, Deployment, Job, JobEvent, Snapshot
from service.vllm.supervisor import rank_refusal

TERMINAL = ("succeeded", "failed", "cancelled")
JOB_FIELDS = frozenset({"deployment", "snapshot_id", "datasets", "include_feedback", "method", "search", "suffix",
                        "seed", "auto_deploy", "curation", "parent_adapter_id"})
_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*)")


def _field_of(exc: Exception, prefix: str) -> str:
    m = _FIELD.match(str(exc))
    name = m.group(1) if m else ""
    if name in ("hyperparameters", "unknown", "space", "search"):
        return prefix
    return f"{prefix}.{name}" if name else prefix


def check_snapshot_fits(snap: Snapshot, search: dict[str, Any] | None) -> None:
    """A snapshot a job can train on: some training rows, and a validation split if trials are ranked."""
    if snap.counts.get("train", 0) < 1:
        raise Unprocessable("the snapshot has no training rows", field="snapshot_id")
    if search is not None and snap.counts.get("validation", 0) < 1:
        raise Unprocessable("search ranks trials on validation loss: the snapshot needs a validation split",
                            field="search")


def job_json(j: Job) -> dict[str, Any]:
    return {"object": "fine_tuning.job", "id": j.id, "status": j.status, "deployment": j.deployment,
            "model": j.deployment, "method": j.spec.get("method"), "snapshot_id": j.snapshot_id,
            "created_at": int(j.created_at), "started_at": None if j.started_at is None else int(j.started_at),
            "finished_at": None if j.finished_at is None else int(j.finished_at),
            "hyperparameters": j.hyperparameters, "trained_tokens": j.trained_tokens, "metrics": j.metrics,
            "adapter_id": j.adapter_id, "fine_tuned_model": j.adapter_id, "error": j.error,
            "attempts": j.attempts, "suffix": j.spec.get("suffix"), "seed": j.spec.get("seed"),
            "search": j.spec.get("search"), "auto_deploy": j.spec.get("auto_deploy"),
            "parent_adapter_id": j.spec.get("parent_adapter_id")}


def event_json(e: JobEvent) -> dict[str, Any]:
    return {"object": "fine_tuning.job.event", "id": e.id, "created_at": e.created_at, "type": e.type,
            "level": e.level, "message": e.message, "data": e.data}


def checked_job_body(body: Any) -> dict[str, Any]:
    """The checks of a job body that need no database: known fields, method, hyperparameters (field and range),
    seed, search, suffix, auto_deploy, curation. Returns the spec parts they produce and the checked curation.
    `JobService.create` runs them, and so does a deployment's config for its trigger's job: a bad job is a 422
    when it is written, not a trigger that fails later."""
    if not isinstance(body, dict):
        raise Unprocessable("body must be an object")
    unknown = sorted(set(body) - JOB_FIELDS)
    if unknown:
        raise Unprocessable(f"unknown field(s): {', '.join(unknown)}", field=unknown[0])
    method = body.get("method") or {"type": "sft"}
    if not isinstance(method, dict) or method.get("type", "sft") not in METHODS:
        raise Unprocessable(f"method.type must be one of {', '.join(METHODS)}", field="method.type")
    mtype = method.get("type", "sft")
    hp = method.get("hyperparameters", "auto")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31):
        raise Unprocessable("seed must be an integer in [0, 2**31)", field="seed")
    hyper: dict[str, Any] | str
    if hp == "auto" or hp is None:
        hyper = "auto"
    else:
        if not isinstance(hp, dict):
            raise Unprocessable('method.hyperparameters must be an object or "auto"', field="method.hyperparameters")
        try:
            params = dict(hp)
            if seed is not None:
                params.setdefault("seed", seed)
            hyper = Hyperparameters.from_dict(params).to_dict()
        except (ValueError, TypeError) as exc:
            raise Unprocessable(str(exc), field=_field_of(exc, "method.hyperparameters")) from exc
        if hyper["replay_fraction"] and mtype != "sft":
            raise Unprocessable(f"replay_fraction applies to sft only, not {mtype}",
                                field="method.hyperparameters.replay_fraction")
    search = body.get("search")
    if search is not None:
        if not isinstance(search, dict):
            raise Unprocessable("search must be an object {n_trials, space?}", field="search")
        try:
            search = SearchSpec(**search).to_dict()
        except (ValueError, TypeError) as exc:
            raise Unprocessable(str(exc), field=_field_of(exc, "search")) from exc
    suffix = body.get("suffix")
    if suffix is not None and (not isinstance(suffix, str) or not re.fullmatch(r"[a-z0-9_-]{1,40}", suffix)):
        raise Unprocessable("suffix must match [a-z0-9_-]{1,40}", field="suffix")
    return {"method": mtype, "hyperparameters": hyper, "search": search, "suffix": suffix, "seed": seed,
            "auto_deploy": checked_auto_deploy(body.get("auto_deploy")),
            "curation": checked_curation(body.get("curation"))}


async def request_cancel(s: AsyncSession, job_id: str) -> bool:
    """Cancel a queued job at once (True); flag a running one, which its worker stops at its next heartbeat
    (training within a step, an evaluation between batches) and marks cancelled (False)."""
    cancelled = (await s.execute(update(Job).where(Job.id == job_id, Job.status == "queued")
                                 .values(status="cancelled", finished_at=time.time(), cancel_requested=True)))
    if cancelled.rowcount == 1:
        await checkpoints.forget(s, job_id)  # stored when a worker that ran it before died
    else:
        await s.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(cancel_requested=True))
    s.add(JobEvent(job_id=job_id, type="cancel_requested", message="cancellation requested"))
    return cancelled.rowcount == 1


class JobService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], datasets: DatasetService,
                 max_lora_rank: int | None = None) -> None:
        """`max_lora_rank`: the managed vLLM's `--max-lora-rank` (None with servers it does not run, whose
        setting it cannot know). A job for a higher rank is refused when it is written, not after hours of
        training for an adapter that vLLM would refuse to load."""
        self.sessions = sessions
        self.datasets = datasets
        self.max_lora_rank = max_lora_rank

    async def create(self, body: Any) -> Job:
        checked = checked_job_body(body)
        curation = checked.pop("curation")  # goes into the snapshot sources, not the job spec
        deployment = body.get("deployment")
        async with self.sessions() as s:
            if not isinstance(deployment, str) or await s.get(Deployment, deployment) is None:
                raise NotFound(f"deployment {deployment!r} does not exist", field="deployment")
        mtype, hyper, search = checked["method"], checked["hyperparameters"], checked["search"]
        parent_id = body.get("parent_adapter_id")
        if parent_id is not None:
            parent_path = await self._parent_path(parent_id, deployment)
            try:
                if isinstance(hyper, dict):
                    explicit = (body.get("method") or {}).get("hyperparameters", "auto")
                    hyper = inherit_lora_shape(hyper, parent_path, explicit=explicit)
                    hyper = Hyperparameters.from_dict(hyper).to_dict()
            except (ValueError, TypeError) as exc:
                raise Unprocessable(str(exc), field=_field_of(exc, "method.hyperparameters")) from exc
            try:
                check_search_keeps_shape((search or {}).get("space", {}))
            except ValueError as exc:
                raise Unprocessable(str(exc), field="search.space") from exc
        self._check_servable_rank(hyper, search)

        snapshot_id = body.get("snapshot_id")
        sources = None
        if snapshot_id is not None:
            snap = await self.datasets.get_snapshot(snapshot_id) if isinstance(snapshot_id, str) else None
            if snap is None or snap.deployment != deployment:
                raise Unprocessable("snapshot_id must name a snapshot of this deployment", field="snapshot_id")
            check_snapshot_fits(snap, search)
        else:
            ds = body.get("datasets") or []
            include_feedback = body.get("include_feedback", False)
            if not isinstance(ds, list) or not all(isinstance(d, str) for d in ds) or (not ds and not include_feedback):
                raise Unprocessable("give snapshot_id, or datasets (a list of dataset ids) and/or include_feedback",
                                    field="snapshot_id")
            # Curation is slow work: the worker builds the snapshot as the job's first stage.
            sources = (await self.datasets.check_sources(deployment, ds, include_feedback, curation)).to_json()

        spec = {**checked, "hyperparameters": hyper, "sources": sources, "parent_adapter_id": parent_id}
        job = Job(id="ftjob-" + uuid.uuid4().hex[:20], kind="fine_tune", deployment=deployment, status="queued",
                  spec=spec, hyperparameters=hyper if isinstance(hyper, dict) else {}, snapshot_id=snapshot_id)
        async with self.sessions() as s, s.begin():
            if parent_id is not None:
                await hold(s, parent_id, "parent_adapter_id")  # a concurrent delete waits, then refuses
            if snapshot_id is not None:
                await snapshot_deletion.hold(s, snapshot_id, "snapshot_id")  # likewise
            for ds in (sources or {}).get("datasets", []):
                await dataset_deletion.hold(s, ds, "datasets")  # likewise
            s.add(job)
            s.add(JobEvent(job_id=job.id, type="created", data={"snapshot_id": snapshot_id, "sources": sources},
                           message=f"{mtype} job queued on "
                           + (f"snapshot {snapshot_id}" if snapshot_id else "a snapshot the worker will curate")))
        return job

    def _check_servable_rank(self, hyper: dict[str, Any] | str, search: dict[str, Any] | None) -> None:
        ranks = [("method.hyperparameters.lora_r", hyper["lora_r"])] if isinstance(hyper, dict) else []
        ranks += [("search.space.lora_r", r) for r in (search or {}).get("space", {}).get("lora_r", [])]
        for field, rank in ranks:
            if isinstance(rank, int) and (problem := rank_refusal(rank, self.max_lora_rank)):
                raise Unprocessable(problem, field=field)

    async def _parent_path(self, adapter_id: Any, deployment: str) -> str:
        """The files of the adapter a job continues from: one of this deployment's, with its files on disk."""
        async with self.sessions() as s:
            parent = await s.get(Adapter, adapter_id) if isinstance(adapter_id, str) else None
        if parent is None:
            raise NotFound(f"adapter {adapter_id!r} does not exist", field="parent_adapter_id")
        if parent.status == "deleted":
            raise Conflict(f"adapter {adapter_id} was deleted", field="parent_adapter_id")
        if parent.deployment != deployment:
            raise Unprocessable(f"adapter {adapter_id} belongs to deployment {parent.deployment!r}, not {deployment!r}",
                                field="parent_adapter_id")
        path = await self.datasets.artifacts.local(parent.id, parent.path)
        if not (Path(path) / "adapter_config.json").is_file():
            raise Unprocessable(f"adapter {adapter_id} has no files at {parent.path}", field="parent_adapter_id")
        return path

    async def get(self, job_id: str, kind: str = "fine_tune") -> Job:
        async with self.sessions() as s:
            job = await s.get(Job, job_id)
        if job is None or job.kind != kind:
            raise NotFound(f"job {job_id!r} does not exist")
        return job

    async def list(self, deployment: str | None, after: str | None, limit: int, kind: str = "fine_tune") -> list[Job]:
        q = select(Job).where(Job.kind == kind).order_by(Job.created_at.desc()).limit(limit)
        if deployment:
            q = q.where(Job.deployment == deployment)
        if after:
            ref = await self.get(after, kind)
            q = q.where(Job.created_at < ref.created_at)
        async with self.sessions() as s:
            return list((await s.execute(q)).scalars())

    async def events(self, job_id: str, after: int | None = None, limit: int = 1000) -> list[JobEvent]:
        q = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id).limit(limit)
        if after is not None:
            q = q.where(JobEvent.id > after)
        async with self.sessions() as s:
            return list((await s.execute(q)).scalars())

    async def cancel(self, job_id: str, kind: str = "fine_tune") -> Job:
        job = await self.get(job_id, kind)
        if job.status in TERMINAL:
            raise Conflict(f"job {job_id} is already {job.status}")
        async with self.sessions() as s, s.begin():
            await request_cancel(s, job_id)
        return await self.get(job_id, kind)

    async def snapshot_of(self, job: Job) -> Snapshot | None:
        if not job.snapshot_id:
            return None
        async with self.sessions() as s:
            return await s.get(Snapshot, job.snapshot_id)
