"""pytest plugin: ONE real vLLM server for the whole test session, plus a tiny random LoRA adapter.

Load it from tests/conftest.py with `pytest_plugins = ["tests.conftest_vllm"]`. Starting vLLM costs
about a minute on this machine, so every test that needs a server shares `vllm_supervisor`; a test
that breaks the server on purpose must start its own (see tests/integration/test_vllm_supervisor.py).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from service.vllm import VLLMOptions, VLLMPool, VLLMSupervisor

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = Path(os.environ.get("TUNELOOP_TEST_MODEL_DIR", REPO / "var" / "models" / "SmolLM2-135M-Instruct"))
START_TIMEOUT_S = 900.0  # generous: the 2 cores are shared with other test runs


def require_test_model() -> Path:
    """The small real model every vLLM test serves; a clear failure (not a skip) when it is missing."""
    if not (MODEL_DIR / "config.json").exists():
        pytest.fail(f"test model missing: {MODEL_DIR} (create it with adapters.base_model)", pytrace=False)
    return MODEL_DIR


def vllm_test_options(log_path: Path, **overrides: object) -> VLLMOptions:
    """Small settings for tests: 1 GiB KV cache, 2 resident adapters of rank <= 16, 1024 tokens."""
    settings: dict[str, object] = {
        "model_path": str(require_test_model()),
        "served_model_name": "base",
        "kv_cache_space_gib": 1,
        "max_loras": 2,
        "max_cpu_loras": 4,
        "max_lora_rank": 16,
        "max_model_len": 1024,
        "log_path": str(log_path),
    }
    settings.update(overrides)
    return VLLMOptions(**settings)  # type: ignore[arg-type]


def make_random_lora(
    base_dir: Path, out_dir: Path, *, rank: int = 8, seed: int = 0, std: float = 0.2
) -> Path:
    """A PEFT LoRA dir on q_proj/v_proj whose lora_B is random, so its answers differ from the base's.

    (PEFT initialises lora_B to zero, which would make the adapter a no-op.)
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, std)
    peft_model.save_pretrained(str(out_dir))
    del peft_model, model
    return out_dir


def register_random_lora_at(database_url: str, base_dir: Path, out_dir: Path, deployment: str, seed: int,
                            rank: int = 8) -> str:
    """Put a random LoRA into a service's registry (any database URL, through the service's own models) as a
    training job would, so it can be promoted or tested in an experiment without training; its adapter id."""
    import asyncio
    import uuid

    from sqlalchemy import func, select

    from service.storage.db import make_engine, make_sessionmaker
    from service.storage.models import Adapter

    path = make_random_lora(base_dir, out_dir, rank=rank, seed=seed)
    aid = "adp-" + uuid.uuid4().hex[:16]

    async def insert() -> None:
        engine = make_engine(database_url)
        try:
            async with make_sessionmaker(engine)() as s, s.begin():
                version = (await s.execute(select(func.coalesce(func.max(Adapter.version), 0))
                                           .where(Adapter.deployment == deployment))).scalar_one() + 1
                s.add(Adapter(id=aid, deployment=deployment, version=version, path=str(path),
                              base_model=str(base_dir), base_model_hash="0" * 64))
        finally:
            await engine.dispose()

    asyncio.run(insert())
    return aid


def register_random_lora(db_path: Path, base_dir: Path, out_dir: Path, deployment: str, seed: int,
                         rank: int = 8) -> str:
    """`register_random_lora_at` on a service's SQLite file."""
    return register_random_lora_at(f"sqlite+aiosqlite:///{db_path}", base_dir, out_dir, deployment, seed, rank)


def record_passed_evaluation(db_path: Path, adapter_id: str, deployment: str) -> None:
    """Record that an adapter passed its evaluation gates, as the worker does after an evaluation job."""
    import sqlite3
    import time
    import uuid

    job = "evaljob-" + uuid.uuid4().hex[:16]
    with sqlite3.connect(db_path, timeout=30) as db:
        db.execute("INSERT INTO jobs (id, kind, deployment, status, spec, hyperparameters, metrics, attempts,"
                   " cancel_requested, created_at) VALUES (?, 'evaluation', ?, 'succeeded', '{}', '{}', '{}', 1, 0, ?)",
                   (job, deployment, time.time()))
        db.execute("INSERT INTO evaluations (id, adapter_id, job_id, reference, status, result, reasons, created_at)"
                   " VALUES (?, ?, ?, 'base', 'passed', '{}', '[]', ?)",
                   ("eval-" + uuid.uuid4().hex[:16], adapter_id, job, time.time()))


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def vllm_supervisor(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[VLLMSupervisor]:
    """The shared real vLLM (served name "base"); stopped, with its whole process group, at session end."""
    log_path = tmp_path_factory.mktemp("vllm") / "vllm.log"
    supervisor = VLLMSupervisor(vllm_test_options(log_path))
    await supervisor.start()
    try:
        await supervisor.wait_ready(START_TIMEOUT_S)
        yield supervisor
    finally:
        await supervisor.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def vllm_pool(vllm_supervisor: VLLMSupervisor) -> AsyncIterator[VLLMPool]:
    """A pool over the shared server, ready when handed out."""
    await vllm_supervisor.wait_ready(START_TIMEOUT_S)
    pool = VLLMPool.from_supervisor(vllm_supervisor)
    yield pool
    await pool.aclose()


@pytest.fixture(scope="session")
def tiny_lora_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rank-8 random LoRA adapter dir for the test model (built once per session)."""
    return make_random_lora(require_test_model(), tmp_path_factory.mktemp("lora") / "tiny-lora")
