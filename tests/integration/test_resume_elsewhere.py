"""Workers on two machines sharing one real PostgreSQL and nothing else: a training job whose worker dies on one
resumes from its last checkpoint on the other (stored in the database), and once its adapter is deleted the other
worker removes the files it made there; a hyperparameter search goes on there without repeating its finished
trials."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from service.storage.db import make_engine, make_sessionmaker
from service.storage.models import ArtifactChunk
from tests.conftest import (
    PG_URL,
    Service,
    _reset_pg,
    banking77_sample,
    start_service,
    start_worker,
    stop_service,
)

pytestmark = [pytest.mark.slow]
DEP = "elsewhere"
QUICK_REQUEUE = {"TUNELOOP_HEARTBEAT_TIMEOUT_SECONDS": "8"}  # a job without heartbeat for 8 s goes back to the queue


def _until(what: str, check: Callable[[], object], timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.3)


def _stored_artifacts() -> set[str]:
    async def query() -> set[str]:
        engine = make_engine(PG_URL)
        try:
            async with make_sessionmaker(engine)() as s:
                return set((await s.execute(select(ArtifactChunk.artifact_id).distinct())).scalars())
        finally:
            await engine.dispose()

    return asyncio.run(query())


@contextlib.contextmanager
def _machines(tmp_path: Path, base_model_dir: str, vllm_supervisor) -> Iterator[tuple[Service, list]]:
    """An API process (no worker) and worker A on machine A, sharing a fresh PostgreSQL; workers appended to the
    list are stopped at the end too."""
    _reset_pg()
    svc = start_service(tmp_path / "api", base_model_dir, [vllm_supervisor.base_url], database_url=PG_URL,
                        env={"TUNELOOP_START_WORKER": "false"})
    workers = [start_worker(tmp_path / "machine-a", tmp_path / "worker-a.log", base_model_dir, PG_URL, **QUICK_REQUEUE)]
    try:
        yield svc, workers
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.terminate()
                worker.wait(60)
        stop_service(svc)


def _dataset(c, banking77_dir: Path, seed: int, n: int) -> str:
    """The deployment (a gate no adapter passes, so that nothing stages the adapter) and a dataset of `n` rows."""
    assert c.post("/v1/deployments", json={"name": DEP, "config": {
        "eval_max_rows": 6, "retention_rows": 4, "gates": {"min_task_delta": 2.0}}}).status_code == 201
    ds = c.post("/v1/datasets", json={"name": "resume", "deployment": DEP}).json()
    assert c.post(f"/v1/datasets/{ds['id']}/records", content=b"".join(
        json.dumps(r).encode() + b"\n" for r in banking77_sample(banking77_dir, seed=seed, n=n)),
        headers={"content-type": "application/x-ndjson"}).status_code == 201
    return ds["id"]  # type: ignore[no-any-return]


def _kill(worker, data_dir: Path) -> None:
    """The machine is gone: its worker (and trainer, by PDEATHSIG) killed, its files unreachable."""
    worker.send_signal(signal.SIGKILL)
    worker.wait(30)
    shutil.rmtree(data_dir)


def test_a_job_resumes_on_another_machine_and_its_deleted_adapter_leaves_that_machine(
        base_model_dir, banking77_dir, vllm_supervisor, tmp_path) -> None:
    with _machines(tmp_path, base_model_dir, vllm_supervisor) as (svc, workers), svc.client() as c:
        ds = _dataset(c, banking77_dir, seed=3, n=48)
        job = c.post("/v1/fine_tuning/jobs", json={
            "deployment": DEP, "datasets": [ds], "curation": {"split": {"validation_fraction": 0.15}},
            "method": {"type": "sft", "hyperparameters": {
                "n_epochs": 3, "max_steps": 12, "batch_size": 4, "lora_r": 8, "lora_alpha": 16,
                "target_modules": ["q_proj", "v_proj"], "max_seq_len": 64}}}).json()

        def events() -> list[dict]:
            return c.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]

        _until("machine A stored no checkpoint", lambda: any(
            e["type"] == "checkpoint" and e["data"].get("stored") for e in events()))
        _kill(workers[0], tmp_path / "machine-a")
        stored = max(e["data"]["step"] for e in events() if e["type"] == "checkpoint" and e["data"].get("stored"))
        assert f"ckpt-{job['id']}" in _stored_artifacts()

        workers.append(start_worker(tmp_path / "machine-b", tmp_path / "worker-b.log", base_model_dir, PG_URL,
                                    TUNELOOP_ADAPTER_DELETE_GRACE_SECONDS="0", TUNELOOP_MONITOR_INTERVAL_SECONDS="1",
                                    **QUICK_REQUEUE))
        _until("machine B did not finish the job", lambda: c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
               ["status"] in ("succeeded", "failed", "cancelled"))
        job = c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        assert job["status"] == "succeeded" and job["attempts"] == 2, job
        starts = [e for e in events() if e["type"] == "started"]
        assert len(starts) == 2 and "resuming from checkpoint" in starts[1]["message"], starts
        after = [e["data"]["step"] for e in events() if e["type"] == "step" and e["id"] > starts[1]["id"]]
        assert min(after) == stored + 1, (stored, after)  # from A's last stored checkpoint, not from step 0
        assert f"ckpt-{job['id']}" not in _stored_artifacts()  # dropped once the job ended

        aid = job["adapter_id"]
        adapter_dir = Path(c.get(f"/v1/adapters/{aid}").json()["path"])
        assert adapter_dir.is_relative_to(tmp_path / "machine-b") and adapter_dir.is_dir()
        _until("machine B did not finish the evaluation", lambda: (evs := c.get(
            f"/v1/adapters/{aid}/evaluations").json()["data"]) and evs[0]["status"] == "failed")
        r = c.delete(f"/v1/adapters/{aid}")
        assert r.status_code == 200 and r.json()["status"] == "deleted", r.text
        assert aid not in _stored_artifacts()
        job_dir = tmp_path / "machine-b" / "jobs" / job["id"]
        _until("machine B kept the deleted adapter's files",
               lambda: not adapter_dir.exists() and not job_dir.exists(), timeout=60)


def test_a_search_resumes_on_another_machine_without_repeating_its_finished_trials(
        base_model_dir, banking77_dir, vllm_supervisor, tmp_path) -> None:
    with _machines(tmp_path, base_model_dir, vllm_supervisor) as (svc, workers), svc.client() as c:
        ds = _dataset(c, banking77_dir, seed=5, n=40)
        job = c.post("/v1/fine_tuning/jobs", json={
            "deployment": DEP, "datasets": [ds], "curation": {"split": {"validation_fraction": 0.2}},
            "search": {"n_trials": 3, "space": {"learning_rate": [1e-4, 1e-3]}},
            "method": {"type": "sft", "hyperparameters": {
                "max_steps": 4, "batch_size": 4, "lora_r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
                "max_seq_len": 64}}}).json()

        def events() -> list[dict]:
            return c.get(f"/v1/fine_tuning/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]

        _until("machine A stored no search state", lambda: any(
            e["type"] == "trial" and e["data"].get("stored") for e in events()))
        _kill(workers[0], tmp_path / "machine-a")
        finished_on_a = {e["data"]["number"] for e in events()
                         if e["type"] == "trial" and e["data"]["state"] in ("complete", "pruned")}
        assert 0 in finished_on_a

        workers.append(start_worker(tmp_path / "machine-b", tmp_path / "worker-b.log", base_model_dir, PG_URL,
                                    **QUICK_REQUEUE))
        _until("machine B did not finish the search", lambda: c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
               ["status"] in ("succeeded", "failed", "cancelled"))
        job = c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
        assert job["status"] == "succeeded" and job["attempts"] == 2, job
        starts = [e for e in events() if e["type"] == "started"]
        assert "resuming" in starts[1]["message"], starts
        on_b = [e["data"]["number"] for e in events()
                if e["type"] == "trial" and e["data"]["state"] == "running" and e["id"] > starts[1]["id"]]
        assert on_b and min(on_b) > max(finished_on_a), (finished_on_a, on_b)  # A's finished trials not repeated
        trials = {t["number"]: t["state"] for t in job["metrics"]["trials"]}
        assert all(trials[n] in ("complete", "pruned") for n in finished_on_a), trials
        # three trials finished in all: A's and B's (the one A was in when it died failed, and was made up)
        assert sum(state in ("complete", "pruned") for state in trials.values()) == 3, trials
        assert f"ckpt-{job['id']}" not in _stored_artifacts()
