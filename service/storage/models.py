"""SQLAlchemy 2 models: the durable nouns of tuneloop.

Times are unix seconds (float) so SQLite and PostgreSQL compare them the same way and the API can return
OpenAI-style integer timestamps. Free-form payloads (messages, hyperparameters, reports) are JSON columns.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# BIGINT primary keys on PostgreSQL, INTEGER (rowid alias, autoincrement) on SQLite.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def now() -> float:
    return time.time()


MAX_USER = 256  # the length of the `user` an application sends with a request


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, list[Any]: JSON}


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    scope: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Deployment(Base):
    __tablename__ = "deployments"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    base_model: Mapped[str] = mapped_column(String(500))
    production_adapter_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # gates, eval dataset, triggers
    created_at: Mapped[float] = mapped_column(Float, default=now)


class DeploymentEvent(Base):
    """History of what served a deployment: promote, rollback, forced promote."""

    __tablename__ = "deployment_events"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    deployment: Mapped[str] = mapped_column(String(64), index=True)
    type: Mapped[str] = mapped_column(String(32))
    adapter_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    previous_adapter_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    forced: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class Completion(Base):
    __tablename__ = "completions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    deployment: Mapped[str] = mapped_column(String(64))
    adapter: Mapped[str] = mapped_column(String(120))  # the served vLLM model name
    adapter_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    experiment_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    variant: Mapped[str | None] = mapped_column(String(64), nullable=True)
    user: Mapped[str | None] = mapped_column(String(MAX_USER), nullable=True)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    kind: Mapped[str] = mapped_column(String(8))  # chat | text
    prompt: Mapped[Any] = mapped_column(JSON)  # messages list (chat) or prompt string (text)
    prompt_hash: Mapped[str] = mapped_column(String(64))
    output: Mapped[str] = mapped_column(Text, default="")
    finish_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    latency_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    __table_args__ = (
        Index("ix_completions_deployment_created", "deployment", "created_at"),
        Index("ix_completions_prompt_hash", "deployment", "prompt_hash"),
        Index("ix_completions_experiment", "experiment_id"),
        Index("ix_completions_user", "user", "deployment"),  # erasure of one user's data
    )


class Feedback(Base):
    __tablename__ = "feedback"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    client_id: Mapped[str | None] = mapped_column(String(200), nullable=True, unique=True)
    completion_id: Mapped[str] = mapped_column(String(64), ForeignKey("completions.id"), index=True)
    deployment: Mapped[str] = mapped_column(String(64))
    rating: Mapped[float | None] = mapped_column(Float, nullable=True)
    correction: Mapped[str | None] = mapped_column(Text, nullable=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    __table_args__ = (Index("ix_feedback_deployment_id", "deployment", "id"),)


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    deployment: Mapped[str] = mapped_column(String(64), ForeignKey("deployments.name"), index=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    deleted_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # its records are gone


class DatasetUpload(Base):
    """One NDJSON upload; its records become visible only when `committed` is true."""

    __tablename__ = "dataset_uploads"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    dataset_id: Mapped[str] = mapped_column(String(40), ForeignKey("datasets.id"), index=True)
    committed: Mapped[bool] = mapped_column(Boolean, default=False)
    accepted: Mapped[int] = mapped_column(Integer, default=0)
    duplicates: Mapped[int] = mapped_column(Integer, default=0)
    rejected: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class DatasetRecord(Base):
    __tablename__ = "dataset_records"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    dataset_id: Mapped[str] = mapped_column(String(40), ForeignKey("datasets.id"))
    upload_id: Mapped[str] = mapped_column(String(40), ForeignKey("dataset_uploads.id"), index=True)
    content_hash: Mapped[str] = mapped_column(String(64))
    row: Mapped[dict[str, Any]] = mapped_column(JSON)
    __table_args__ = (Index("ix_records_dataset_hash", "dataset_id", "content_hash"),)


class Snapshot(Base):
    __tablename__ = "snapshots"
    id: Mapped[str] = mapped_column(String(80), primary_key=True)  # content address
    dataset_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    deployment: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(1000))
    counts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    curation: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    report: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    feedback_range: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    # set when deleted (its files go; the record stays, jobs and adapters name it); a new curation with the
    # same content clears it again
    deleted_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    deleted_reason: Mapped[str | None] = mapped_column(String(200), nullable=True)


class Job(Base):
    """A queued unit of slow work run by a worker: a fine-tuning job, an evaluation, a snapshot's curation or
    a drift computation."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))  # fine_tune | evaluation | snapshot | drift | erasure
    deployment: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    spec: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    snapshot_id: Mapped[str | None] = mapped_column(String(80), nullable=True)
    adapter_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String(80), nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    __table_args__ = (Index("ix_jobs_status_created", "status", "created_at"),)


