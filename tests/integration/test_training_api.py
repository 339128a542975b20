"""Training through the public API: a real (small) LoRA run on SmolLM2 by the real worker, lineage,
evaluation, promotion into the real vLLM, cancel, and resume after the worker is SIGKILLed."""

from __future__ import annotations

import json
import random
import signal
import time

import psutil
import pytest

from examples.banking77.prepare import read_rows, to_chat
from tests.conftest import make_snapshot
from tests.conftest_vllm import register_random_lora

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

# Tiny on purpose: the CPU also runs vLLM during the tests. Steps are capped with max_steps.
CURATION = {"split": {"validation_fraction": 0.15}}
SMALL = {"n_epochs": 1, "batch_size": 4, "learning_rate": 2e-3, "lora_r": 8, "lora_alpha": 16,
         "target_modules": ["q_proj", "v_proj"], "max_seq_len": 64, "warmup_ratio": 0.0}


def _wait(c, job_id: str, states=("succeeded", "failed", "cancelled"), timeout: float = 900) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        job = c.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        if job["status"] in states:
            return job
        assert time.monotonic() < deadline, f"job stuck in {job['status']}"
        time.sleep(1)


def _events(c, job_id: str) -> list[dict]:
    return c.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()["data"]


@pytest.fixture(scope="module")
def snapshot_id(service, banking77_dir) -> str:
    rows = read_rows(banking77_dir / "train.csv")
    random.Random(1).shuffle(rows)
    intents = sorted({c for _, c in rows})[:4]  # a small 4-intent task
    sample = [to_chat(t, c) for t, c in rows if c in intents][:80]
    with service.client() as c:
        assert c.post("/v1/deployments", json={"name": "trainer", "config": {
            "eval_max_rows": 8, "retention_rows": 4,
            # ten tiny steps don't make a better model: these gates check the loop, not quality
            "gates": {"min_task_delta": -100.0, "max_retention_increase": 10.0}}}).status_code == 201
        ds = c.post("/v1/datasets", json={"name": "b77-small", "deployment": "trainer"}).json()
        body = b"".join(json.dumps(r).encode() + b"\n" for r in sample)
        assert c.post(f"/v1/datasets/{ds['id']}/records", content=body,
                      headers={"content-type": "application/x-ndjson"}).status_code == 201
        return make_snapshot(c, ds["id"], {"curation": CURATION})["id"]


def test_bad_hyperparameters_are_rejected_before_a_job_exists(service, snapshot_id) -> None:
    with service.client() as c:
        before = len(c.get("/v1/fine_tuning/jobs", params={"deployment": "trainer", "limit": 100}).json()["data"])
        r = c.post("/v1/fine_tuning/jobs", json={"deployment": "trainer", "snapshot_id": snapshot_id,
                                                 "method": {"type": "sft", "hyperparameters": {"learning_rate": 5}}})
        assert r.status_code == 422
        assert r.json()["field"] == "method.hyperparameters.learning_rate"
        assert "1e-06" in r.json()["detail"] or "0.01" in r.json()["detail"]  # the allowed range is named
        r = c.post("/v1/fine_tuning/jobs", json={"deployment": "trainer", "snapshot_id": snapshot_id,
                                                 "method": {"type": "sft", "hyperparameters": {"lora_rank": 8}}})
        assert r.status_code == 422 and "lora_rank" in r.json()["detail"]
        r = c.post("/v1/fine_tuning/jobs", json={"deployment": "trainer", "snapshot_id": snapshot_id,
                                                 "method": {"type": "ppo"}})
        assert r.status_code == 422 and r.json()["field"] == "method.type"
        r = c.post("/v1/fine_tuning/jobs", json={"deployment": "trainer", "snapshot_id": snapshot_id, "method": {
            "type": "dpo", "hyperparameters": {"replay_fraction": 0.2}}})
        assert r.status_code == 422 and r.json()["field"] == "method.hyperparameters.replay_fraction"
        after = len(c.get("/v1/fine_tuning/jobs", params={"deployment": "trainer", "limit": 100}).json()["data"])
    assert after == before


