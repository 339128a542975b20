"""Two `tuneloop serve` processes on one real PostgreSQL database, in front of one real vLLM: a deployment,
promote, rollback or experiment made through one of them is followed by the other, concurrent promotes
through both leave one consistent history, and exactly one of them makes the monitor's decisions."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import (
    PG_URL,
    Service,
    _reset_pg,
    banking77_sample,
    start_service,
    start_worker,
    stop_service,
)
from tests.conftest_vllm import register_random_lora_at

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
DEP = "shared"


def _served_by(svc: Service, user: str | None = None) -> httpx.Response:
    with svc.client() as c:
        body = {"model": DEP, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}
        return c.post("/v1/chat/completions", json=body | ({"user": user} if user else {}))


def _until(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    """Wait for another process to follow (it looks at the database every second)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def _leader(svc: Service) -> float:
    text = httpx.get(svc.url + "/metrics").text
    return float(next(ln.rsplit(" ", 1)[1] for ln in text.splitlines() if ln.startswith("tuneloop_monitor_leader ")))


@pytest.fixture
def replicas(tmp_path: Path, base_model_dir: str, vllm_supervisor) -> Iterator[tuple[Service, Service]]:
    _reset_pg()
    env = {"TUNELOOP_START_WORKER": "false", "TUNELOOP_EXPERIMENT_INTERVAL_SECONDS": "1"}
    a = start_service(tmp_path / "a", base_model_dir, [vllm_supervisor.base_url], database_url=PG_URL, env=env)
    try:
        b = start_service(tmp_path / "b", base_model_dir, [vllm_supervisor.base_url], database_url=PG_URL, env=env)
    except BaseException:
        stop_service(a)
        raise
    try:
        with a.client() as c:
            assert c.post("/v1/deployments", json={"name": DEP}).status_code == 201
        _until("B did not learn of the deployment A created", lambda: _served_by(b).status_code == 200)
        yield a, b
    finally:
        stop_service(a)
        stop_service(b)


def test_a_promote_and_a_rollback_through_one_process_reach_the_other(replicas, base_model_dir, tmp_path) -> None:
    a, b = replicas
    first = register_random_lora_at(PG_URL, Path(base_model_dir), tmp_path / "lora-1", DEP, 1)
    with a.client() as c:
        assert c.post(f"/v1/deployments/{DEP}/promote", json={"adapter_id": first}).status_code == 200
    on_a = _served_by(a).headers["x-tuneloop-adapter"]
    assert on_a.startswith(f"{DEP}--{first}--g"), on_a
    _until("B still serves the old production",
           lambda: _served_by(b).headers["x-tuneloop-adapter"].startswith(f"{DEP}--{first}--g"))
    assert _served_by(b).headers["x-tuneloop-adapter"] != on_a  # each process loads under its own name

    with b.client() as c:
        r = c.post(f"/v1/deployments/{DEP}/rollback")
        assert r.status_code == 200 and r.json()["adapter_id"] is None, r.text
    assert _served_by(b).headers["x-tuneloop-adapter"] == "base"
    _until("A still serves the adapter B rolled back", lambda: _served_by(a).headers["x-tuneloop-adapter"] == "base")
    with a.client() as c:
        assert [e["type"] for e in c.get(f"/v1/deployments/{DEP}/history").json()["data"]] == ["promote", "rollback"]


