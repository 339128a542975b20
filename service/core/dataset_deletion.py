"""Deleting datasets: their records leave the database; the dataset's record stays, marked deleted.

An application uploads its users' data; it must be able to take it back. A dataset in use cannot be deleted
(`in_use`): one a queued or running job curates (a snapshot, or a training job's first stage), one a deployment
evaluates on (`config.eval_dataset_id`), and one a deployment's retraining trigger trains on. Snapshots made from it
keep their own copy of the curated rows: delete those (`DELETE /v1/snapshots/{id}`) to remove every copy.

Whatever is about to use a dataset takes its row (`hold`: new snapshot and training jobs, a deployment config that
names it, an upload's commit), and the delete takes it before it looks, so of a delete and one of those racing on two
API processes exactly one succeeds, and an upload racing a delete stores nothing.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.errors import Conflict, NotFound
from service.storage.models import Dataset, DatasetRecord, DatasetUpload, Deployment, Job

log = logging.getLogger("tuneloop.datasets")
ACTIVE = ("queued", "running")


async def locked(s: AsyncSession, dataset_id: str) -> Dataset | None:
    """The dataset's row, locked for `s`'s transaction."""
    return await s.get(Dataset, dataset_id, with_for_update=True, populate_existing=True)


async def hold(s: AsyncSession, dataset_id: str, field: str) -> Dataset | None:
    """Lock the dataset for `s`'s transaction, which is about to use it; 409 naming `field` when it was deleted.
    None when there is no such dataset (the caller says what that means)."""
    dataset = await locked(s, dataset_id)
    if dataset is not None and dataset.deleted_at is not None:
        raise Conflict(f"dataset {dataset_id} was deleted", field=field)
    return dataset


def _datasets_of(body: Any) -> list[Any]:
    """The `datasets` of a job body or of a job's snapshot sources (either may be missing)."""
    return (body.get("datasets") or []) if isinstance(body, dict) else []


async def in_use(s: AsyncSession, dataset: Dataset) -> str | None:
    """Why `dataset` must stay, or None when it may be deleted."""
    for job_id, kind, spec in (await s.execute(select(Job.id, Job.kind, Job.spec).where(
            Job.deployment == dataset.deployment, Job.kind.in_(("snapshot", "fine_tune")),
            Job.status.in_(ACTIVE)))).all():
        if dataset.id in _datasets_of((spec or {}).get("sources")):
            return f"{kind} job {job_id} curates it; cancel the job or wait for it to end"
    for name, config in (await s.execute(select(Deployment.name, Deployment.config))).all():
        config = config or {}
        if config.get("eval_dataset_id") == dataset.id:
            return f"deployment {name} evaluates on it (config.eval_dataset_id); change that first"
        if dataset.id in _datasets_of((config.get("triggers") or {}).get("job")):
            return f"deployment {name}'s retraining trigger trains on it (config.triggers.job.datasets)"
    return None


async def delete_dataset(sessions: async_sessionmaker[AsyncSession], dataset_id: str) -> Dataset:
    """Delete the dataset's records and uploads and mark it deleted, unless it is in use (409 saying why).
    Deleting a deleted dataset returns it unchanged."""
    async with sessions() as s, s.begin():
        dataset = await locked(s, dataset_id)
        if dataset is None:
            raise NotFound(f"dataset {dataset_id!r} does not exist")
        if dataset.deleted_at is not None:
            return dataset
        if why := await in_use(s, dataset):
            raise Conflict(f"dataset {dataset_id} cannot be deleted: {why}", field="dataset_id")
        # committed uploads; one still in flight discards its own rows when its commit finds the dataset deleted
        committed = select(DatasetUpload.id).where(DatasetUpload.dataset_id == dataset_id,
                                                   DatasetUpload.committed.is_(True))
        records = (await s.execute(delete(DatasetRecord).where(DatasetRecord.upload_id.in_(committed)))).rowcount
        await s.execute(delete(DatasetUpload).where(DatasetUpload.id.in_(committed)))
        dataset.deleted_at = time.time()
    log.info("%s: deleted dataset %s (%s records)", dataset.deployment, dataset_id, records)
    return dataset
