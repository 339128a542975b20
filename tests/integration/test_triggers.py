"""Retraining triggers on a real database: monitor passes at the same moment, in one API process or in two,
create one job, not two."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace

from sqlalchemy import func, select

from service.core.monitor import Monitor
from service.settings import Settings
from service.storage.models import Completion, Deployment, Feedback, MonitorRun

SETTINGS = Settings(drift_window=100, completion_retention_days=0)  # the monitor without the retention


class RecordingJobs:
    """Stands in for the job service: the logic under test is the trigger's decision, not job creation."""

    def __init__(self) -> None:
        self.created: list[dict] = []

    async def create(self, body: dict) -> SimpleNamespace:
        await asyncio.sleep(0.05)  # a real create commits; let the other pass interleave here
        self.created.append(body)
        return SimpleNamespace(id=f"ftjob-{len(self.created)}")


async def _seed(sessions, corrections: int) -> None:
    async with sessions() as s, s.begin():
        s.add(Deployment(name="trig", base_model="m", config={"triggers": {"corrections": 3, "job": {"suffix": "t"}}}))
        for i in range(corrections):
            s.add(Completion(id=f"c{i}", deployment="trig", adapter="base", kind="chat", attributes={},
                             prompt=[{"role": "user", "content": f"q{i}"}], prompt_hash="h", output="x",
                             created_at=time.time()))
        await s.flush()
        for i in range(corrections):
            s.add(Feedback(completion_id=f"c{i}", deployment="trig", correction="card_arrival"))


async def test_concurrent_trigger_passes_create_one_job(sessions, tmp_path: Path) -> None:
    await _seed(sessions, corrections=5)
    jobs = RecordingJobs()
    monitor = Monitor(SimpleNamespace(sessions=sessions, jobs=jobs, settings=SETTINGS))

    first, second = await asyncio.gather(monitor.triggers("trig"), monitor.triggers("trig"))

    assert len(jobs.created) == 1, jobs.created
    assert jobs.created[0]["include_feedback"] is True and jobs.created[0]["suffix"] == "t"
    fired = [r for r in (first, second) if r is not None]
    assert len(fired) == 1 and fired[0]["outcome"] == "job_created"
    assert fired[0]["reasons"] == ["5 new corrections (threshold 3)"]
    async with sessions() as s:
        runs = (await s.execute(select(func.count()).select_from(MonitorRun)
                                .where(MonitorRun.kind == "trigger"))).scalar_one()
    assert runs == 1
    # nothing new since: a later pass does not fire again
    assert await monitor.triggers("trig") is None


async def test_two_api_processes_fire_one_trigger(sessions, database_url: str) -> None:
    """Each replica has its own engine and monitor; only the database can make them agree."""
    from service.storage.db import make_engine, make_sessionmaker

    await _seed(sessions, corrections=5)
    other_engine = make_engine(database_url)
    try:
        replicas = [(RecordingJobs(), sessions), (RecordingJobs(), make_sessionmaker(other_engine))]
        monitors = [Monitor(SimpleNamespace(sessions=sm, jobs=jobs, settings=SETTINGS))
                    for jobs, sm in replicas]
        results = await asyncio.gather(*(m.triggers("trig") for m in monitors))
    finally:
        await other_engine.dispose()
    assert sum(len(jobs.created) for jobs, _ in replicas) == 1
    assert sum(r is not None for r in results) == 1
    async with sessions() as s:
        runs = list((await s.execute(select(MonitorRun).where(MonitorRun.kind == "trigger"))).scalars())
    assert len(runs) == 1 and runs[0].follows == 0 and runs[0].data["outcome"] == "job_created"


async def test_fairness_runs_only_on_new_feedback(sessions) -> None:
    """A fairness run per monitor pass was a stored row and a fairlearn computation a minute per deployment even
    when no feedback came; the same rows give the same report, so now only new feedback makes a run."""
    async with sessions() as s, s.begin():
        s.add(Deployment(name="fair", base_model="m"))
        for i in range(40):
            s.add(Completion(id=f"f{i}", deployment="fair", adapter="base", kind="chat", prompt="q", prompt_hash="h",
                             attributes={"segment": "ab"[i % 2]}, output="x", created_at=time.time()))
        await s.flush()
        s.add_all([Feedback(completion_id=f"f{i}", deployment="fair", rating=float(i % 3 == 0)) for i in range(39)])
    monitor = Monitor(SimpleNamespace(sessions=sessions, settings=SETTINGS))

    first = await monitor.fairness("fair")
    assert first is not None and first["rows"] == 39 and "segment" in first["attributes"]
    assert await monitor.fairness("fair") is None
    async with sessions() as s, s.begin():
        s.add(Feedback(completion_id="f39", deployment="fair", rating=1.0))
    assert (await monitor.fairness("fair"))["rows"] == 40
    assert await Monitor(SimpleNamespace(sessions=sessions, settings=SETTINGS)).fairness("fair") is not None  # restart
    async with sessions() as s:
        runs = (await s.execute(select(MonitorRun.data).where(MonitorRun.kind == "fairness")
                                 .order_by(MonitorRun.id))).scalars().all()
    assert [r["rows"] for r in runs] == [39, 40, 40]
