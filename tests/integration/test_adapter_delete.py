"""Deleting adapters against a real service and vLLM: what is in use stays, a deleted adapter is unloaded before
its files go, nothing takes it up again, and a delete racing a promote never leaves a deleted adapter serving."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import Service, start_service, stop_service
from tests.conftest_vllm import record_passed_evaluation, register_random_lora


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory, base_model_dir: str, vllm_supervisor) -> Service:
    """No grace period and a monitor pass every half second: files go as soon as nothing holds them."""
    s = start_service(tmp_path_factory.mktemp("deleting"), base_model_dir, [vllm_supervisor.base_url],
                      env={"TUNELOOP_ADAPTER_DELETE_GRACE_SECONDS": "0", "TUNELOOP_EXPERIMENT_INTERVAL_SECONDS": "0.5"})
    yield s
    stop_service(s)


def _register(svc: Service, base_model_dir: str, dep: str, seed: int) -> tuple[str, Path]:
    """A random LoRA where training would have put it (under the data directory); its id and directory."""
    path = svc.data_dir / "adapters" / dep / f"lora-{seed}"
    return register_random_lora(svc.data_dir / "tuneloop.db", base_model_dir, path, dep, seed), path


def _vllm_models(vllm_supervisor) -> set[str]:
    return {m["id"] for m in httpx.get(f"{vllm_supervisor.base_url}/v1/models").json()["data"]}


def _chat(c: httpx.Client, dep: str) -> str:
    r = c.post("/v1/chat/completions", json={"model": dep, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200, r.text
    return r.headers["x-tuneloop-adapter"]


def test_in_use_adapters_stay_and_a_deleted_one_is_unloaded_before_its_files_go(svc, base_model_dir,
                                                                               vllm_supervisor) -> None:
    dep = "deleting"
    with svc.client() as c:
        assert c.post("/v1/deployments", json={"name": dep}).status_code == 201
        (first, _), (second, _), (staged, staged_dir), (idle, idle_dir) = (
            _register(svc, base_model_dir, dep, seed) for seed in (1, 2, 3, 4))
        for adapter in (first, second):
            assert c.post(f"/v1/deployments/{dep}/promote", json={"adapter_id": adapter}).status_code == 200
        record_passed_evaluation(svc.data_dir / "tuneloop.db", staged, dep)
        deadline = time.monotonic() + 60
        while (name := c.get(f"/v1/deployments/{dep}").json()["staged"]) is None:
            assert time.monotonic() < deadline, "the passed adapter was never staged"
            time.sleep(0.2)
        assert staged in name and name in _vllm_models(vllm_supervisor)

        for adapter, why in ((second, "serves production"), (first, "rollback target")):
            r = c.delete(f"/v1/adapters/{adapter}")
            assert r.status_code == 409 and why in r.json()["detail"], r.text
            assert r.json()["field"] == "adapter_id"
            assert c.get(f"/v1/adapters/{adapter}").json()["status"] in ("production", "retired")

        r = c.delete(f"/v1/adapters/{staged}")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "deleted" and r.json()["deleted_reason"] == "deleted via API"
        assert r.json()["deleted_at"] >= int(time.time()) - 60
        # unloaded first, then its files removed: never files gone while vLLM still has it
        deadline = time.monotonic() + 60
        while staged_dir.exists():
            loaded = any(staged in m for m in _vllm_models(vllm_supervisor))
            assert time.monotonic() < deadline, f"files still there (loaded in vLLM: {loaded})"
            time.sleep(0.1)
        assert not any(staged in m for m in _vllm_models(vllm_supervisor))
        assert c.get(f"/v1/deployments/{dep}").json()["staged"] is None
        assert second in _chat(c, dep)  # production serves on, the engine unharmed

        # nothing takes a deleted adapter up again, each refusal naming the field
        refusals = [
            (c.post(f"/v1/deployments/{dep}/promote", json={"adapter_id": staged, "force": True}), 409, "adapter_id"),
            (c.post(f"/v1/adapters/{staged}/evaluations"), 409, "adapter_id"),
            (c.post("/v1/experiments", json={"deployment": dep, "variants": [
                {"name": "control", "adapter_id": "production"}, {"name": "t", "adapter_id": staged}]}),
             409, "variants[1].adapter_id"),
            (c.post("/v1/fine_tuning/jobs", json={"deployment": dep, "include_feedback": True,
                                                  "parent_adapter_id": staged}), 409, "parent_adapter_id"),
            (c.get(f"/v1/adapters/{staged}/archive"), 410, None),
        ]
        for r, status, field in refusals:
            assert r.status_code == status and "deleted" in r.json()["detail"], (r.request.url, r.text)
            assert r.json().get("field") == field, r.text
        assert c.delete(f"/v1/adapters/{staged}").json()["status"] == "deleted"  # idempotent

        # one never loaded goes at once; the record stays, listed with its status
        assert c.delete(f"/v1/adapters/{idle}").status_code == 200
        deadline = time.monotonic() + 30
        while idle_dir.exists():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        listed = {a["id"]: a["status"] for a in c.get("/v1/adapters", params={"deployment": dep}).json()["data"]}
        assert listed == {first: "retired", second: "production", staged: "deleted", idle: "deleted"}
        assert c.delete("/v1/adapters/adp-nosuch").status_code == 404
        deleted = {ln.split('kind="')[1].split('"')[0]: float(ln.rsplit(" ", 1)[1])
                   for ln in c.get("/metrics").text.splitlines()
                   if ln.startswith("tuneloop_adapters_deleted_total") and f'deployment="{dep}"' in ln}
        assert deleted == {"api": 2.0, "keep_adapters": 0.0}, deleted


def test_a_delete_racing_a_promote_never_leaves_a_deleted_adapter_serving(svc, base_model_dir) -> None:
    """The promote loads and probes (hundreds of ms) before it commits; a delete sent meanwhile wins, and the
    promote's commit then refuses. Whatever the timing, exactly one of the two succeeds."""
    dep = "racing"
    with svc.client() as c:
        assert c.post("/v1/deployments", json={"name": dep}).status_code == 201
        outcomes = []
        for seed, delay in ((11, 0.0), (12, 0.05), (13, 0.15), (14, 0.3)):
            adapter, _ = _register(svc, base_model_dir, dep, seed)
            promoted: list[httpx.Response] = []
            t = threading.Thread(target=lambda a=adapter, out=promoted: out.append(
                c.post(f"/v1/deployments/{dep}/promote", json={"adapter_id": a})))
            t.start()
            time.sleep(delay)
            deleted = c.delete(f"/v1/adapters/{adapter}")
            t.join(120)
            pair = (promoted[0].status_code, deleted.status_code)
            assert pair in ((200, 409), (409, 200)), (pair, promoted[0].text, deleted.text)
            status = c.get(f"/v1/adapters/{adapter}").json()["status"]
            production = c.get(f"/v1/deployments/{dep}").json()["production_adapter_id"]
            assert (status == "deleted") == (production != adapter), (status, production)
            served = _chat(c, dep)
            assert (adapter in served) == (production == adapter), served
            outcomes.append(pair)
        assert (409, 200) in outcomes, outcomes  # the race itself happened at least once
