"""Datasets, streamed NDJSON uploads, and curated, content-addressed snapshots.

A snapshot request is checked here and queued as a job; a worker curates it (`build_snapshot`).

Uploads are parsed as a stream (memory bounded by one line plus one insert batch). Records are written in
batches under an upload row that stays `committed = false` until the whole body was read; readers only see
records of committed uploads, so a crash mid-upload leaves nothing visible (the orphan rows are swept at
the next start). Exact duplicates are counted against the dataset in the database, not in memory.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters.curation.config import CurationConfig
from adapters.curation.feedback_rows import rows_from_feedback
from adapters.curation.ndjson import aiter_ndjson
from adapters.curation.pipeline import CurationResult, run_pipeline
from adapters.curation.report import quality_report, quality_report_html
from adapters.curation.rows import Row, RowError, parse_row
from adapters.curation.steps import StepReport
from monitoring import metrics
from service.core import dataset_deletion, snapshot_deletion
from service.core.feedback import feedback_for_training
from service.errors import Conflict, NotFound, Unprocessable
from service.storage.artifacts import ArtifactStore
from service.storage.db import refresh_statistics
from service.storage.models import (
    Dataset,
    DatasetRecord,
    DatasetUpload,
    Deployment,
    Feedback,
    Job,
    JobEvent,
    Snapshot,
)

log = logging.getLogger("tuneloop.datasets")
BATCH = 1000
MAX_REPORTED_ERRORS = 1000


@dataclass
class UploadResult:
    upload_id: str
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"object": "dataset.upload", "id": self.upload_id, "accepted": self.accepted,
                "duplicates": self.duplicates, "rejected": self.rejected, "errors": self.errors}


def dataset_json(d: Dataset, records: int | None = None) -> dict[str, Any]:
    out = {"object": "dataset", "id": d.id, "name": d.name, "deployment": d.deployment,
           "created_at": int(d.created_at), "deleted_at": int(d.deleted_at) if d.deleted_at else None}
    if records is not None:
        out["records"] = records
    return out


def snapshot_json(s: Snapshot) -> dict[str, Any]:
    return {"object": "snapshot", "id": s.id, "dataset_id": s.dataset_id, "deployment": s.deployment,
            "counts": s.counts, "curation": s.curation, "feedback_range": s.feedback_range,
            "created_at": int(s.created_at), "deleted_at": int(s.deleted_at) if s.deleted_at else None,
            "deleted_reason": s.deleted_reason}


@dataclass(frozen=True)
class SnapshotSources:
    """What a snapshot is made from: checked when requested, stored in the job's spec, curated by a worker."""
    deployment: str
    dataset_ids: tuple[str, ...]
    include_feedback: bool
    curation: dict[str, Any]  # a validated `CurationConfig.to_dict()`

    def to_json(self) -> dict[str, Any]:
        return {"deployment": self.deployment, "datasets": list(self.dataset_ids),
                "include_feedback": self.include_feedback, "curation": self.curation}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SnapshotSources:
        return cls(d["deployment"], tuple(d["datasets"]), bool(d["include_feedback"]), dict(d["curation"]))


def snapshot_job_json(j: Job) -> dict[str, Any]:
    return {"object": "snapshot.job", "id": j.id, "status": j.status, "deployment": j.deployment,
            "snapshot_id": j.snapshot_id, "sources": j.spec.get("sources"), "error": j.error,
            "created_at": int(j.created_at), "started_at": None if j.started_at is None else int(j.started_at),
            "finished_at": None if j.finished_at is None else int(j.finished_at), "attempts": j.attempts}


def checked_curation(curation: Any) -> CurationConfig:
    try:
        return CurationConfig.from_dict(curation)
    except (ValueError, TypeError) as exc:
        raise Unprocessable(f"invalid curation config: {exc}", field="curation") from exc


