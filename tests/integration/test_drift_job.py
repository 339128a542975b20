"""Drift as a worker job on a real database (SQLite and PostgreSQL) with real evidently in a child process:
progress events, a stored run with its HTML report, one pending job per deployment, and cancel."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace

from sqlalchemy import select, update

from service.core import drift
from service.storage.artifacts import ArtifactStore
from service.storage.models import Completion, Deployment, Job, JobEvent, MonitorRun
from service.worker import WorkerContext, claim_job

WEEK1 = ["where is my card", "my card has not arrived yet", "when will the card come", "card delivery time"]
WEEK2 = ["why was I charged a fee for the transfer", "the exchange rate on my payment is wrong",
         "I was charged twice for one purchase", "there is an extra fee on my statement"]


async def _seed(sessions, rows: int) -> None:
    """Week 1: card-arrival questions from the web; week 2: fee questions, mostly by voice."""
    t0 = time.time() - 10_000
    async with sessions() as s, s.begin():
        s.add(Deployment(name="drifty", base_model="m", config={}))
        for week, texts, label in ((0, WEEK1, "card_arrival"), (1, WEEK2, "extra_charge_on_statement")):
            for i in range(rows):
                segment = "web" if week == 0 or i % 4 == 0 else "voice"
                s.add(Completion(id=f"c{week}-{i}", deployment="drifty", adapter="base", kind="chat",
                                 attributes={"segment": segment}, prompt_hash="h", output=label,
                                 prompt=[{"role": "user", "content": f"{texts[i % 4]} (ref {i})"}],
                                 created_at=t0 + week * 5000 + i))


def _worker(sessions, tmp_path: Path, window: int) -> WorkerContext:
    settings = SimpleNamespace(drift_window=window, heartbeat_seconds=0.2, data_dir=tmp_path,
                               artifacts_in_database=True)
    return WorkerContext(settings, sessions, "test-worker")  # type: ignore[arg-type]


async def _events(sessions, job_id: str) -> list[JobEvent]:
    async with sessions() as s:
        return list((await s.execute(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)))
                    .scalars())


async def test_drift_job_reports_progress_and_stores_the_run(sessions, tmp_path: Path) -> None:
    await _seed(sessions, rows=60)
    job = await drift.queue_drift_job(sessions, "drifty")
    assert (await drift.queue_drift_job(sessions, "drifty")).id == job.id  # one pending job per deployment

    claimed = await claim_job(sessions, "test-worker", ("drift",))
    assert claimed is not None and claimed.id == job.id
    await drift.run_drift_job(_worker(sessions, tmp_path, window=60), claimed)

    async with sessions() as s:
        done = await s.get(Job, job.id)
        run = (await s.execute(select(MonitorRun).where(MonitorRun.kind == "drift"))).scalar_one()
    assert done.status == "succeeded", done.error
    assert done.metrics["monitor_run_id"] == run.id
    assert (done.metrics["reference_rows"], done.metrics["current_rows"]) == (60, 60)
    assert run.data["reference_source"] == "first traffic window"
    drifted = set(done.metrics["drifted"])
    assert {"answer_label", "attr_segment"} <= drifted, run.data["features"]
    assert run.data["share"] > 0 and "<html" in Path(run.html_path).read_text().lower()
    report = Path(run.html_path).read_text()
    Path(run.html_path).unlink()  # a process on another machine fetches it from the database
    fetched = await ArtifactStore(sessions, tmp_path / "elsewhere", store=False).local(f"drift-{run.id}", run.html_path)
    assert fetched != run.html_path and Path(fetched).read_text() == report
    assert [e.type for e in await _events(sessions, job.id)] == ["created", "windows", "computing", "succeeded"]
    # a finished job is no longer pending: the next request queues a new one
    assert (await drift.queue_drift_job(sessions, "drifty")).id != job.id


async def test_too_little_traffic_is_a_skipped_run_not_an_error(sessions, tmp_path: Path) -> None:
    await _seed(sessions, rows=10)
    await drift.queue_drift_job(sessions, "drifty")
    claimed = await claim_job(sessions, "test-worker", ("drift",))
    await drift.run_drift_job(_worker(sessions, tmp_path, window=60), claimed)
    async with sessions() as s:
        done = await s.get(Job, claimed.id)
        runs = (await s.execute(select(MonitorRun))).scalars().all()
    assert done.status == "succeeded" and "at least 30 rows" in done.metrics["skipped"]
    assert runs == []


async def test_cancel_kills_the_computation_and_stores_nothing(sessions, tmp_path: Path) -> None:
    await _seed(sessions, rows=60)
    # A warm child from an earlier test computes 60 rows faster than a heartbeat: start cold, so the
    # cancel lands while the child still imports evidently (seconds) and the race cannot be lost.
    drift._kill_pool()
    await drift.queue_drift_job(sessions, "drifty")
    claimed = await claim_job(sessions, "test-worker", ("drift",))
    task = asyncio.create_task(drift.run_drift_job(_worker(sessions, tmp_path, window=60), claimed))
    for _ in range(600):  # the event comes before the child has even started
        if "computing" in [e.type for e in await _events(sessions, claimed.id)]:
            break
        await asyncio.sleep(0.05)
    async with sessions() as s, s.begin():  # what POST /v1/monitoring/drift_jobs/{id}/cancel sets
        await s.execute(update(Job).where(Job.id == claimed.id).values(cancel_requested=True))
    await asyncio.wait_for(task, 60)

    async with sessions() as s:
        done = await s.get(Job, claimed.id)
        runs = (await s.execute(select(MonitorRun))).scalars().all()
    assert done.status == "cancelled" and runs == []
    assert drift._pool is None  # the child was killed, not left computing
    assert [e.type for e in await _events(sessions, claimed.id)][-1] == "cancelled"