def test_train_evaluate_promote_and_serve(service, snapshot_id) -> None:
    with service.client() as c:
        # from the dataset, not the snapshot: the worker curates first (the same rows and curation give
        # the same content-addressed snapshot as the fixture's)
        dataset_id = c.get(f"/v1/snapshots/{snapshot_id}").json()["dataset_id"]
        r = c.post("/v1/fine_tuning/jobs", json={"deployment": "trainer", "datasets": [dataset_id],
                                                 "curation": CURATION, "seed": 3,
                                                 "method": {"type": "sft", "hyperparameters": {**SMALL, "n_epochs": 2,
                                                                                           "max_steps": 10}}})
        assert r.status_code == 201, r.text
        assert r.json()["snapshot_id"] is None
        job = _wait(c, r.json()["id"])
        assert job["status"] == "succeeded", job
        assert job["trained_tokens"] > 0 and job["adapter_id"] and job["snapshot_id"] == snapshot_id
        events = _events(c, job["id"])
        types = [e["type"] for e in events]
        assert types.index("snapshot") < types.index("started")  # curation, then training
        assert sum(e["type"] == "curation" and "step" in e["data"] for e in events) == 8
        steps = [e["data"] for e in events if e["type"] == "step"]
        vals = [e["data"]["val_loss"] for e in events if e["type"] == "validation"]
        assert steps and {"loss", "learning_rate", "tokens_per_second", "eta_seconds"} <= set(steps[-1])
        assert len(vals) >= 2 and min(vals[1:]) < vals[0]  # validation loss falls

        adapter = c.get(f"/v1/adapters/{job['adapter_id']}").json()
        assert adapter["snapshot_id"] == snapshot_id and adapter["job_id"] == job["id"]
        assert adapter["version"] >= 1 and len(adapter["base_model_hash"]) == 64
        assert adapter["path"].endswith(f"/adapters/trainer/{adapter['id']}")
        assert any(a["id"] == adapter["id"] for a in c.get("/v1/adapters", params={"deployment": "trainer"}).json()["data"])

        # the evaluation is queued automatically and run by the worker
        deadline = time.monotonic() + 900
        while True:
            evs = c.get(f"/v1/adapters/{adapter['id']}/evaluations").json()["data"]
            if evs and evs[0]["status"] not in ("queued", "running"):
                break
            assert time.monotonic() < deadline
            time.sleep(2)
        ev = evs[0]
        assert ev["status"] == "passed", ev
        report = c.get(f"/v1/evaluations/{ev['id']}/report").json()
        assert report["evaluation"]["rows"] >= 1 and report["loss_curve"]["train"]
        html = c.get(f"/v1/evaluations/{ev['id']}/report", headers={"accept": "text/html"})
        assert html.headers["content-type"].startswith("text/html") and "<img" in html.text

        # another evaluation, cancelled: it ends `cancelled` and judges nothing
        again = c.post(f"/v1/adapters/{adapter['id']}/evaluations").json()["id"]
        r = c.post(f"/v1/evaluations/{again}/cancel")
        assert r.status_code == 200 and r.json()["status"] in ("queued", "running", "cancelled"), r.text
        deadline = time.monotonic() + 300
        while (status := c.get(f"/v1/evaluations/{again}").json()["status"]) != "cancelled":
            assert status in ("queued", "running") and time.monotonic() < deadline, status
            time.sleep(1)
        r = c.post(f"/v1/evaluations/{again}/cancel")
        assert r.status_code == 409 and r.headers["content-type"].startswith("application/problem+json")
        assert c.get(f"/v1/adapters/{adapter['id']}").json()["status"] == "candidate"

        prompt = {"model": "trainer", "temperature": 0, "max_tokens": 12,
                  "messages": [{"role": "user", "content": "My card still hasn't arrived, what do I do?"}]}
        base = c.post("/v1/chat/completions", json=prompt)
        assert base.headers["x-tuneloop-adapter"] == "base"
        promoted = c.post("/v1/deployments/trainer/promote", json={"adapter_id": adapter["id"]})
        assert promoted.status_code == 200, promoted.text
        tuned = c.post("/v1/chat/completions", json=prompt)
        assert tuned.status_code == 200
        assert tuned.headers["x-tuneloop-adapter"].startswith(f"trainer--{adapter['id']}")
        assert tuned.json()["choices"][0]["message"]["content"] != base.json()["choices"][0]["message"]["content"]
        assert c.get(f"/v1/adapters/{adapter['id']}").json()["status"] == "production"
        assert c.post("/v1/deployments/trainer/rollback").status_code == 200
        assert c.post("/v1/chat/completions", json=prompt).headers["x-tuneloop-adapter"] == "base"
        types = [h["type"] for h in c.get("/v1/deployments/trainer/history").json()["data"]]
        assert types[-2:] == ["promote", "rollback"]


