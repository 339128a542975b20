"""Deleting snapshots: which may go, and the `keep_snapshots` policy.

Snapshots are the service's largest files after checkpoints (every curation writes the whole train and
validation split), and they are content-addressed and shared: several jobs, and so several adapters, may
name one. A snapshot in use cannot be deleted (`in_use`): one a queued or running job (training, evaluation,
curation) reads, and one an adapter that is not deleted was trained on (its evaluations on demand read the
validation split, and drift compares production's traffic with its training rows). So on a deployment with
`keep_adapters`, the snapshots of the adapters that policy deletes become free for `keep_snapshots`.

A deleted snapshot keeps its record (jobs and adapters name it) with `deleted_at`; the database's copy of its
files goes with the delete, each machine's copies later (`service.core.deleted_files`). A new job cannot take
it up (`hold`, under the same row lock the delete takes), but curating the same content again restores it
(`DatasetService.build_snapshot`): a content address names the rows, not one copy of them.
"""

from __future__ import annotations

import logging
import time

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from monitoring import metrics
from service.errors import Conflict, NotFound
from service.storage.artifacts import ArtifactStore
from service.storage.models import Adapter, Job, Snapshot

log = logging.getLogger("tuneloop.snapshots")
ACTIVE = ("queued", "running")


async def locked(s: AsyncSession, snapshot_id: str) -> Snapshot | None:
    """The snapshot's row, locked for `s`'s transaction (a concurrent delete, hold or restore waits)."""
    return await s.get(Snapshot, snapshot_id, with_for_update=True, populate_existing=True)


async def hold(s: AsyncSession, snapshot_id: str, field: str) -> Snapshot | None:
    """Lock the snapshot for `s`'s transaction, which is about to make it in use (a new job); 409 naming
    `field` when it was deleted. None when there is no such snapshot (the caller says what that means)."""
    snap = await locked(s, snapshot_id)
    if snap is not None and snap.deleted_at is not None:
        raise Conflict(f"snapshot {snapshot_id} was deleted; curate its sources again to restore it", field=field)
    return snap


async def in_use(s: AsyncSession, snap: Snapshot) -> str | None:
    """Why `snap` must stay, or None when it may be deleted."""
    job = (await s.execute(select(Job.id, Job.kind).where(Job.snapshot_id == snap.id, Job.status.in_(ACTIVE))
                           .limit(1))).first()
    if job is not None:
        return f"{job.kind} job {job.id} uses it; cancel the job or wait for it to end"
    adapter = (await s.execute(select(Adapter.id).where(Adapter.snapshot_id == snap.id, Adapter.status != "deleted")
                               .limit(1))).scalar_one_or_none()
    if adapter is not None:
        return f"adapter {adapter} was trained on it (its evaluations and drift read it); delete the adapter first"
    return None


async def delete_snapshot(sessions: async_sessionmaker[AsyncSession], artifacts: ArtifactStore, snapshot_id: str,
                          reason: str, kind: str = "api") -> Snapshot:
    """Mark the snapshot deleted and drop its files from the database, unless it is in use (409 saying why).
    Deleting a deleted snapshot returns it unchanged. `kind` labels the metric: "api" or "keep_snapshots"."""
    async with sessions() as s, s.begin():
        snap = await locked(s, snapshot_id)
        if snap is None:
            raise NotFound(f"snapshot {snapshot_id!r} does not exist")
        if snap.deleted_at is not None:
            return snap
        if why := await in_use(s, snap):
            raise Conflict(f"snapshot {snapshot_id} cannot be deleted: {why}", field="snapshot_id")
        snap.deleted_at, snap.deleted_reason = time.time(), reason[:200]
        await artifacts.remove(s, snapshot_id)
    metrics.SNAPSHOTS_DELETED.labels(snap.deployment, kind).inc()
    log.info("%s: deleted snapshot %s (%s)", snap.deployment, snap.id, reason)
    return snap


async def keep_newest(sessions: async_sessionmaker[AsyncSession], artifacts: ArtifactStore, deployment: str,
                      keep: int) -> list[str]:
    """A deployment's `keep_snapshots` policy: delete its snapshots older than the newest `keep`, except those in
    use, which stay however old. Returns the ids deleted. Run by the monitor's leader."""
    async with sessions() as s:
        ids = list((await s.execute(select(Snapshot.id).where(Snapshot.deployment == deployment,
                                                              Snapshot.deleted_at.is_(None))
                                    .order_by(Snapshot.created_at.desc(), Snapshot.id).offset(keep))).scalars())
    deleted = []
    for snapshot_id in ids:
        try:
            await delete_snapshot(sessions, artifacts, snapshot_id, f"keep_snapshots: {keep}", kind="keep_snapshots")
        except Conflict:
            continue  # in use: kept, and looked at again next pass
        deleted.append(snapshot_id)
    return deleted
