"""Removing this machine's files of deleted adapters and snapshots and of pruned drift reports, once their grace
period is over.

A delete drops the database's copy of the files at once (`adapter_deletion`, `snapshot_deletion`,
`drift.prune_drift_reports`); every process that may hold copies (API processes and workers, on any machine) runs a
`DeletedFiles` sweep for its own `adapter_delete_grace_seconds` later. Paths outside the data directory's own
folders are never touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.core import snapshot_deletion
from service.storage.artifacts import ArtifactStore
from service.storage.models import Adapter, MonitorRun, Snapshot

log = logging.getLogger("tuneloop.files")


class DeletedFiles:
    """Of a deleted adapter: the directory training or an import wrote (under `<data>/adapters`), the artifact
    store's fetched copy, and the training job's directory (its checkpoints, with optimizer state, are the
    largest part); never while this process has the adapter loaded in vLLM, which re-reads its files.
    Of a deleted snapshot: its directory (under `<data>/snapshots`) and the fetched copy, under the snapshot's
    row lock, so a curation of the same content that restores it meanwhile waits and writes it again.
    Of a pruned drift report: the HTML file and the fetched copy.
    What it removed it does not look at again (a snapshot deleted again after a restore it does)."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], artifacts: ArtifactStore, data_dir: Path,
                 grace_seconds: float) -> None:
        self.sessions = sessions
        self.artifacts = artifacts
        self.data_dir = data_dir.resolve()
        self.grace_seconds = grace_seconds
        self.swept: set[tuple[str, float | None]] = set()  # (id, deleted_at)

    async def sweep(self, loaded: Callable[[], set[str]] = set) -> list[Path]:
        """Remove what may go; `loaded` gives the adapter ids this process still has loaded (kept for now)."""
        before = time.time() - self.grace_seconds
        async with self.sessions() as s:
            adapters = (await s.execute(select(Adapter.id, Adapter.path, Adapter.job_id, Adapter.deleted_at).where(
                Adapter.status == "deleted", Adapter.deleted_at <= before))).all()
            snapshots = (await s.execute(select(Snapshot.id, Snapshot.deleted_at).where(
                Snapshot.deleted_at <= before))).all()
        held = loaded()
        removed = []
        for adapter_id, path, job_id, deleted_at in adapters:
            if (adapter_id, deleted_at) in self.swept or adapter_id in held:
                continue
            candidates = [(Path(path), "adapters"), (self.artifacts.cached(adapter_id), "artifacts")]
            if job_id:
                candidates.append((self.data_dir / "jobs" / job_id, "jobs"))
            removed += await self._remove(candidates)
            self.swept.add((adapter_id, deleted_at))
        for snapshot_id, deleted_at in snapshots:
            if (snapshot_id, deleted_at) in self.swept:
                continue
            async with self.sessions() as s, s.begin():
                snap = await snapshot_deletion.locked(s, snapshot_id)
                if snap is not None and snap.deleted_at is not None:  # not restored since the query above
                    removed += await self._remove([(Path(snap.path), "snapshots"),
                                                   (self.artifacts.cached(snapshot_id), "artifacts")])
            self.swept.add((snapshot_id, deleted_at))
        removed += await self._drift_reports(before)
        if removed:
            log.info("removed the files of deleted adapters and snapshots, and pruned drift reports: %s",
                     ", ".join(map(str, removed)))
        return removed

    async def _drift_reports(self, before: float) -> list[Path]:
        """Drift reports no run names any more (pruned): the ones a worker here wrote (older than the grace
        period: a report is written just before its run is stored) and the copies fetched here."""
        async with self.sessions() as s:
            kept = {Path(p).resolve() for p in (await s.execute(select(MonitorRun.html_path).where(
                MonitorRun.kind == "drift", MonitorRun.html_path.is_not(None)))).scalars()}
            kept_ids = {f"drift-{i}" for i in (await s.execute(select(MonitorRun.id).where(
                MonitorRun.kind == "drift", MonitorRun.html_path.is_not(None)))).scalars()}
        removed = []
        for p in (self.data_dir / "drift").glob("*/*.html"):
            with contextlib.suppress(FileNotFoundError):  # another process on this machine sweeps too
                if p.resolve() not in kept and p.stat().st_mtime <= before:
                    p.unlink()
                    removed.append(p.resolve())
        fetched = [p for p in (self.data_dir / "artifacts").glob("drift-*") if p.name not in kept_ids]
        return removed + await self._remove([(p, "artifacts") for p in fetched])

    async def _remove(self, candidates: list[tuple[Path, str]]) -> list[Path]:
        """Remove each path that exists strictly inside its named folder of the data directory."""
        removed = []
        for p, folder in candidates:
            p, root = p.resolve(), self.data_dir / folder
            if p.exists() and p.is_relative_to(root) and p != root:
                await asyncio.to_thread(shutil.rmtree, p, True)
                removed.append(p)
        return removed
