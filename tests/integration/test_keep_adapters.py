"""The keep_adapters policy and the delete's guard on real SQLite and PostgreSQL: old adapters go unless in use,
their stored files with them, each machine's copies after the grace period; a delete racing a new experiment
never leaves a running experiment on a deleted adapter."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update

from service.core.adapter_deletion import delete_adapter, keep_newest
from service.core.adapters import register_adapter_dir
from service.core.deleted_files import DeletedFiles
from service.core.experiments import insert_experiment
from service.errors import Conflict
from service.storage.artifacts import ArtifactStore
from service.storage.models import (
    Adapter,
    ArtifactChunk,
    Deployment,
    DeploymentEvent,
    Evaluation,
    Experiment,
    Job,
)


async def _adapters(sessions: Any, store: ArtifactStore, data_dir: Path, dep: str, n: int) -> list[Adapter]:
    src = data_dir.parent / "trained"
    src.mkdir(exist_ok=True)
    (src / "adapter_config.json").write_text('{"r": 8}')
    async with sessions() as s, s.begin():
        s.add(Deployment(name=dep, base_model="m"))
    return [await register_adapter_dir(sessions, store, data_dir, dep, src, method="sft", base_model="m",
                                       base_model_hash="h") for _ in range(n)]


async def test_keep_adapters_deletes_the_old_ones_nothing_uses(sessions: Any, tmp_path: Path) -> None:
    data_dir = tmp_path / "machine"
    store = ArtifactStore(sessions, data_dir, store=True)
    dep = "keeping"
    a = await _adapters(sessions, store, data_dir, dep, 8)  # versions 1..8
    async with sessions() as s, s.begin():
        # v2 production (promoted from v1: v1 is the rollback target), v3 in a pending experiment,
        # v4 the parent of a queued job, v5 under evaluation; v6 and v7 used by nothing; v8 the newest
        await s.execute(update(Deployment).where(Deployment.name == dep).values(production_adapter_id=a[1].id))
        s.add(DeploymentEvent(deployment=dep, type="promote", adapter_id=a[1].id, previous_adapter_id=a[0].id))
        s.add(Experiment(id="exp-keep", deployment=dep, status="pending", seed="s", variants=[
            {"name": "control", "adapter_id": a[1].id}, {"name": "t", "adapter_id": a[2].id}]))
        s.add(Job(id="ftjob-keep", kind="fine_tune", deployment=dep, status="queued",
                  spec={"parent_adapter_id": a[3].id}))
        s.add(Job(id="evjob-keep", kind="evaluation", deployment=dep, status="running", spec={}))
        await s.flush()
        s.add(Evaluation(id="eval-keep", adapter_id=a[4].id, job_id="evjob-keep", reference=a[1].id,
                         status="running"))

    assert sorted(await keep_newest(sessions, store, dep, keep=1)) == sorted([a[5].id, a[6].id])
    async with sessions() as s:
        status = dict((await s.execute(select(Adapter.id, Adapter.status))).all())
        stored = set((await s.execute(select(ArtifactChunk.artifact_id))).scalars())
    assert [status[x.id] for x in a] == ["candidate"] * 5 + ["deleted", "deleted", "candidate"]
    assert stored == {x.id for x in a} - {a[5].id, a[6].id}  # the database's copy goes with the delete

    # this machine's copies go after the grace period, and only those of deleted adapters
    files = DeletedFiles(sessions, store, data_dir, grace_seconds=3600)
    assert await files.sweep() == [] and Path(a[5].path).exists()
    files.grace_seconds = 0
    assert sorted(await files.sweep(loaded=lambda: {a[6].id})) == [Path(a[5].path).resolve()]  # v7 still loaded
    assert sorted(await files.sweep()) == [Path(a[6].path).resolve()]
    assert all(Path(x.path).exists() for x in a if x.id not in (a[5].id, a[6].id))

    # once nothing uses them any more, the next pass deletes the old ones
    async with sessions() as s, s.begin():
        await s.execute(update(Experiment).values(status="stopped"))
        await s.execute(update(Job).values(status="cancelled"))
        await s.execute(update(Evaluation).values(status="cancelled"))
    assert sorted(await keep_newest(sessions, store, dep, keep=1)) == sorted([a[2].id, a[3].id, a[4].id])
    async with sessions() as s:
        kept = set((await s.execute(select(Adapter.id).where(Adapter.status != "deleted"))).scalars())
        deleted = (await s.execute(select(func.count()).select_from(Adapter).where(
            Adapter.deleted_reason == "keep_adapters: 1"))).scalar()
    assert kept == {a[0].id, a[1].id, a[7].id} and deleted == 5

    # a promote of the base model keeps the adapter it replaced on standby: that one stays, the one before goes
    async with sessions() as s, s.begin():
        await s.execute(update(Deployment).where(Deployment.name == dep).values(production_adapter_id=None))
        s.add(DeploymentEvent(deployment=dep, type="promote", adapter_id=None, previous_adapter_id=a[1].id))
    with pytest.raises(Conflict, match="rollback target"):
        await delete_adapter(sessions, store, a[1].id, "test")
    assert (await delete_adapter(sessions, store, a[0].id, "test")).status == "deleted"


async def test_a_delete_racing_a_new_experiment_leaves_exactly_one_of_them(sessions: Any, tmp_path: Path) -> None:
    data_dir = tmp_path / "machine"
    store = ArtifactStore(sessions, data_dir, store=True)
    adapters = await _adapters(sessions, store, data_dir, "racing", 12)
    outcomes = []
    for a in adapters:
        body = {"deployment": "racing", "variants": [{"name": "base", "adapter_id": None},
                                                    {"name": "t", "adapter_id": a.id}]}
        deleted, started = await asyncio.gather(delete_adapter(sessions, store, a.id, "test"),
                                                insert_experiment(sessions, body, status="pending"),
                                                return_exceptions=True)
        assert isinstance(deleted, Conflict) != isinstance(started, Conflict), (deleted, started)
        async with sessions() as s:
            status = (await s.get(Adapter, a.id)).status
            pending = (await s.execute(select(func.count()).select_from(Experiment).where(
                Experiment.status == "pending"))).scalar()
            if pending:  # the next round's delete must not meet this one
                await s.execute(update(Experiment).values(status="stopped"))
                await s.commit()
        assert (status == "deleted") == (pending == 0)
        outcomes.append(isinstance(deleted, Conflict))
    assert len(outcomes) == 12