class DatasetService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], data_dir: Path,
                 count_tokens: Callable[[str], int], artifacts: ArtifactStore | None = None) -> None:
        self.sessions = sessions
        self.data_dir = data_dir
        self.count_tokens = count_tokens
        self.artifacts = artifacts or ArtifactStore(sessions, data_dir, store=False)

    # -- datasets ---------------------------------------------------------------------------------------
    async def create(self, name: Any, deployment: Any) -> Dataset:
        if not isinstance(name, str) or not 0 < len(name) <= 200:
            raise Unprocessable("name must be a string of 1..200 characters", field="name")
        async with self.sessions() as s, s.begin():
            if not isinstance(deployment, str) or await s.get(Deployment, deployment) is None:
                raise NotFound(f"deployment {deployment!r} does not exist", field="deployment")
            d = Dataset(id="ds-" + uuid.uuid4().hex[:20], name=name, deployment=deployment)
            s.add(d)
        return d

    async def get(self, dataset_id: str) -> Dataset:
        async with self.sessions() as s:
            d = await s.get(Dataset, dataset_id)
        if d is None:
            raise NotFound(f"dataset {dataset_id!r} does not exist")
        return d

    async def list(self, deployment: str | None = None) -> list[Dataset]:
        q = select(Dataset).order_by(Dataset.created_at)
        if deployment:
            q = q.where(Dataset.deployment == deployment)
        async with self.sessions() as s:
            return list((await s.execute(q)).scalars())

    async def record_count(self, dataset_id: str) -> int:
        async with self.sessions() as s:
            return int((await s.execute(
                select(func.count()).select_from(DatasetRecord).join(DatasetUpload)
                .where(DatasetRecord.dataset_id == dataset_id, DatasetUpload.committed.is_(True)))).scalar_one())

    # -- uploads ----------------------------------------------------------------------------------------
    async def upload(self, dataset_id: str, chunks: AsyncIterator[bytes], on_error: str) -> UploadResult:
        if on_error not in ("reject", "skip"):
            raise Unprocessable("on_error must be 'reject' or 'skip'", field="on_error")
        dataset = await self.get(dataset_id)
        if dataset.deleted_at is not None:
            raise Conflict(f"dataset {dataset_id} was deleted; create another", field="dataset_id")
        upload_id = "up-" + uuid.uuid4().hex[:20]
        async with self.sessions() as s, s.begin():
            s.add(DatasetUpload(id=upload_id, dataset_id=dataset_id, committed=False))
        result = UploadResult(upload_id)
        pending: list[tuple[int, Row]] = []
        analyzed_at = BATCH
        try:
            async for line_no, item in aiter_ndjson(chunks):
                if isinstance(item, RowError):
                    result.rejected += 1
                    if len(result.errors) < MAX_REPORTED_ERRORS:
                        result.errors.append({"line": line_no, "field": item.field, "reason": item.reason})
                    continue
                if result.rejected and on_error == "reject":
                    continue  # keep parsing to report every bad line, but store nothing more
                pending.append((line_no, item))
                if len(pending) >= BATCH:
                    await self._insert(dataset_id, upload_id, pending, result)
                    pending = []
                    if result.accepted >= analyzed_at * 4:  # statistics keep up as the table grows
                        analyzed_at = result.accepted
                        await self._refresh_statistics()
            if pending and not (result.rejected and on_error == "reject"):
                await self._insert(dataset_id, upload_id, pending, result)
        except BaseException:
            await self._discard(upload_id)
            raise
        if result.rejected and on_error == "reject":
            await self._discard(upload_id)
            metrics.DATASET_ROWS.labels(dataset.deployment, "rejected").inc(result.rejected)
            raise Unprocessable(
                f"{result.rejected} invalid line(s); the upload was rejected and nothing was stored "
                "(use ?on_error=skip to store the valid lines)",
                field=f"line {result.errors[0]['line']}: {result.errors[0]['field']}", errors=result.errors,
                extra={"accepted": 0, "duplicates": 0, "rejected": result.rejected})
        try:
            async with self.sessions() as s, s.begin():
                await dataset_deletion.hold(s, dataset_id, "dataset_id")  # deleted meanwhile: nothing is stored
                await s.execute(update(DatasetUpload).where(DatasetUpload.id == upload_id).values(
                    committed=True, accepted=result.accepted, duplicates=result.duplicates, rejected=result.rejected))
        except Conflict:
            await self._discard(upload_id)
            raise
        await self._refresh_statistics()
        for outcome, n in (("accepted", result.accepted), ("duplicate", result.duplicates),
                           ("rejected", result.rejected)):
            if n:
                metrics.DATASET_ROWS.labels(dataset.deployment, outcome).inc(n)
        return result

    async def _insert(self, dataset_id: str, upload_id: str, batch: list[tuple[int, Row]],
                      result: UploadResult) -> None:
        hashes = [r.content_hash for _, r in batch]
        async with self.sessions() as s, s.begin():
            known = set((await s.execute(
                select(DatasetRecord.content_hash).join(DatasetUpload)
                .where(DatasetRecord.dataset_id == dataset_id, DatasetRecord.content_hash.in_(set(hashes)),
                       (DatasetUpload.committed.is_(True)) | (DatasetUpload.id == upload_id)))).scalars())
            rows = []
            for (_, row), h in zip(batch, hashes, strict=True):
                if h in known:
                    result.duplicates += 1
                    continue
                known.add(h)
                rows.append({"dataset_id": dataset_id, "upload_id": upload_id, "content_hash": h,
                             "row": row.to_json()})
            if rows:
                await s.execute(DatasetRecord.__table__.insert(), rows)
            result.accepted += len(rows)

    async def _refresh_statistics(self) -> None:
        async with self.sessions() as s, s.begin():
            await refresh_statistics(s, DatasetRecord.__tablename__)

    async def _discard(self, upload_id: str) -> None:
        async with self.sessions() as s, s.begin():
            await s.execute(delete(DatasetRecord).where(DatasetRecord.upload_id == upload_id))
            await s.execute(delete(DatasetUpload).where(DatasetUpload.id == upload_id))

    async def sweep_abandoned_uploads(self) -> int:
        """Remove records of uploads that never committed (the process died mid-upload)."""
        async with self.sessions() as s:
            ids = list((await s.execute(select(DatasetUpload.id).where(DatasetUpload.committed.is_(False)))).scalars())
        for i in ids:
            await self._discard(i)
        return len(ids)

    async def rows(self, dataset_id: str) -> list[Row]:
        async with self.sessions() as s:
            res = await s.stream(select(DatasetRecord.row).join(DatasetUpload)
                                 .where(DatasetRecord.dataset_id == dataset_id, DatasetUpload.committed.is_(True))
                                 .order_by(DatasetRecord.id))
            return [parse_row(r) async for r in res.scalars()]

    # -- snapshots --------------------------------------------------------------------------------------
    async def check_sources(self, deployment: str, dataset_ids: list[str], include_feedback: Any,
                            config: CurationConfig) -> SnapshotSources:
        """The cheap checks of a snapshot request (ownership, something to curate; the caller checked the
        config with `checked_curation`), so that a bad request is a 422 at once; the curation itself runs
        later, in a worker."""
        if not isinstance(include_feedback, bool):
            raise Unprocessable("include_feedback must be a boolean", field="include_feedback")
        records = 0
        for ds in dataset_ids:
            d = await self.get(ds)
            if d.deleted_at is not None:
                raise Conflict(f"dataset {ds} was deleted", field="datasets")
            if d.deployment != deployment:
                raise Unprocessable(f"dataset {ds} belongs to deployment {d.deployment!r}", field="datasets")
            records += await self.record_count(ds)
        if not records and include_feedback:
            async with self.sessions() as s:
                records = (await s.execute(select(func.count()).select_from(Feedback)
                                           .where(Feedback.deployment == deployment))).scalar_one()
        if not records:
            raise Unprocessable("there are no rows to snapshot (upload records or include feedback)", field="datasets")
        return SnapshotSources(deployment, tuple(dataset_ids), include_feedback, config.to_dict())

    async def queue_snapshot(self, sources: SnapshotSources) -> Job:
        """A snapshot job: curation is slow work, so a worker runs it (`GET /v1/snapshot_jobs/{id}`)."""
        job = Job(id="snapjob-" + uuid.uuid4().hex[:20], kind="snapshot", deployment=sources.deployment,
                  status="queued", spec={"sources": sources.to_json()}, hyperparameters={})
        async with self.sessions() as s, s.begin():
            for ds in sources.dataset_ids:
                await dataset_deletion.hold(s, ds, "datasets")  # a concurrent delete waits, then refuses
            s.add(job)
            s.add(JobEvent(job_id=job.id, type="created", message="snapshot queued", data=sources.to_json()))
        return job

    async def build_snapshot(self, sources: SnapshotSources,
                             on_step: Callable[[StepReport, int], None] | None = None,
                             job_id: str | None = None) -> Snapshot:
        """Curate the sources into a content-addressed snapshot (worker side; `on_step` reports progress) and
        record it on job `job_id` in the same transaction, so that no delete comes between. The same content
        curated again is the same snapshot; a deleted one is restored."""
        config = CurationConfig.from_dict(sources.curation)
        rows: list[Row] = []
        for ds in sources.dataset_ids:
            rows.extend(await self.rows(ds))
        feedback_range = None
        if sources.include_feedback:
            items, feedback_range = await feedback_for_training(self.sessions, sources.deployment)
            rows.extend(rows_from_feedback(items, max_pairs_per_prompt=config.feedback.max_pairs_per_prompt,
                                           sft_min_rating=config.feedback.sft_min_rating, skip_invalid=True))
        if not rows:
            raise Unprocessable("there are no rows to snapshot (upload records or include feedback)", field="datasets")
        result = await asyncio.to_thread(run_pipeline, rows, config, self.count_tokens, on_step)
        snap_id = "snap-" + result.content_hash()[:32]
        async with self.sessions() as s:
            existing = await s.get(Snapshot, snap_id)
        path = None if existing else await asyncio.to_thread(self._write, snap_id, result)  # new: before the lock
        async with self.sessions() as s, s.begin():
            snap = await snapshot_deletion.locked(s, snap_id)
            if snap is None:
                counts = {"input": result.input_count, "train": len(result.train),
                          "validation": len(result.validation)}
                ids = sources.dataset_ids
                snap = Snapshot(id=snap_id, dataset_id=ids[0] if len(ids) == 1 else None,
                                deployment=sources.deployment, path=str(path), counts=counts,
                                curation=config.to_dict(), report=_jsonable(quality_report(result)),
                                feedback_range=feedback_range)
                s.add(snap)
                await self.artifacts.add(s, snap_id, Path(snap.path))
            elif snap.deleted_at is not None:  # restored, under the row lock the deleted-files sweep takes
                path = await asyncio.to_thread(self._write, snap_id, result)
                snap.path, snap.created_at, snap.deleted_at, snap.deleted_reason = str(path), time.time(), None, None
                await self.artifacts.add(s, snap_id, path)
                log.info("snapshot %s curated again: restored", snap_id)
            if job_id is not None:
                await s.execute(update(Job).where(Job.id == job_id).values(snapshot_id=snap_id))
        return snap

    def _write(self, snap_id: str, result: CurationResult) -> Path:
        """Write train/validation JSONL and the HTML report atomically (tmp dir, then rename)."""
        root = self.data_dir / "snapshots"
        final = root / snap_id
        if final.exists():
            return final
        tmp = root / f".{snap_id}.{uuid.uuid4().hex[:6]}"
        tmp.mkdir(parents=True)
        for name, rows, weights in (("train", result.train, result.weights),
                                    ("validation", result.validation, result.validation_weights)):
            with (tmp / f"{name}.jsonl").open("w") as f:
                for i, row in enumerate(rows):
                    out = {"kind": row.kind, **row.to_json()}
                    if weights is not None:
                        out["weight"] = weights[i]
                    f.write(json.dumps(out, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
        (tmp / "report.html").write_text(quality_report_html(result))
        try:
            os.replace(tmp, final)
        except OSError:  # a concurrent writer won the race with the same content
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    async def snapshot_dir(self, snap: Snapshot) -> Path:
        """The snapshot's files on this machine (fetched from the artifact store where another made them)."""
        return Path(await self.artifacts.local(snap.id, snap.path))

    async def get_snapshot(self, snap_id: str) -> Snapshot:
        async with self.sessions() as s:
            snap = await s.get(Snapshot, snap_id)
        if snap is None:
            raise NotFound(f"snapshot {snap_id!r} does not exist")
        return snap


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
