"""Deleting datasets on real SQLite and PostgreSQL: what a job or a deployment's config uses stays, the records go,
nothing takes a deleted dataset up again, and a delete racing a new snapshot job or an upload leaves exactly one of
them done."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from adapters.curation.config import CurationConfig
from service.core.dataset_deletion import delete_dataset
from service.core.datasets import DatasetService
from service.core.deployments import DeploymentService
from service.core.jobs import JobService
from service.errors import Conflict
from service.storage.models import Dataset, DatasetRecord, DatasetUpload, Deployment, Job

CURATION = CurationConfig()


def _rows(tag: str, n: int = 20) -> AsyncIterator[bytes]:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"".join(json.dumps({"prompt": f"{tag} question {i}", "completion": f"intent_{i % 3}"}).encode() + b"\n"
                       for i in range(n))
    return chunks()


async def _dataset(datasets: DatasetService, dep: str, name: str) -> str:
    ds = await datasets.create(name, dep)
    assert (await datasets.upload(ds.id, _rows(name), "reject")).accepted == 20
    return ds.id


async def _records(sessions: Any, dataset_id: str) -> int:
    async with sessions() as s:
        return int((await s.execute(select(func.count()).select_from(DatasetRecord)
                                    .where(DatasetRecord.dataset_id == dataset_id))).scalar_one())


async def test_a_dataset_in_use_stays_and_a_deleted_one_is_not_taken_up_again(sessions: Any, tmp_path: Path) -> None:
    datasets = DatasetService(sessions, tmp_path, count_tokens=len)
    deployments = DeploymentService(sessions, "m", set(), {})
    await deployments.create("keeper")
    evaluated, triggered, curated, idle = [await _dataset(datasets, "keeper", n) for n in ("ev", "tr", "cu", "idle")]
    await deployments.update_config("keeper", {"eval_dataset_id": evaluated, "triggers": {
        "corrections": 10, "job": {"datasets": [triggered]}}})
    job = await datasets.queue_snapshot(await datasets.check_sources("keeper", [curated], False, CURATION))

    for ds, why in ((evaluated, "config.eval_dataset_id"), (triggered, "retraining trigger"),
                    (curated, f"snapshot job {job.id} curates it")):
        with pytest.raises(Conflict, match=why) as refused:
            await delete_dataset(sessions, ds)
        assert refused.value.field == "dataset_id"
        assert await _records(sessions, ds) == 20

    deleted = await delete_dataset(sessions, idle)
    assert deleted.deleted_at is not None and await _records(sessions, idle) == 0
    async with sessions() as s:
        assert (await s.execute(select(func.count()).select_from(DatasetUpload)
                                .where(DatasetUpload.dataset_id == idle))).scalar_one() == 0
    assert (await delete_dataset(sessions, idle)).deleted_at == deleted.deleted_at  # idempotent
    assert await datasets.record_count(evaluated) == 20  # the others untouched

    # nothing takes it up again, each refusal naming its field
    refusals = [
        (datasets.upload(idle, _rows("more"), "reject"), "dataset_id"),
        (datasets.check_sources("keeper", [idle], False, CURATION), "datasets"),
        (JobService(sessions, datasets).create({"deployment": "keeper", "datasets": [idle]}), "datasets"),
        (deployments.update_config("keeper", {"eval_dataset_id": idle}), "config.eval_dataset_id"),
        (deployments.create("other", config={"triggers": {"corrections": 5, "job": {"datasets": [idle]}}}),
         "config.triggers.job.datasets"),
    ]
    for call, field in refusals:
        with pytest.raises(Conflict, match="was deleted") as refused:
            await call
        assert refused.value.field == field
    assert (await deployments.get("keeper")).config["eval_dataset_id"] == evaluated  # the config kept

    # once nothing uses them, they go
    await deployments.update_config("keeper", {"eval_dataset_id": None, "triggers": None})
    async with sessions() as s, s.begin():
        await s.execute(update(Job).values(status="cancelled"))
    for ds in (evaluated, triggered, curated):
        await delete_dataset(sessions, ds)
    async with sessions() as s:
        assert (await s.execute(select(func.count()).select_from(DatasetRecord))).scalar_one() == 0
        assert (await s.execute(select(func.count()).select_from(Dataset)
                                .where(Dataset.deleted_at.is_(None)))).scalar_one() == 0


async def test_a_delete_racing_a_snapshot_job_or_an_upload_leaves_exactly_one_of_them(
        sessions: Any, tmp_path: Path) -> None:
    datasets = DatasetService(sessions, tmp_path, count_tokens=len)
    async with sessions() as s, s.begin():
        s.add(Deployment(name="racing", base_model="m"))
    for i in range(8):
        ds = await _dataset(datasets, "racing", f"race-{i}")
        sources = await datasets.check_sources("racing", [ds], False, CURATION)
        deleted, queued = await asyncio.gather(delete_dataset(sessions, ds), datasets.queue_snapshot(sources),
                                               return_exceptions=True)
        assert isinstance(deleted, Conflict) != isinstance(queued, Conflict), (deleted, queued)
        assert (await _records(sessions, ds) == 0) == isinstance(queued, Conflict)
        async with sessions() as s, s.begin():
            await s.execute(update(Job).values(status="cancelled"))

    # an upload in flight when its dataset is deleted stores nothing, and says so
    ds = await _dataset(datasets, "racing", "uploading")
    started = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b"".join(json.dumps({"prompt": f"late {i}", "completion": "intent_0"}).encode() + b"\n"
                       for i in range(1500))  # a first batch of 1,000 is inserted before the delete
        started.set()
        await asyncio.sleep(0.5)
        yield json.dumps({"prompt": "last", "completion": "intent_1"}).encode() + b"\n"

    async def delete_when_started() -> Any:
        await started.wait()
        return await delete_dataset(sessions, ds)

    upload, deleted = await asyncio.gather(datasets.upload(ds, slow(), "reject"), delete_when_started(),
                                           return_exceptions=True)
    assert isinstance(upload, Conflict) and upload.field == "dataset_id", upload
    assert deleted.deleted_at is not None and await _records(sessions, ds) == 0
