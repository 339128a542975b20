"""Deleting snapshots on real SQLite and PostgreSQL: the keep_snapshots policy passes by what a job or an adapter
uses, the files go (the database's copy at once, the machine's after the grace period), curating the same content
again restores a deleted snapshot, and a delete racing a new job on it leaves exactly one of them."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from adapters.curation.config import CurationConfig
from service.core import snapshot_deletion
from service.core.adapter_deletion import delete_adapter
from service.core.adapters import register_adapter_dir
from service.core.datasets import DatasetService, SnapshotSources
from service.core.deleted_files import DeletedFiles
from service.core.jobs import JobService
from service.errors import Conflict
from service.storage.artifacts import ArtifactStore
from service.storage.models import Adapter, ArtifactChunk, Deployment, Job, Snapshot


async def _setup(sessions: Any, data_dir: Path, dep: str) -> tuple[DatasetService, ArtifactStore, str]:
    store = ArtifactStore(sessions, data_dir, store=True)
    async with sessions() as s, s.begin():
        s.add(Deployment(name=dep, base_model="m"))
    datasets = DatasetService(sessions, data_dir, count_tokens=len, artifacts=store)
    ds = await datasets.create("rows", dep)

    async def rows():  # 40 distinct rows over 4 answers
        yield b"".join(json.dumps({"prompt": f"question number {i} about topic {i % 7}", "completion": f"intent_{i % 4}"})
                       .encode() + b"\n" for i in range(40))

    await datasets.upload(ds.id, rows(), "reject")
    return datasets, store, ds.id


def _sources(dep: str, ds: str, seed: int) -> SnapshotSources:
    """Another seed splits the same rows otherwise: another snapshot."""
    return SnapshotSources(dep, (ds,), False, CurationConfig.from_dict({"seed": seed}).to_dict())


async def _stored(sessions: Any) -> set[str]:
    async with sessions() as s:
        return set((await s.execute(select(ArtifactChunk.artifact_id))).scalars())


async def test_keep_snapshots_deletes_what_nothing_uses_and_a_new_curation_restores_it(
        sessions: Any, tmp_path: Path) -> None:
    data_dir, dep = tmp_path / "machine", "snaps"
    datasets, store, ds = await _setup(sessions, data_dir, dep)
    snaps = []
    for seed in range(4):  # oldest first
        snaps.append(await datasets.build_snapshot(_sources(dep, ds, seed)))
        async with sessions() as s, s.begin():  # distinct creation times, whatever the clock's resolution
            await s.execute(update(Snapshot).where(Snapshot.id == snaps[-1].id).values(created_at=1000.0 + seed))
    assert len({x.id for x in snaps}) == 4
    curated = (Path(snaps[2].path) / "train.jsonl").read_text()
    # s0: an adapter was trained on it; s1: a queued job reads it; s2: nothing; s3: the newest
    trained = tmp_path / "trained"
    trained.mkdir()
    (trained / "adapter_config.json").write_text('{"r": 8}')
    adapter = await register_adapter_dir(sessions, store, data_dir, dep, trained, method="sft", base_model="m",
                                         base_model_hash="h")
    async with sessions() as s, s.begin():
        s.add(Job(id="ftjob-reads", kind="fine_tune", deployment=dep, status="queued", snapshot_id=snaps[1].id))
        await s.execute(update(Adapter).where(Adapter.id == adapter.id).values(snapshot_id=snaps[0].id))

    assert await snapshot_deletion.keep_newest(sessions, store, dep, keep=1) == [snaps[2].id]
    with pytest.raises(Conflict, match="adapter .* was trained on it"):
        await snapshot_deletion.delete_snapshot(sessions, store, snaps[0].id, "test")
    with pytest.raises(Conflict, match="fine_tune job ftjob-reads uses it"):
        await snapshot_deletion.delete_snapshot(sessions, store, snaps[1].id, "test")
    assert await _stored(sessions) >= {snaps[0].id, snaps[1].id, snaps[3].id}
    assert snaps[2].id not in await _stored(sessions)  # the database's copy goes with the delete
    async with sessions() as s:
        deleted = await s.get(Snapshot, snaps[2].id)
    assert deleted.deleted_reason == "keep_snapshots: 1" and deleted.deleted_at is not None
    assert deleted.report  # the record and its JSON report stay

    # this machine's copy goes after the grace period, and only that of the deleted snapshot
    files = DeletedFiles(sessions, store, data_dir, grace_seconds=3600)
    assert await files.sweep() == [] and Path(deleted.path).is_dir()
    files.grace_seconds = 0
    assert await files.sweep() == [Path(deleted.path).resolve()]
    assert not Path(deleted.path).exists() and all(Path(x.path).is_dir() for x in (snaps[0], snaps[1], snaps[3]))

    # a new job cannot take it up ...
    jobs = JobService(sessions, datasets)
    with pytest.raises(Conflict, match="was deleted") as refused:
        await jobs.create({"deployment": dep, "snapshot_id": snaps[2].id})
    assert refused.value.field == "snapshot_id"
    # ... but a job that curates the same content again restores it, and reads it
    async with sessions() as s, s.begin():
        s.add(Job(id="ftjob-again", kind="fine_tune", deployment=dep, status="running"))
    again = await datasets.build_snapshot(_sources(dep, ds, 2), job_id="ftjob-again")
    assert again.id == snaps[2].id and again.deleted_at is None
    assert (Path(again.path) / "train.jsonl").read_text() == curated
    async with sessions() as s:
        assert (await s.get(Job, "ftjob-again")).snapshot_id == snaps[2].id
    assert snaps[2].id in await _stored(sessions)
    with pytest.raises(Conflict, match="fine_tune job ftjob-again uses it"):
        await snapshot_deletion.delete_snapshot(sessions, store, snaps[2].id, "test")
    assert await files.sweep() == []  # restored: its files stay

    # once the adapter is deleted and the jobs ended, everything but the newest (the restored one: curated
    # last) goes; then the restored one, deleted a second time, is swept again
    async with sessions() as s, s.begin():
        await s.execute(update(Job).values(status="succeeded"))
    await delete_adapter(sessions, store, adapter.id, "test")
    assert sorted(await snapshot_deletion.keep_newest(sessions, store, dep, keep=1)) == sorted(
        [snaps[0].id, snaps[1].id, snaps[3].id])
    fetched = Path(await store.local(again.id, str(tmp_path / "elsewhere" / Path(again.path).name)))
    assert fetched.is_relative_to(store.cached(again.id)) and (fetched / "train.jsonl").read_text() == curated
    await snapshot_deletion.delete_snapshot(sessions, store, again.id, "test")
    swept = await files.sweep()
    assert set(swept) >= {Path(x.path).resolve() for x in (snaps[0], snaps[1], snaps[3], again)}
    assert store.cached(again.id).resolve() in swept and not fetched.exists()
    assert (await snapshot_deletion.delete_snapshot(sessions, store, snaps[0].id, "test")).deleted_reason == \
        "keep_snapshots: 1"  # deleting a deleted snapshot changes nothing


async def test_a_delete_racing_a_new_job_leaves_exactly_one_of_them(sessions: Any, tmp_path: Path) -> None:
    data_dir, dep = tmp_path / "machine", "racing"
    datasets, store, ds = await _setup(sessions, data_dir, dep)
    jobs = JobService(sessions, datasets)
    for seed in range(10):
        snap = await datasets.build_snapshot(_sources(dep, ds, seed))
        deleted, created = await asyncio.gather(
            snapshot_deletion.delete_snapshot(sessions, store, snap.id, "test"),
            jobs.create({"deployment": dep, "snapshot_id": snap.id}), return_exceptions=True)
        assert isinstance(deleted, Conflict) != isinstance(created, Conflict), (deleted, created)
        async with sessions() as s:
            gone = (await s.get(Snapshot, snap.id)).deleted_at is not None
            queued = (await s.execute(select(Job.id).where(Job.snapshot_id == snap.id,
                                                          Job.status == "queued"))).scalars().all()
        assert gone == (not queued)
