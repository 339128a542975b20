"""`tuneloop serve` in its embedded default: it starts, supervises and stops its own vLLM.

This is the one test that starts a second vLLM on purpose: it tests the managed mode itself (SIGKILL of
vLLM → 503 with Retry-After → served again; SIGTERM of the service → no orphan processes).
"""

from __future__ import annotations

import re
import signal
import sqlite3
import time

import httpx
import psutil
import pytest

from service.storage import migrate
from service.vllm.supervisor import cpu_serving_dtype
from tests.conftest import start_service, stop_service
from tests.conftest_vllm import register_random_lora

pytestmark = pytest.mark.vllm
CHAT = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
LORA_CHAT = {"model": "managed", "messages": [{"role": "user", "content": "Where is my card?"}], "max_tokens": 8,
             "temperature": 0}


def _vllm_children(pid: int) -> list[psutil.Process]:
    """The vLLM API server processes (not the supervisor's reaper, whose command line names vLLM too)."""
    return [p for p in psutil.Process(pid).children(recursive=True)
            if "vllm.entrypoints.openai.api_server" in " ".join(p.cmdline())
            and "_reaper.py" not in " ".join(p.cmdline())]


def test_managed_vllm_restart_and_clean_shutdown(tmp_path, base_model_dir) -> None:
    svc = start_service(tmp_path / "svc", base_model_dir, None,
                        env={"TUNELOOP_VLLM_KV_CACHE_GIB": "1", "TUNELOOP_VLLM_MAX_MODEL_LEN": "1024"})
    try:
        with svc.client() as c:
            assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
            descendants = psutil.Process(svc.proc.pid).children(recursive=True)
            (vllm,) = _vllm_children(svc.proc.pid)
            cmd = vllm.cmdline()
            # bf16 where it measured faster: by the service's own measurement (one taken here could land on the
            # other side of the threshold); none in its log means no BF16 units or a failed check, so fp32
            measured = re.search(r"bf16 matmul measured ([0-9.]+)x", svc.log_text())
            assert cmd[cmd.index("--dtype") + 1] == cpu_serving_dtype(speedup=float(measured[1]) if measured else 0.0)
            # a LoRA adapter serves in that dtype (tuneloop's CPU LoRA ops) and answers unlike the base model
            assert c.post("/v1/deployments", json={"name": "managed"}).status_code == 201
            base_answer = c.post("/v1/chat/completions", json=LORA_CHAT).json()["choices"][0]["message"]["content"]
            aid = register_random_lora(svc.data_dir / "tuneloop.db", base_model_dir, tmp_path / "lora", "managed", 1)
            assert c.post("/v1/deployments/managed/promote", json={"adapter_id": aid}).status_code == 200
            r = c.post("/v1/chat/completions", json=LORA_CHAT)
            assert r.status_code == 200 and aid in r.headers["x-tuneloop-adapter"], r.text
            lora_answer = r.json()["choices"][0]["message"]["content"]
            assert lora_answer != base_answer
            vllm.send_signal(signal.SIGKILL)
            vllm.wait(10)
            r = c.post("/v1/chat/completions", json=CHAT)
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) > 0
            assert httpx.get(svc.url + "/ready").status_code == 503
            deadline = time.monotonic() + 600
            while httpx.get(svc.url + "/ready").status_code != 200:
                assert time.monotonic() < deadline, "vLLM did not come back"
                time.sleep(1)
            assert c.post("/v1/chat/completions", json=CHAT).status_code == 200
            r = c.post("/v1/chat/completions", json=LORA_CHAT)  # the restarted vLLM got the adapter back
            assert aid in r.headers["x-tuneloop-adapter"] and r.json()["choices"][0]["message"]["content"] == lora_answer
            (new_vllm,) = _vllm_children(svc.proc.pid)
            assert new_vllm.pid != vllm.pid
            descendants = psutil.Process(svc.proc.pid).children(recursive=True)
    finally:
        code = stop_service(svc, signal.SIGTERM)
    # uvicorn re-raises the SIGTERM after a graceful shutdown, so the exit status is the signal's
    assert code in (0, -signal.SIGTERM), code
    assert "Application shutdown complete" in svc.log_text()
    _, alive = psutil.wait_procs(descendants, timeout=30)
    assert not alive, f"orphans after SIGTERM: {[p.cmdline() for p in alive]}"


def test_a_restart_without_the_rank_setting_still_serves_a_higher_rank_production(tmp_path, base_model_dir) -> None:
    """A rank-32 production (promoted while the service ran with TUNELOOP_VLLM_MAX_LORA_RANK=32), then a start with
    the default 16: the managed vLLM starts with --max-lora-rank 32 and serves it, where it used to refuse the
    adapter's reload, retry forever and so take no traffic for any deployment."""
    db = tmp_path / "svc" / "tuneloop.db"
    db.parent.mkdir()
    migrate.upgrade(f"sqlite+aiosqlite:///{db}")
    aid = register_random_lora(db, base_model_dir, tmp_path / "lora32", "wide", 1, rank=32)
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO deployments (name, base_model, production_adapter_id, config, created_at) "
                     "VALUES ('wide', ?, ?, '{}', ?)", (str(base_model_dir), aid, time.time()))
    svc = start_service(db.parent, base_model_dir, None, timeout=400,
                        env={"TUNELOOP_VLLM_KV_CACHE_GIB": "1", "TUNELOOP_VLLM_MAX_MODEL_LEN": "1024",
                             "TUNELOOP_VLLM_MAX_LORA_RANK": "16"})
    try:
        (vllm,) = _vllm_children(svc.proc.pid)
        cmd = vllm.cmdline()
        assert cmd[cmd.index("--max-lora-rank") + 1] == "32"
        with svc.client() as c:
            r = c.post("/v1/chat/completions", json={**LORA_CHAT, "model": "wide"})
            assert r.status_code == 200 and aid in r.headers["x-tuneloop-adapter"], r.text
            # A job for a rank this vLLM could not load is refused when it is written (here, before the
            # missing data is); rank 32 passes that check and meets the next one.
            job = {"deployment": "wide", "datasets": [], "method": {"type": "sft", "hyperparameters": {}}}
            for hyper, search, field in (({"lora_r": 64, "lora_alpha": 128}, None, "method.hyperparameters.lora_r"),
                                         ({}, {"n_trials": 2, "space": {"lora_r": [16, 64]}}, "search.space.lora_r"),
                                         ({"lora_r": 32, "lora_alpha": 64}, None, "snapshot_id")):
                r = c.post("/v1/fine_tuning/jobs", json={**job, "method": {"type": "sft", "hyperparameters": hyper},
                                                         **({"search": search} if search else {})})
                assert r.status_code == 422 and r.json()["field"] == field, r.text
            assert "TUNELOOP_VLLM_MAX_LORA_RANK=64" in c.post("/v1/fine_tuning/jobs", json={
                **job, "method": {"type": "sft", "hyperparameters": {"lora_r": 64}}}).json()["detail"]
    finally:
        stop_service(svc, signal.SIGTERM)
