"""Files a record points at, kept in the database beside it, for processes on other machines.

An adapter's PEFT directory, a snapshot's splits and report, an evaluation's or a drift run's HTML report are
written under the data directory of the process that made them, and the record keeps that path. A process on
another machine (an API replica behind a load balancer, a worker) cannot read it. With the store on
(`TUNELOOP_ARTIFACT_STORE`; on by default with PostgreSQL, the database several machines share), the writer also
puts the files into the database in the transaction that adds the record, so a record never exists without
them, and a process that does not find the recorded path fetches them once into `<data_dir>/artifacts/<id>`.
Reads never depend on the setting: whatever the writer stored, every reader finds.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.storage.models import ArtifactChunk

CHUNK_BYTES = 4 * 1024 * 1024  # one row: small enough for any driver, few rows for a 20 MB adapter


class ArtifactStore:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], data_dir: Path, store: bool,
                 chunk_bytes: int = CHUNK_BYTES) -> None:
        self.sessions = sessions
        self.cache = data_dir / "artifacts"
        self.store = store
        self.chunk_bytes = chunk_bytes

    async def add(self, s: AsyncSession, artifact_id: str, path: Path) -> None:
        """Store the directory or file at `path` in `s`'s transaction (nothing when the store is off, or when
        the id holds files already: records are immutable, and snapshots are content-addressed)."""
        if not self.store or await self._stored(s, artifact_id):
            return
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            name = file.relative_to(path).as_posix() if path.is_dir() else ""
            with file.open("rb") as f:
                seq = 0
                while True:
                    data = await asyncio.to_thread(f.read, self.chunk_bytes)
                    if data or seq == 0:  # an empty file is one empty chunk
                        s.add(ArtifactChunk(artifact_id=artifact_id, name=name, seq=seq, data=data))
                        await s.flush()  # one chunk in memory at a time
                    if len(data) < self.chunk_bytes:
                        break
                    seq += 1

    @staticmethod
    async def remove(s: AsyncSession, artifact_id: str) -> None:
        """Drop the stored files in `s`'s transaction (whatever the setting: an earlier one may have stored them).
        Copies already fetched stay until their machine removes `cached(artifact_id)`."""
        await s.execute(delete(ArtifactChunk).where(ArtifactChunk.artifact_id == artifact_id))

    def cached(self, artifact_id: str) -> Path:
        """Where `local` fetches the artifact to on this machine."""
        return self.cache / artifact_id

    async def local(self, artifact_id: str, recorded: str) -> str:
        """A path on this machine that holds the artifact: the recorded one where it exists, else the store's
        copy, `<data_dir>/artifacts/<id>/<the recorded name>` (fetched the first time). The recorded path when
        neither exists, so its reader fails as it did before."""
        if os.path.exists(recorded):
            return recorded
        root = self.cached(artifact_id)
        if not root.exists() and not await self._fetch(artifact_id, root, Path(recorded).name):
            return recorded
        return str(root / Path(recorded).name)

    async def _stored(self, s: AsyncSession, artifact_id: str) -> bool:
        q = select(ArtifactChunk.seq).where(ArtifactChunk.artifact_id == artifact_id).limit(1)
        return (await s.execute(q)).first() is not None

    async def _fetch(self, artifact_id: str, root: Path, name: str) -> bool:
        """Write the stored files under a temporary directory, then rename it to `root`: a reader never sees half
        an artifact, and of two processes fetching at once one rename wins and the other's copy is dropped."""
        async with self.sessions() as s:
            keys = (await s.execute(select(ArtifactChunk.name, ArtifactChunk.seq)
                                    .where(ArtifactChunk.artifact_id == artifact_id)
                                    .order_by(ArtifactChunk.name, ArtifactChunk.seq))).all()
            if not keys:
                return False
            self.cache.mkdir(parents=True, exist_ok=True)
            tmp = self.cache / f".{artifact_id}.{uuid.uuid4().hex[:8]}"
            try:
                for file, seq in keys:  # one chunk in memory at a time
                    data = (await s.execute(select(ArtifactChunk.data).where(
                        ArtifactChunk.artifact_id == artifact_id, ArtifactChunk.name == file,
                        ArtifactChunk.seq == seq))).scalar_one()
                    await asyncio.to_thread(_write, tmp / name / file if file else tmp / name, data, seq == 0)
                await asyncio.to_thread(_sync_tree, tmp)
                try:
                    os.replace(tmp, root)
                except OSError:
                    if not root.exists():  # not a concurrent fetch that won
                        raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        return True


def _write(path: Path, data: bytes, first: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb" if first else "ab") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _sync_tree(root: Path) -> None:
    """The directory entries too, so a crash after the rename cannot leave names without their files."""
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
