"""Deleting adapters: which may go, the `keep_adapters` policy, and removing their files on every machine.

A deleted adapter keeps its record (deployment events, evaluations, completions and lineage name it) with
status "deleted"; its files go. vLLM re-reads the files of an adapter it has loaded (its engine died when a
staged adapter's files vanished), so files never go from under a loaded adapter:

- An adapter in use cannot be deleted (`in_use`): a deployment's production and its rollback target, a variant
  of a running or pending experiment, the parent of a queued or running training job, the candidate or
  reference of a queued or running evaluation. Promote, experiments, evaluations and continued training take
  the adapter's row (`hold`, `Serving.promote`) and refuse a deleted one, and a delete takes the row before it
  looks, so of a delete and a promote (or experiment, …) racing on two API processes exactly one succeeds.
- Nothing loads a deleted adapter again; a process that had it loaded unloads it within a monitor pass
  (staged) or its drain timeout (an experiment's variant that just stopped). The database's copy of the files
  goes with the delete; each process removes its machine's copies (`service.core.deleted_files`) only
  `adapter_delete_grace_seconds` later, and an API process never while it still has the adapter loaded.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from monitoring import metrics
from service.errors import Conflict, NotFound
from service.storage.artifacts import ArtifactStore
from service.storage.models import Adapter, Deployment, DeploymentEvent, Evaluation, Experiment, Job

log = logging.getLogger("tuneloop.adapters")
ACTIVE = ("queued", "running")


async def hold(s: AsyncSession, adapter_id: str, field: str) -> Adapter | None:
    """Lock the adapter's row for `s`'s transaction, which is about to make the adapter in use; 409 naming
    `field` when it was deleted. None when there is no such adapter (the caller says what that means)."""
    adapter = (await s.execute(select(Adapter).where(Adapter.id == adapter_id).with_for_update()
                               .execution_options(populate_existing=True))).scalar_one_or_none()
    if adapter is not None and adapter.status == "deleted":
        raise Conflict(f"adapter {adapter_id} was deleted", field=field)
    return adapter


async def in_use(s: AsyncSession, adapter: Adapter) -> str | None:
    """Why `adapter` must stay, or None when it may be deleted."""
    dep = await s.get(Deployment, adapter.deployment)
    if dep is not None and dep.production_adapter_id == adapter.id:
        return f"it serves production of {dep.name}; promote another adapter first"
    # The adapter the last swap replaced: the rollback target, kept loaded on standby by every API process
    # (also after a promote of the base model, which offers no rollback but keeps the standby).
    last = (await s.execute(select(DeploymentEvent.previous_adapter_id).where(
        DeploymentEvent.deployment == adapter.deployment).order_by(DeploymentEvent.id.desc()).limit(1))).scalar()
    if last == adapter.id:
        return f"it is the rollback target of {adapter.deployment}; promote another adapter first"
    for exp_id, variants in (await s.execute(select(Experiment.id, Experiment.variants).where(
            Experiment.deployment == adapter.deployment, Experiment.status.in_(("running", "pending"))))).all():
        if any(v.get("adapter_id") == adapter.id for v in variants or []):
            return f"it is a variant of experiment {exp_id}; stop the experiment first"
    for job_id, spec in (await s.execute(select(Job.id, Job.spec).where(
            Job.deployment == adapter.deployment, Job.kind == "fine_tune", Job.status.in_(ACTIVE)))).all():
        if (spec or {}).get("parent_adapter_id") == adapter.id:
            return f"training job {job_id} continues from it; cancel the job or wait for it to end"
    ev = (await s.execute(select(Evaluation.id).where(
        Evaluation.status.in_(ACTIVE), or_(Evaluation.adapter_id == adapter.id, Evaluation.reference == adapter.id))
        .limit(1))).scalar_one_or_none()
    if ev is not None:
        return f"evaluation {ev} uses it; cancel the evaluation or wait for it to end"
    return None


async def delete_adapter(sessions: async_sessionmaker[AsyncSession], artifacts: ArtifactStore, adapter_id: str,
                         reason: str, kind: str = "api") -> Adapter:
    """Mark the adapter deleted and drop its files from the database, unless it is in use (409 saying why).
    Deleting a deleted adapter returns it unchanged. `kind` labels the metric: "api" or "keep_adapters"."""
    async with sessions() as s, s.begin():
        adapter = (await s.execute(select(Adapter).where(Adapter.id == adapter_id).with_for_update())).scalar_one_or_none()
        if adapter is None:
            raise NotFound(f"adapter {adapter_id!r} does not exist")
        if adapter.status == "deleted":
            return adapter
        if why := await in_use(s, adapter):
            raise Conflict(f"adapter {adapter_id} cannot be deleted: {why}", field="adapter_id")
        adapter.status, adapter.deleted_at, adapter.deleted_reason = "deleted", time.time(), reason[:200]
        await artifacts.remove(s, adapter_id)
    metrics.ADAPTERS_DELETED.labels(adapter.deployment, kind).inc()
    log.info("%s: deleted adapter %s v%d (%s)", adapter.deployment, adapter.id, adapter.version, reason)
    return adapter


async def keep_newest(sessions: async_sessionmaker[AsyncSession], artifacts: ArtifactStore, deployment: str,
                      keep: int) -> list[str]:
    """A deployment's `keep_adapters` policy: delete its adapters older than the newest `keep` (by version), except
    those in use, which stay however old. Returns the ids deleted. Run by the monitor's leader."""
    async with sessions() as s:
        ids = list((await s.execute(select(Adapter.id).where(Adapter.deployment == deployment,
                                                             Adapter.status != "deleted")
                                    .order_by(Adapter.version.desc()).offset(keep))).scalars())
    deleted = []
    for adapter_id in ids:
        try:
            await delete_adapter(sessions, artifacts, adapter_id, f"keep_adapters: {keep}", kind="keep_adapters")
        except Conflict:
            continue  # in use: kept, and looked at again next pass
        deleted.append(adapter_id)
    return deleted