class JobEvent(Base):
    __tablename__ = "job_events"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id"), index=True)
    type: Mapped[str] = mapped_column(String(32))
    level: Mapped[str] = mapped_column(String(8), default="info")
    message: Mapped[str] = mapped_column(Text, default="")
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class Adapter(Base):
    __tablename__ = "adapters"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    deployment: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(String(1000))
    status: Mapped[str] = mapped_column(String(16), default="candidate")
    method: Mapped[str] = mapped_column(String(8), default="sft")
    base_model: Mapped[str] = mapped_column(String(500))
    base_model_hash: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    snapshot_id: Mapped[str | None] = mapped_column(String(80), nullable=True)
    feedback_range: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    evaluation_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    parent_adapter_id: Mapped[str | None] = mapped_column(String(40), nullable=True)  # continued from (lineage)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    # status "deleted": the record stays (lineage, events, evaluations name it), its files go after a grace period
    deleted_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    deleted_reason: Mapped[str | None] = mapped_column(String(200), nullable=True)
    __table_args__ = (UniqueConstraint("deployment", "version", name="uq_adapter_version"),)


class Evaluation(Base):
    __tablename__ = "evaluations"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    adapter_id: Mapped[str] = mapped_column(String(40), ForeignKey("adapters.id"), index=True)
    job_id: Mapped[str] = mapped_column(String(40), ForeignKey("jobs.id"))
    reference: Mapped[str] = mapped_column(String(40))  # adapter id of production at request time, or "base"
    status: Mapped[str] = mapped_column(String(16), default="queued")  # queued|running|passed|failed|error
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    reasons: Mapped[list[Any]] = mapped_column(JSON, default=list)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Experiment(Base):
    __tablename__ = "experiments"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    deployment: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), default="running")
    seed: Mapped[str] = mapped_column(String(64))
    variants: Mapped[list[Any]] = mapped_column(JSON)
    goal: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    guardrails: Mapped[list[Any]] = mapped_column(JSON, default=list)
    policy: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    decision: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # its statistics, frozen when its completions become old enough to prune (service.core.retention)
    summary: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True), nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class ExperimentEvent(Base):
    __tablename__ = "experiment_events"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    experiment_id: Mapped[str] = mapped_column(String(40), ForeignKey("experiments.id"), index=True)
    type: Mapped[str] = mapped_column(String(32))
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[float] = mapped_column(Float, default=now)


class MonitorRun(Base):
    """One periodic drift / fairness / trigger computation for a deployment."""

    __tablename__ = "monitor_runs"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    deployment: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # drift | fairness | trigger
    data: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    html_path: Mapped[str | None] = mapped_column(String(1000), nullable=True)
    # A trigger run names the trigger run it follows (0: the first). Unique, so when two API processes
    # decide to retrain at the same moment, one insert wins and only that one creates the job.
    follows: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[float] = mapped_column(Float, default=now)
    __table_args__ = (Index("ix_monitor_runs_dep_kind", "deployment", "kind", "created_at"),
                      Index("uq_monitor_runs_follows", "deployment", "kind", "follows", unique=True))


class ArtifactChunk(Base):
    """A piece of one file of an artifact: the files a record points at (an adapter's PEFT directory, a snapshot's
    splits, an HTML report), kept in the database for processes on other machines (`service.storage.artifacts`)."""

    __tablename__ = "artifact_chunks"
    artifact_id: Mapped[str] = mapped_column(String(80), primary_key=True)  # the record's id
    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # path inside the directory; "" = a lone file
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    data: Mapped[bytes] = mapped_column(LargeBinary)