def test_cancel_stops_a_running_job(service, snapshot_id) -> None:
    with service.client() as c:
        r = c.post("/v1/fine_tuning/jobs", json={"deployment": "trainer", "snapshot_id": snapshot_id,
                                                 "method": {"type": "sft", "hyperparameters": {**SMALL, "n_epochs": 20}}})
        job_id = r.json()["id"]
        deadline = time.monotonic() + 600
        while not any(e["type"] == "step" for e in _events(c, job_id)):
            assert time.monotonic() < deadline
            time.sleep(0.5)
        assert c.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] in ("running", "cancelled")
        job = _wait(c, job_id, timeout=300)
        assert job["status"] == "cancelled" and job["adapter_id"] is None
        events = _events(c, job_id)
        steps = [e["data"] for e in events if e["type"] == "step"]
        # The worker forwards the cancel within its 1 s poll, so how many steps ran after the request depends on
        # the CPU; "stops within the step in flight" is test_training_sft's SIGTERM test. Here: the trainer
        # stopped early and said where, and nothing trained after that.
        assert steps[-1]["step"] < steps[-1]["total_steps"]
        trainer_stop = [e["data"]["step"] for e in events if e["type"] == "cancelled" and "step" in e["data"]]
        assert trainer_stop == [steps[-1]["step"]]
        assert c.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").status_code == 409


def _worker(service) -> psutil.Process:
    procs = [p for p in psutil.Process(service.proc.pid).children()
             if "service.cli" in " ".join(p.cmdline()) and "worker" in p.cmdline()]
    assert len(procs) == 1
    return procs[0]


def test_worker_sigkill_resumes_from_checkpoint(service, snapshot_id) -> None:
    with service.client() as c:
        r = c.post("/v1/fine_tuning/jobs", json={"deployment": "trainer", "snapshot_id": snapshot_id,
                                                 "method": {"type": "sft", "hyperparameters": {**SMALL, "n_epochs": 3,
                                                                                           "max_steps": 12}}})
        job_id = r.json()["id"]
        deadline = time.monotonic() + 600
        while not any(e["type"] == "checkpoint" for e in _events(c, job_id)):
            assert time.monotonic() < deadline
            time.sleep(0.5)
        ckpt_step = max(e["data"]["step"] for e in _events(c, job_id) if e["type"] == "checkpoint")
        worker = _worker(service)
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        job = _wait(c, job_id, timeout=900)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2
        events = _events(c, job_id)
        starts = [e for e in events if e["type"] == "started"]
        assert len(starts) == 2 and "resuming from checkpoint" in starts[1]["message"]
        after_restart = [e["data"]["step"] for e in events if e["type"] == "step" and e["id"] > starts[1]["id"]]
        assert after_restart and min(after_restart) > ckpt_step - 1  # not from step 0
        assert len([a for a in c.get("/v1/adapters", params={"deployment": "trainer"}).json()["data"]
                    if a["job_id"] == job_id]) == 1  # succeeded once


