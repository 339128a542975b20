"""Every setting of the service, read once from `TUNELOOP_*` environment variables.

CLI flags override the environment (see `service.cli`); nothing else in the code base reads the environment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from service.vllm.supervisor import cpu_serving_dtype

DEFAULT_BASE_MODEL = "builtin:smollm2-135m-instruct"


def _env(name: str, default: str) -> str:
    return os.environ.get(f"TUNELOOP_{name}", default)


def _bool(value: str) -> bool:
    return value.strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Settings:
    """Service settings. Each field is documented in the README's settings table."""

    host: str = "127.0.0.1"
    port: int = 8000
    data_dir: Path = Path("var")
    database_url: str = ""  # empty = SQLite at <data_dir>/tuneloop.db
    base_model: str = DEFAULT_BASE_MODEL
    vllm_urls: tuple[str, ...] = ()  # empty = start and supervise a local vLLM
    admin_key: str | None = None
    metrics_public: bool = True  # /metrics without a key (the service binds to loopback by default)
    start_worker: bool = True
    start_monitor: bool = True
    access_log: bool = False  # uvicorn's line per request; Prometheus and the completion log already count them
    # vLLM (managed)
    vllm_max_loras: int = 4
    vllm_max_cpu_loras: int = 8
    vllm_max_lora_rank: int = 16
    vllm_max_model_len: int = 2048
    vllm_dtype: str = ""  # empty = by the CPU, see managed_vllm_dtype
    vllm_kv_cache_gib: int = 4
    vllm_cpu_threads: int = 0  # 0 = auto, see managed_vllm_cpu_threads
    vllm_start_timeout: float = 300.0
    # gateway / ingestion limits
    max_metadata_keys: int = 16
    max_metadata_value_chars: int = 128
    max_upload_bytes: int = 2 * 1024**3
    max_request_bytes: int = 8 * 1024**2
    # worker
    worker_poll_seconds: float = 1.0
    heartbeat_seconds: float = 5.0
    heartbeat_timeout_seconds: float = 30.0
    eval_backend: str = "hf_merged"
    # monitor
    monitor_interval_seconds: float = 60.0  # drift, fairness, retraining triggers
    experiment_interval_seconds: float = 5.0  # experiment decisions, job gauges
    follow_interval_seconds: float = 1.0  # adopt swaps, experiments and deployments made by other API processes
    artifact_store: str = "auto"  # database | files | auto (database on PostgreSQL), see artifacts_in_database
    adapter_delete_grace_seconds: float = 900.0  # a deleted adapter's files stay this long on each machine
    drift_window: int = 500  # completions per drift window (reference and current)
    drift_reports_kept: int = 20  # per deployment, the newest drift runs whose HTML report stays (each is MBs)
    completion_retention_days: float = 30.0  # logged completions older than this are pruned; 0 = kept forever
    monitor_history_days: float = 90.0  # fairness runs, drift runs and drift jobs older than this go; 0 = kept

    @property
    def database(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'tuneloop.db').resolve()}"

    @property
    def managed_vllm_cpu_threads(self) -> int | None:
        """Cores the managed vLLM-CPU computes on: the setting if given; all of them when no local worker
        trains beside it (a serving node: 1.4-1.8x faster); else None, vLLM's default of every core but one,
        because a worker training on all cores makes an all-core vLLM 2x slower (benchmarks/README.md)."""
        if self.vllm_cpu_threads:
            return self.vllm_cpu_threads
        return None if self.start_worker else len(os.sched_getaffinity(0))

    @property
    def managed_vllm_dtype(self) -> str:
        """The setting if given, else bfloat16 where the CPU has BF16 units and float32 elsewhere."""
        return self.vllm_dtype or cpu_serving_dtype()

    def __post_init__(self) -> None:
        if self.artifact_store not in ("auto", "database", "files"):
            raise ValueError(f"TUNELOOP_ARTIFACT_STORE must be auto, database or files, not {self.artifact_store!r}")
        if self.drift_reports_kept < 1:
            raise ValueError("TUNELOOP_DRIFT_REPORTS_KEPT must be at least 1 (the newest report is the one served)")
        if self.completion_retention_days != 0 and not self.completion_retention_days >= 1:
            raise ValueError("TUNELOOP_COMPLETION_RETENTION_DAYS must be 0 (keep every completion) or at least 1")
        if self.monitor_history_days != 0 and not self.monitor_history_days >= 1:
            raise ValueError("TUNELOOP_MONITOR_HISTORY_DAYS must be 0 (keep the whole history) or at least 1")

    @property
    def completion_retention_seconds(self) -> float | None:
        """How long a logged completion is kept (and open for feedback, less an hour); None = forever."""
        return self.completion_retention_days * 86400 or None

    @property
    def monitor_history_seconds(self) -> float | None:
        """How long fairness runs, drift runs and drift jobs are kept; None = forever."""
        return self.monitor_history_days * 86400 or None

    @property
    def artifacts_in_database(self) -> bool:
        """Whether adapters, snapshots and reports are also stored in the database, for processes on other
        machines (service.storage.artifacts). By default only on PostgreSQL: a SQLite file has one machine."""
        return self.artifact_store == "database" or (self.artifact_store == "auto" and not self.is_sqlite)

    @property
    def is_sqlite(self) -> bool:
        return self.database.startswith("sqlite")

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Defaults, then `TUNELOOP_<FIELD>` variables, then explicit (non-None) overrides."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = os.environ.get(f"TUNELOOP_{f.name.upper()}")
            if raw is None:
                continue
            values[f.name] = _coerce(f.name, raw)
        settings = cls(**values)
        clean = {k: v for k, v in overrides.items() if v is not None and v != ()}
        if "data_dir" in clean:
            clean["data_dir"] = Path(clean["data_dir"])
        return replace(settings, **clean)


def _coerce(name: str, raw: str) -> Any:
    default = getattr(Settings, name, None)
    if name == "vllm_urls":
        return tuple(u.strip() for u in raw.split(",") if u.strip())
    if name == "data_dir":
        return Path(raw)
    if name == "admin_key":
        return raw or None
    if isinstance(default, bool):
        return _bool(raw)
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw
