from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.settings import Settings


def test_environment_then_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELOOP_PORT", "9001")
    monkeypatch.setenv("TUNELOOP_VLLM_URLS", "http://a:1, http://b:2")
    monkeypatch.setenv("TUNELOOP_METRICS_PUBLIC", "false")
    monkeypatch.setenv("TUNELOOP_DATA_DIR", "/tmp/x")
    s = Settings.from_env()
    assert s.port == 9001 and s.vllm_urls == ("http://a:1", "http://b:2") and s.metrics_public is False
    assert s.database == f"sqlite+aiosqlite:///{Path('/tmp/x/tuneloop.db').resolve()}"
    s = Settings.from_env(port=7000, data_dir="/tmp/y", vllm_urls=None)
    assert s.port == 7000 and s.data_dir == Path("/tmp/y") and s.vllm_urls == ("http://a:1", "http://b:2")


def test_postgres_url_is_used_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELOOP_DATABASE_URL", "postgresql+asyncpg://u@h/db")
    s = Settings.from_env()
    assert s.database == "postgresql+asyncpg://u@h/db" and not s.is_sqlite


def test_managed_vllm_takes_every_core_only_where_no_worker_trains() -> None:
    cores = len(os.sched_getaffinity(0))
    assert Settings(start_worker=True).managed_vllm_cpu_threads is None  # vLLM's default: all cores but one
    assert Settings(start_worker=False).managed_vllm_cpu_threads == cores
    assert Settings(start_worker=True, vllm_cpu_threads=2).managed_vllm_cpu_threads == 2
    assert Settings(start_worker=False, vllm_cpu_threads=1).managed_vllm_cpu_threads == 1


def test_serving_dtype_is_bf16_only_where_the_units_exist_and_measure_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    from adapters.cpu import has_bf16_units, prefers_bf16
    from service.vllm.supervisor import cpu_serving_dtype

    amx = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n"
    avx512_bf16 = "flags\t\t: fpu avx2 avx512f avx512_bf16\n"
    avx2 = "flags\t\t: fpu sse4_2 avx2 fma\nbugs\t\t: avx512_bf16_is_not_a_flag_here\n"
    assert cpu_serving_dtype(amx, speedup=7.7) == cpu_serving_dtype(avx512_bf16, speedup=2.2) == "bfloat16"
    # the units listed but bf16 measured slower (a VM hiding AMX): fp32, as without the units
    assert cpu_serving_dtype(avx512_bf16, speedup=0.5) == cpu_serving_dtype(amx, speedup=1.1) == "float32"
    assert cpu_serving_dtype(avx2, speedup=9.0) == cpu_serving_dtype("", speedup=9.0) == "float32"
    assert has_bf16_units(amx) and has_bf16_units(avx512_bf16) and not has_bf16_units(avx2)
    assert Settings().managed_vllm_dtype == ("bfloat16" if prefers_bf16() else "float32")  # this machine decides
    monkeypatch.setenv("TUNELOOP_VLLM_DTYPE", "float32")
    assert Settings.from_env().managed_vllm_dtype == "float32"  # an explicit setting wins


def test_bf16_speedup_is_measured_in_a_child_process() -> None:
    """The real measurement (the API process must not import torch for it); any CPU gives a finite ratio."""
    import sys

    from adapters.cpu import matmul_bf16_speedup, measured_bf16_speedup

    had_torch = "torch" in sys.modules
    assert 0.01 < measured_bf16_speedup() < 100
    assert ("torch" in sys.modules) == had_torch
    assert 0.01 < matmul_bf16_speedup(rows=32, repeats=1) < 100


def test_a_failed_bf16_check_falls_back_to_fp32(monkeypatch: pytest.MonkeyPatch) -> None:
    from adapters import cpu

    avx512_bf16 = "flags\t\t: fpu avx2 avx512f avx512_bf16\n"
    monkeypatch.setattr(cpu.sys, "executable", "/nonexistent/python")
    cpu.measured_bf16_speedup.cache_clear()
    try:
        assert cpu.measured_bf16_speedup() == 0.0
        assert not cpu.prefers_bf16(avx512_bf16)
    finally:
        cpu.measured_bf16_speedup.cache_clear()


def test_artifacts_go_into_the_database_by_default_only_on_postgresql() -> None:
    assert not Settings().artifacts_in_database
    assert Settings(database_url="postgresql+asyncpg://h/db").artifacts_in_database
    assert not Settings(database_url="postgresql+asyncpg://h/db", artifact_store="files").artifacts_in_database
    assert Settings(artifact_store="database").artifacts_in_database
    with pytest.raises(ValueError, match="TUNELOOP_ARTIFACT_STORE"):
        Settings(artifact_store="s3")
    with pytest.raises(ValueError, match="TUNELOOP_DRIFT_REPORTS_KEPT"):
        Settings(drift_reports_kept=0)
    with pytest.raises(ValueError, match="TUNELOOP_COMPLETION_RETENTION_DAYS"):
        Settings(completion_retention_days=0.5)
    assert Settings(completion_retention_days=0).completion_retention_seconds is None
    assert Settings().completion_retention_seconds == 30 * 86400
    with pytest.raises(ValueError, match="TUNELOOP_MONITOR_HISTORY_DAYS"):
        Settings(monitor_history_days=-1)
    assert Settings(monitor_history_days=0).monitor_history_seconds is None