def test_auto_deploy_starts_an_experiment_after_a_passed_evaluation(service, snapshot_id) -> None:
    policy = {"mode": "fixed", "alpha": 0.05, "min_samples_per_variant": 10_000, "auto_promote": True,
              "auto_rollback": True}
    with service.client() as c:
        jobs_before = len(c.get("/v1/fine_tuning/jobs", params={"deployment": "trainer", "limit": 100}).json()["data"])
        bad = c.post("/v1/fine_tuning/jobs", json={
            "deployment": "trainer", "snapshot_id": snapshot_id, "method": {"type": "sft"},
            "auto_deploy": {"experiment": {"policy": {**policy, "alpha": 0.9}}}})
        assert bad.status_code == 422 and bad.json()["field"] == "auto_deploy.experiment.policy.alpha", bad.text
        assert len(c.get("/v1/fine_tuning/jobs", params={"deployment": "trainer", "limit": 100}).json()["data"]) \
            == jobs_before  # refused before training, not when the experiment would start

        r = c.post("/v1/fine_tuning/jobs", json={
            "deployment": "trainer", "snapshot_id": snapshot_id, "seed": 5,
            "method": {"type": "sft", "hyperparameters": {**SMALL, "max_steps": 4}},
            "auto_deploy": {"experiment": {"policy": policy, "seed": "auto-deploy-test"}}})
        assert r.status_code == 201, r.text
        job = _wait(c, r.json()["id"])
        assert job["status"] == "succeeded", job
        assert job["auto_deploy"]["experiment"]["policy"]["min_samples_per_variant"] == 10_000
        adapter_id = job["adapter_id"]

        deadline = time.monotonic() + 900
        while True:  # the evaluation passes (permissive gates), then the monitor loop activates the experiment
            evs = c.get(f"/v1/adapters/{adapter_id}/evaluations").json()["data"]
            exps = [e for e in c.get("/v1/experiments", params={"deployment": "trainer"}).json()["data"]
                    if any(v["adapter_id"] == adapter_id for v in e["variants"])]
            if exps and exps[0]["status"] == "running":
                break
            assert not evs or evs[0]["status"] in ("queued", "running", "passed"), evs[0]
            assert time.monotonic() < deadline, (evs, exps)
            time.sleep(2)
        assert evs[0]["status"] == "passed"
        exp = exps[0]
        assert exp["policy"]["min_samples_per_variant"] == 10_000  # the job's policy, not the defaults
        by_name = {v["name"]: v for v in exp["variants"]}
        assert by_name["production"]["is_control"] and by_name["production"]["adapter_id"] is None  # base serves
        candidate = next(v for v in exp["variants"] if not v["is_control"])
        assert candidate["adapter_id"] == adapter_id

        # live traffic is now split by user between production (base) and the candidate's versioned name
        served = set()
        for u in range(12):
            resp = c.post("/v1/chat/completions", json={
                "model": "trainer", "user": f"auto-{u}", "max_tokens": 2, "temperature": 0,
                "messages": [{"role": "user", "content": "I lost my card"}]})
            assert resp.status_code == 200, resp.text
            served.add(resp.headers["x-tuneloop-adapter"].split("--g")[0])  # versioned: <dep>--<id>--g<process tag>-<n>
        assert served == {"base", f"trainer--{adapter_id}"}  # the seed makes the split deterministic
        assert c.post(f"/v1/experiments/{exp['id']}/stop").status_code == 200
        assert c.get(f"/v1/experiments/{exp['id']}").json()["status"] != "running"


