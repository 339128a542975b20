"""The adapter registry's files: where a new adapter's directory goes, and adapters in and out as tar archives.

Training registers what it made (`service.core.job_runner`); an archive upload registers an adapter trained
elsewhere, checked against the base model, as a candidate whose evaluation is queued at once, so it meets the
same gates as one trained here. Export hands back exactly the files vLLM serves.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters.archive import ArchiveError, check_fits, pack, unpack
from service.errors import Gone, NotFound, Unprocessable
from service.storage.artifacts import ArtifactStore
from service.storage.models import Adapter, Deployment
from service.vllm.supervisor import rank_refusal


async def register_adapter_dir(sessions: async_sessionmaker[AsyncSession], artifacts: ArtifactStore, data_dir: Path,
                               deployment: str, src: Path, **fields: Any) -> Adapter:
    """Copy a PEFT directory to `<data>/adapters/<deployment>/<adapter id>/` and record it as the deployment's next
    version with `fields` (lineage, metrics), its files stored with the record where the artifact store is on.
    Two processes (workers on two machines, a worker and an import) may take the same next version at once: the
    database's unique version refuses the second, which takes the one after."""
    adapter_id = "adp-" + uuid.uuid4().hex[:16]
    dest = (data_dir / "adapters" / deployment / adapter_id).resolve()
    tmp = dest.with_name(f".{adapter_id}.tmp")
    await asyncio.to_thread(shutil.copytree, src, tmp)
    os.replace(tmp, dest)
    for attempt in range(20):
        async with sessions() as s:
            version = int((await s.execute(select(func.coalesce(func.max(Adapter.version), 0))
                                           .where(Adapter.deployment == deployment))).scalar_one()) + 1
        adapter = Adapter(id=adapter_id, deployment=deployment, version=version, path=str(dest), status="candidate",
                          **fields)
        try:
            async with sessions() as s, s.begin():
                s.add(adapter)
                await artifacts.add(s, adapter.id, dest)
            return adapter
        except IntegrityError:
            await asyncio.sleep(0.05 * (attempt + 1))
    raise RuntimeError(f"no free version of deployment {deployment} for adapter {adapter_id} after 20 attempts")


class AdapterArchives:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], artifacts: ArtifactStore, data_dir: Path,
                 base_model_path: str, base_model_hash: str, max_lora_rank: int | None) -> None:
        self.sessions = sessions
        self.artifacts = artifacts
        self.data_dir = data_dir
        self.base_model_path = base_model_path
        self.base_model_hash = base_model_hash
        self.max_lora_rank = max_lora_rank  # the managed vLLM's; None when it cannot be known

    async def export(self, adapter_id: str) -> Path:
        """A temporary tar of the adapter's files under `<adapter id>/` (the caller deletes it)."""
        async with self.sessions() as s:
            adapter = await s.get(Adapter, adapter_id)
        if adapter is None:
            raise NotFound(f"adapter {adapter_id!r} does not exist")
        if adapter.status == "deleted":
            raise Gone(f"adapter {adapter_id} was deleted; its files are gone")
        path = Path(await self.artifacts.local(adapter.id, adapter.path))
        if not path.is_dir():
            raise NotFound(f"adapter {adapter_id}'s files are not on this machine and not in the database")
        fd, name = tempfile.mkstemp(prefix=f".{adapter_id}.", suffix=".tar", dir=self._tmp())
        os.close(fd)
        await asyncio.to_thread(pack, path, Path(name), adapter_id)
        return Path(name)

    async def import_archive(self, deployment: str, body: AsyncIterator[bytes], max_bytes: int) -> Adapter:
        """Register the adapter in an uploaded tar as a candidate of `deployment`, after checking that it adapts
        this service's base model; 422 naming the member or tensor at fault otherwise (nothing is registered)."""
        async with self.sessions() as s:
            if await s.get(Deployment, deployment) is None:
                raise NotFound(f"deployment {deployment!r} does not exist", field="deployment")
        work = Path(tempfile.mkdtemp(prefix=".import.", dir=self._tmp()))
        try:
            archive = work / "upload.tar"
            with archive.open("wb") as f:
                async for chunk in body:
                    await asyncio.to_thread(f.write, chunk)
            try:
                await asyncio.to_thread(unpack, archive, work / "adapter", max_bytes)
                shape = await asyncio.to_thread(check_fits, work / "adapter", Path(self.base_model_path))
            except ArchiveError as exc:
                raise Unprocessable(str(exc), field=f"body.{exc.member}" if exc.member else "body") from exc
            if problem := rank_refusal(shape["lora_r"], self.max_lora_rank):
                raise Unprocessable(problem, field="body.adapter_config.json")
            return await register_adapter_dir(
                self.sessions, self.artifacts, self.data_dir, deployment, work / "adapter", method="import",
                base_model=self.base_model_path, base_model_hash=self.base_model_hash, hyperparameters=shape)
        finally:
            await asyncio.to_thread(shutil.rmtree, work, True)

    def _tmp(self) -> Path:
        tmp = self.data_dir / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        return tmp