def _promote_at_once(promotes: list[tuple[Service, str]]) -> dict[str, httpx.Response]:
    """Send every (process, adapter id) promote at the same moment; the responses by adapter id."""
    results: dict[str, httpx.Response] = {}
    go = threading.Barrier(len(promotes))

    def promote(svc: Service, adapter: str) -> None:
        with svc.client() as c:
            go.wait()
            results[adapter] = c.post(f"/v1/deployments/{DEP}/promote", json={"adapter_id": adapter})

    threads = [threading.Thread(target=promote, args=p) for p in promotes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_concurrent_promotes_through_both_processes_leave_one_consistent_history(replicas, base_model_dir,
                                                                                tmp_path) -> None:
    """Both load a new adapter at once; the second commit finds production changed and is refused (409), so
    the history is one chain and both processes end up serving what the database says."""
    a, b = replicas
    accepted = 0
    for round_ in range(5):
        ids = [register_random_lora_at(PG_URL, Path(base_model_dir), tmp_path / f"lora-{round_}-{i}", DEP,
                                       10 * round_ + i) for i in (1, 2)]
        results = _promote_at_once(list(zip((a, b), ids, strict=True)))
        assert {r.status_code for r in results.values()} <= {200, 409}, [r.text for r in results.values()]
        assert any(r.status_code == 200 for r in results.values())
        accepted += sum(r.status_code == 200 for r in results.values())
        with a.client() as c:
            production = c.get(f"/v1/deployments/{DEP}").json()["production_adapter_id"]
        for svc in (a, b):
            _until(f"{svc.url} does not serve production {production}",
                   lambda svc=svc, p=production: _served_by(svc).headers["x-tuneloop-adapter"].startswith(
                       f"{DEP}--{p}--g"))
    with a.client() as c:
        history = c.get(f"/v1/deployments/{DEP}/history").json()["data"]
    assert len(history) == accepted
    previous = None
    for event in history:
        assert event["previous_adapter_id"] == previous, history
        previous = event["adapter_id"]


def test_an_experiment_through_one_process_is_routed_by_both_and_one_process_decides(replicas, base_model_dir,
                                                                                    tmp_path) -> None:
    a, b = replicas
    _until("not exactly one process holds the leader lock", lambda: _leader(a) + _leader(b) == 1)
    treatment = register_random_lora_at(PG_URL, Path(base_model_dir), tmp_path / "lora-1", DEP, 1)
    with a.client() as c:
        r = c.post("/v1/experiments", json={
            "deployment": DEP, "seed": DEP, "goal": {"metric": "rating"},
            "variants": [{"name": "control", "adapter_id": None, "weight": 0.5},
                         {"name": "treatment", "adapter_id": treatment, "weight": 0.5}],
            "policy": {"auto_promote": False, "auto_rollback": False}})
        assert r.status_code == 201, r.text
        exp = r.json()["id"]

    users = [f"u{i}" for i in range(16)]
    _until("B does not route the experiment A started",
           lambda: all("x-tuneloop-variant" in _served_by(b, u).headers for u in users[:2]))
    variants = {}
    for u in users:
        on_a, on_b = _served_by(a, u).headers, _served_by(b, u).headers
        assert on_a["x-tuneloop-variant"] == on_b["x-tuneloop-variant"], u  # sticky across processes
        variants[u] = on_b["x-tuneloop-variant"]
        if variants[u] == "treatment":
            assert on_b["x-tuneloop-adapter"].startswith(f"{DEP}--{treatment}--g")
            assert on_b["x-tuneloop-adapter"] != on_a["x-tuneloop-adapter"]
    assert set(variants.values()) == {"control", "treatment"}, variants

    with b.client() as c:
        assert c.post(f"/v1/experiments/{exp}/stop").status_code == 200
        assert c.post(f"/v1/experiments/{exp}/stop").status_code == 409
    _until("A still routes the experiment B stopped",
           lambda: all("x-tuneloop-variant" not in _served_by(a, u).headers for u in users))
    with a.client() as c:
        events = [e["type"] for e in c.get(f"/v1/experiments/{exp}").json()["events"]]
    assert events.count("started") == 1 and events.count("stopped") == 1, events

    leader, other = (a, b) if _leader(a) == 1 else (b, a)
    stop_service(leader)
    _until("the other process did not take over the decisions", lambda: _leader(other) == 1)


def test_what_a_worker_on_another_machine_makes_reaches_both_processes_through_the_database(
        replicas, base_model_dir, banking77_dir, tmp_path) -> None:
    """A worker with its own data directory curates, trains and evaluates; on PostgreSQL it stores the snapshot, the
    adapter and the report with their records, by default. Its directory is deleted before anything else reads it,
    as if it were on another machine: both API processes serve the adapter, and the reports still open."""
    a, b = replicas
    worker_dir = tmp_path / "worker-machine"
    worker = start_worker(worker_dir, tmp_path / "worker.log", base_model_dir, PG_URL)
    try:
        sample = banking77_sample(banking77_dir, seed=2, n=40)
        with a.client() as c:
            # A gate no adapter passes: a passed one is staged by both processes at once, and here (one machine)
            # they would load it from the worker's directory while it still exists.
            assert c.patch(f"/v1/deployments/{DEP}", json={"config": {
                "eval_max_rows": 6, "retention_rows": 4, "gates": {"min_task_delta": 2.0}}}).status_code == 200
            ds = c.post("/v1/datasets", json={"name": "elsewhere", "deployment": DEP}).json()
            assert c.post(f"/v1/datasets/{ds['id']}/records", content=b"".join(json.dumps(r).encode() + b"\n"
                                                                              for r in sample),
                          headers={"content-type": "application/x-ndjson"}).status_code == 201
            job = c.post("/v1/fine_tuning/jobs", json={
                "deployment": DEP, "datasets": [ds["id"]], "curation": {"split": {"validation_fraction": 0.15}},
                "method": {"type": "sft", "hyperparameters": {
                    "n_epochs": 1, "max_steps": 2, "batch_size": 4, "lora_r": 8, "lora_alpha": 16,
                    "target_modules": ["q_proj", "v_proj"], "max_seq_len": 64}}}).json()
            _until("the worker did not finish the job", lambda: c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
                   ["status"] in ("succeeded", "failed", "cancelled"), timeout=900)
            job = c.get(f"/v1/fine_tuning/jobs/{job['id']}").json()
            assert job["status"] == "succeeded", job
            aid = job["adapter_id"]
            _until("the worker did not finish the evaluation", lambda: (evs := c.get(
                f"/v1/adapters/{aid}/evaluations").json()["data"]) and evs[0]["status"] == "failed",
                   timeout=900)
            evaluation = c.get(f"/v1/adapters/{aid}/evaluations").json()["data"][0]
    finally:
        worker.terminate()
        worker.wait(60)
    shutil.rmtree(worker_dir)

    with b.client() as c:
        snapshot = c.get(f"/v1/snapshots/{job['snapshot_id']}/report", headers={"accept": "text/html"})
        assert snapshot.status_code == 200 and snapshot.headers["content-type"].startswith("text/html"), snapshot.text
        report = c.get(f"/v1/evaluations/{evaluation['id']}/report", headers={"accept": "text/html"})
        assert report.headers["content-type"].startswith("text/html") and "<img" in report.text
        r = c.post(f"/v1/deployments/{DEP}/promote", json={"adapter_id": aid, "force": True})
        assert r.status_code == 200, r.text
    served = _served_by(b)
    assert served.headers.get("x-tuneloop-adapter", "").startswith(f"{DEP}--{aid}--g"), served.text
    _until("A does not serve the adapter B promoted",
           lambda: _served_by(a).headers["x-tuneloop-adapter"].startswith(f"{DEP}--{aid}--g"))
    for svc in (a, b):  # each process fetched its own copy
        assert [p.name for p in (svc.data_dir / "artifacts" / aid).glob("*/adapter_config.json")] == ["adapter_config.json"]
