"""Retention by age on real SQLite and PostgreSQL. Completions: old completions go in batches, except those with feedback,
those of an unfinished experiment and the drift reference; a finished experiment's statistics are frozen first
and read the same afterwards; feedback closes an hour before its completion may go. Monitor history: old fairness
runs, drift runs and drift jobs go, the newest of each and the trigger runs stay."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, select

from monitoring import metrics
from service.core.completion_log import CompletionLog
from service.core.drift import TrafficWindows
from service.core.experiments import ExperimentService
from service.core.feedback import FeedbackService
from service.core.retention import BATCH, CompletionRetention, prune_monitor_history
from service.errors import Gone, Unprocessable
from service.storage.artifacts import ArtifactStore
from service.storage.models import (
    Adapter,
    Completion,
    Deployment,
    DeploymentEvent,
    Experiment,
    Feedback,
    Job,
    JobEvent,
    MonitorRun,
)

DAY = 86400.0
RETENTION = 30 * DAY
WINDOW = 5  # completions per drift window


def completion(deployment: str, created_at: float, **extra: Any) -> dict[str, Any]:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "deployment": deployment, "adapter": deployment,
            "adapter_id": None, "experiment_id": None, "variant": None, "user": None, "attributes": {},
            "kind": "chat", "prompt": [{"role": "user", "content": "hi"}], "prompt_hash": "h", "output": "yes",
            "finish_reason": "stop", "prompt_tokens": 1, "completion_tokens": 1, "latency_seconds": 0.1,
            "stream": False, "error": None, "created_at": created_at, **extra}


def pruned_count(deployment: str) -> float:
    return metrics.REGISTRY.get_sample_value("tuneloop_completions_pruned_total", {"deployment": deployment}) or 0.0


async def test_old_completions_go_unless_something_reads_them(sessions: Any, tmp_path: Path) -> None:
    now = time.time()
    old, promoted = now - 40 * DAY, now - 45 * DAY
    rows: dict[str, list[dict[str, Any]]] = {}
    variants = [{"name": "control", "is_control": True, "weight": 1.0},
                {"name": "treatment", "is_control": False, "weight": 1.0}]
    policy = {"alpha": 0.05, "min_samples_per_variant": 2}
    async with sessions() as s, s.begin():
        s.add_all([Deployment(name="app", base_model="m", production_adapter_id="ad-prod"),
                   Deployment(name="fresh", base_model="m"),
                   Adapter(id="ad-prod", deployment="app", version=1, path="p", status="production", base_model="m",
                           base_model_hash="h"),
                   DeploymentEvent(deployment="app", type="promote", adapter_id="ad-prod", created_at=promoted),
                   Experiment(id="exp-done", deployment="app", status="stopped", seed="s", variants=variants,
                              policy=policy, created_at=old - 3600, finished_at=now - 35 * DAY),
                   Experiment(id="exp-recent", deployment="app", status="stopped", seed="s", variants=variants,
                              policy=policy, created_at=old - 3600, finished_at=now - 2 * DAY),
                   Experiment(id="exp-running", deployment="app", status="running", seed="s", variants=variants,
                              policy=policy, created_at=old - 3600)])
    # production's first traffic (the drift reference: the first WINDOW without error), then more of it
    rows["reference"] = [completion("app", promoted + i, adapter_id="ad-prod") for i in range(WINDOW)]
    rows["failed_in_reference_time"] = [completion("app", promoted + 0.5, adapter_id="ad-prod", error="boom")]
    rows["plain"] = [completion("app", old + i * 0.001, adapter_id="ad-prod") for i in range(BATCH * 2 + 7)]
    rows["with_feedback"] = [completion("app", old + 1) for _ in range(3)]
    rows["finished_experiment"] = [completion("app", old + 2, experiment_id="exp-done", variant=v, user=f"u{i}")
                                   for i, v in enumerate(["control", "treatment"] * 4)]
    rows["recent_experiment"] = [completion("app", old + 2, experiment_id="exp-recent", variant="control")]
    rows["running_experiment"] = [completion("app", old + 2, experiment_id="exp-running", variant="control")]
    rows["young"] = [completion("app", now - RETENTION + 3600) for _ in range(3)]
    rows["fresh_reference"] = [completion("fresh", old + i) for i in range(WINDOW)]  # no production: first traffic
    rows["fresh_plain"] = [completion("fresh", old + WINDOW + i) for i in range(4)]
    async with sessions() as s, s.begin():
        await s.execute(insert(Completion), [r for group in rows.values() for r in group])
        rated = rows["with_feedback"] + rows["finished_experiment"][:4]
        await s.execute(insert(Feedback), [{"completion_id": r["id"], "deployment": "app", "rating": 1.0,
                                            "attributes": {}} for r in rated])

    experiments = ExperimentService(sessions, None, None)  # type: ignore[arg-type]  # statistics only
    async with sessions() as s:
        done = await s.get(Experiment, "exp-done")
    before = await experiments.summary(done)
    windows = TrafficWindows(sessions, WINDOW, ArtifactStore(sessions, tmp_path, store=False))
    counted = pruned_count("app")

    retention = CompletionRetention(sessions, windows, experiments, RETENTION)
    # at most one batch per call: a backlog clears over passes
    assert await retention.prune("app", max_batches=1) == BATCH
    assert await retention.prune("app") == BATCH + 7 + 1 + 4
    assert await retention.prune("app") == 0
    assert await retention.prune("fresh") == 4
    assert pruned_count("app") - counted == 2 * BATCH + 7 + 1 + 4
    async with sessions() as s:
        left = set((await s.execute(select(Completion.id))).scalars())
        frozen = await s.get(Experiment, "exp-done")
        unfrozen = [(await s.get(Experiment, e)).summary for e in ("exp-recent", "exp-running")]
    kept = {"reference", "with_feedback", "recent_experiment", "running_experiment", "young", "fresh_reference"}
    for group, group_rows in rows.items():
        expected = [True] * len(group_rows) if group in kept else \
            [i < 4 for i in range(len(group_rows))] if group == "finished_experiment" else [False] * len(group_rows)
        assert [r["id"] in left for r in group_rows] == expected, group
    # the finished experiment reads the same numbers it had before its completions went; the others were not frozen
    assert frozen.summary == json.loads(json.dumps(before)) and await experiments.summary(frozen) == frozen.summary
    assert [v["requests"] for v in before["variants"]] == [4, 4]
    assert unfrozen == [None, None]
    # the drift reference is the same rows as before the prune
    async with sessions() as s:
        dep = await s.get(Deployment, "app")
    assert await windows.reference_ids(dep) == [r["id"] for r in rows["reference"]]
    assert len((await windows.reference(dep))[0]) == WINDOW

    # Later passes go on from where the last one ended, except for rows that became prunable behind it: those of
    # an experiment finished since, and the old drift reference once production moved on.
    async with sessions() as s, s.begin():
        (await s.get(Experiment, "exp-recent")).finished_at = now - 31 * DAY
    assert await retention.prune("app") == 1
    async with sessions() as s, s.begin():
        (await s.get(Deployment, "app")).production_adapter_id = "ad-next"
        s.add(Adapter(id="ad-next", deployment="app", version=2, path="p", status="production", base_model="m",
                      base_model_hash="h"))
        s.add(DeploymentEvent(deployment="app", type="promote", adapter_id="ad-next", created_at=now - DAY))
    assert await retention.prune("app") == WINDOW
    async with sessions() as s:
        left = set((await s.execute(select(Completion.id))).scalars())
    assert not left & {r["id"] for r in rows["recent_experiment"] + rows["reference"]}


@pytest.mark.parametrize("retention", [RETENTION, None])
async def test_feedback_closes_an_hour_before_the_prune(sessions: Any, retention: float | None) -> None:
    now = time.time()
    async with sessions() as s, s.begin():
        s.add(Deployment(name="app", base_model="m"))
    log = CompletionLog(sessions)
    log.start()
    feedback = FeedbackService(sessions, log, retention_seconds=retention)
    feedback.writer.start()
    try:
        closing, open_ = completion("app", now - RETENTION + 1800), completion("app", now - RETENTION + 7200)
        for row in (closing, open_):
            await log.write(row)
        if retention is None:  # kept forever: feedback never closes
            assert len(await feedback.submit({"completion_id": closing["id"], "rating": 1}, None)) == 1
            return
        with pytest.raises(Gone) as single:
            await feedback.submit({"completion_id": closing["id"], "rating": 1}, None)
        assert single.value.field == "completion_id" and "kept 30 days" in str(single.value)
        log._refs.clear()  # the same answer when the completion is read from the database
        with pytest.raises(Unprocessable) as batch:
            await feedback.submit([{"completion_id": open_["id"], "rating": 1},
                                   {"completion_id": closing["id"], "rating": 0}], None)
        assert batch.value.field == "[1].completion_id"
        async with sessions() as s:
            assert (await s.execute(select(Feedback))).first() is None  # nothing of the batch was stored
        assert len(await feedback.submit({"completion_id": open_["id"], "rating": 1}, None)) == 1
    finally:
        await feedback.writer.stop()
        await log.stop()


async def test_old_monitor_history_goes_but_the_newest_of_each_kind(sessions: Any) -> None:
    now = time.time()
    old = now - 100 * DAY
    async with sessions() as s, s.begin():
        s.add_all([Deployment(name=d, base_model="m") for d in ("busy", "quiet")])
        for dep in ("busy", "quiet"):
            for i in range(3):
                s.add(MonitorRun(deployment=dep, kind="fairness", data={"i": i}, created_at=old + i))
                s.add(MonitorRun(deployment=dep, kind="drift", data={"i": i}, created_at=old + i))
                s.add(MonitorRun(deployment=dep, kind="trigger", data={}, follows=i, created_at=old + i))
                s.add(Job(id=f"driftjob-{dep}-{i}", kind="drift", deployment=dep, status="succeeded",
                          created_at=old + i, finished_at=old + i))
                s.add(JobEvent(job_id=f"driftjob-{dep}-{i}", type="windows", data={}, created_at=old + i))
            s.add(MonitorRun(deployment=dep, kind="drift", data={}, html_path="/r.html", created_at=old + 5))
        s.add(MonitorRun(deployment="busy", kind="fairness", data={"recent": True}, created_at=now - DAY))
        s.add(Job(id="driftjob-busy-recent", kind="drift", deployment="busy", status="succeeded",
                  created_at=now - DAY, finished_at=now - DAY))
        s.add(Job(id="driftjob-busy-running", kind="drift", deployment="busy", status="running", created_at=old))
        s.add(Job(id="ftjob-old", kind="fine_tune", deployment="busy", status="succeeded", created_at=old,
                  finished_at=old))

    assert await prune_monitor_history(sessions, "busy", before=now - 90 * DAY, batch=2) == \
        {"monitor_runs": 6, "drift_jobs": 3}
    assert await prune_monitor_history(sessions, "quiet", before=now - 90 * DAY) == \
        {"monitor_runs": 5, "drift_jobs": 2}
    async with sessions() as s:
        runs = {(r.deployment, r.kind, r.data.get("i"), r.html_path is not None)
                for r in (await s.execute(select(MonitorRun))).scalars()}
        jobs = set((await s.execute(select(Job.id))).scalars())
        events = set((await s.execute(select(JobEvent.job_id))).scalars())
    assert runs == {("busy", "fairness", None, False), ("busy", "drift", None, True),  # recent; has its HTML
                    ("quiet", "fairness", 2, False), ("quiet", "drift", None, True)} | {
        (d, "trigger", None, False) for d in ("busy", "quiet")} and len(runs) == 6
    assert jobs == {"driftjob-busy-recent", "driftjob-busy-running", "ftjob-old", "driftjob-quiet-2"}
    assert events == {"driftjob-quiet-2"}
