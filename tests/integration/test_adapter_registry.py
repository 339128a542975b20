"""Registering adapters on real SQLite and PostgreSQL: processes that register at once (workers on several
machines, an import beside a worker) each get their own version and directory."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from service.core.adapters import register_adapter_dir
from service.storage.artifacts import ArtifactStore
from service.storage.models import Adapter, ArtifactChunk


async def test_adapters_registered_at_once_get_consecutive_versions_and_their_own_files(
        sessions: Any, tmp_path: Path) -> None:
    src = tmp_path / "trained"
    src.mkdir()
    (src / "adapter_config.json").write_text('{"r": 8}')
    stores = [ArtifactStore(sessions, tmp_path / f"machine-{i}", store=True) for i in range(3)]
    adapters = await asyncio.gather(*(register_adapter_dir(sessions, store, tmp_path / f"machine-{i}", "dep", src,
                                                           method="sft", base_model="m", base_model_hash="h")
                                      for i, store in enumerate(stores)))
    assert sorted(a.version for a in adapters) == [1, 2, 3]
    assert len({a.path for a in adapters}) == 3 and all(Path(a.path, "adapter_config.json").is_file() for a in adapters)
    async with sessions() as s:
        stored = (await s.execute(select(func.count(func.distinct(ArtifactChunk.artifact_id))))).scalar_one()
        versions = sorted((await s.execute(select(Adapter.version).where(Adapter.deployment == "dep"))).scalars())
    assert stored == 3 and versions == [1, 2, 3]