def test_a_job_continues_from_a_parent_adapter(service, snapshot_id, base_model_dir, tmp_path) -> None:
    """Continued training through the API: the parent's LoRA shape is inherited (a conflicting one is a 422
    before any job exists), the child starts from the parent's weights and records it in its lineage; a parent
    of another deployment is refused, one made for another base model fails the job with that reason."""
    db = service.data_dir / "tuneloop.db"
    with service.client() as c:
        elsewhere = register_random_lora(db, base_model_dir, tmp_path / "elsewhere", "elsewhere", 1)
        r = c.post("/v1/fine_tuning/jobs", json={"deployment": "trainer", "snapshot_id": snapshot_id,
                                                 "parent_adapter_id": elsewhere})
        assert r.status_code == 422 and r.json()["field"] == "parent_adapter_id" and "elsewhere" in r.json()["detail"]
        foreign = register_random_lora(db, base_model_dir, tmp_path / "foreign", "trainer", 2)  # base hash "000…"
        r = c.post("/v1/fine_tuning/jobs", json={"deployment": "trainer", "snapshot_id": snapshot_id,
                                                 "parent_adapter_id": foreign,
                                                 "method": {"type": "sft", "hyperparameters": {"max_steps": 1}}})
        assert r.status_code == 201, r.text
        failed = _wait(c, r.json()["id"])
        assert failed["status"] == "failed" and failed["error"]["code"] == "parent_adapter"
        assert "another base model" in failed["error"]["message"]

        r = c.post("/v1/fine_tuning/jobs", json={"deployment": "trainer", "snapshot_id": snapshot_id,
                                                 "method": {"type": "sft", "hyperparameters": {**SMALL, "max_steps": 6}}})
        parent = _wait(c, r.json()["id"])
        assert parent["status"] == "succeeded", parent
        parent_id = parent["adapter_id"]

        continued = {"deployment": "trainer", "snapshot_id": snapshot_id, "parent_adapter_id": parent_id}
        r = c.post("/v1/fine_tuning/jobs", json={**continued, "method": {"type": "sft", "hyperparameters": {
            "lora_r": 16, "max_steps": 2}}})
        assert r.status_code == 422 and r.json()["field"] == "method.hyperparameters.lora_r"
        assert "parent adapter" in r.json()["detail"] and "8" in r.json()["detail"]
        r = c.post("/v1/fine_tuning/jobs", json={**continued, "parent_adapter_id": "adp-missing"})
        assert r.status_code == 404 and r.json()["field"] == "parent_adapter_id"
        r = c.post("/v1/fine_tuning/jobs", json={**continued, "search": {"n_trials": 2, "space": {"lora_r": [4, 8]}}})
        assert r.status_code == 422 and r.json()["field"] == "search.space" and "lora_r" in r.json()["detail"]

        r = c.post("/v1/fine_tuning/jobs", json={**continued, "method": {"type": "sft", "hyperparameters": {
            "max_steps": 2, "learning_rate": 1e-6, "max_seq_len": 64}}})
        assert r.status_code == 201, r.text
        assert r.json()["parent_adapter_id"] == parent_id
        assert r.json()["hyperparameters"]["lora_r"] == 8  # inherited, not the default 16
        child = _wait(c, r.json()["id"])
        assert child["status"] == "succeeded", child
        adapter = c.get(f"/v1/adapters/{child['adapter_id']}").json()
        assert adapter["parent_adapter_id"] == parent_id
        assert adapter["hyperparameters"]["target_modules"] == ["q_proj", "v_proj"]
        # steps at lr <= 1e-6 from the parent end where the parent's kept (best) adapter was: the child's first
        # validation loss is the parent's best (a fresh LoRA would start from the base model's higher loss)
        parent_val = [e["data"]["val_loss"] for e in _events(c, parent["id"]) if e["type"] == "validation"]
        child_val = [e["data"]["val_loss"] for e in _events(c, child["id"]) if e["type"] == "validation"]
        assert child_val[0] == pytest.approx(min(parent_val), rel=1e-3)
        assert min(parent_val) < parent_val[0]  # the parent did move away from where it started


def test_replayed_answers_are_generated_once_per_base_model(service, snapshot_id) -> None:
    """The worker keeps the base model's replayed answers under the data directory, so the next job on the same
    base model (the next round of feedback, another trial) reads them back instead of generating them again."""
    hp = {**SMALL, "max_steps": 1, "max_seq_len": 128, "replay_fraction": 0.05}
    summaries = []
    with service.client() as c:
        for _ in range(2):
            r = c.post("/v1/fine_tuning/jobs", json={"deployment": "trainer", "snapshot_id": snapshot_id,
                                                     "method": {"type": "sft", "hyperparameters": hp}})
            assert r.status_code == 201, r.text
            job = _wait(c, r.json()["id"])
            assert job["status"] == "succeeded", job
            replay = [e["data"] for e in _events(c, job["id"]) if e["type"] == "replay"]
            summaries.append((replay[-1], [e for e in replay if "rows" not in e]))
    (first, first_progress), (second, second_progress) = summaries
    assert first["total"] >= 2 and first_progress[-1]["generated"] == first["total"]
    assert second["cached"] == second["total"] == first["total"] and second_progress == []
    assert second["rows"] == first["rows"] > 0
    assert len(list((service.data_dir / "replay_cache").glob("*.jsonl"))) == 1
