"""Deployments: the names applications put in `model`, and what serves them."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from adapters.evaluation.choices import validate_choices
from adapters.evaluation.gates import GateConfig
from monitoring import metrics
from service.core import dataset_deletion
from service.core.jobs import checked_job_body
from service.errors import Conflict, NotFound, Unprocessable, convert_or_422, fields_under
from service.storage.models import Deployment

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")


class Triggers(msgspec.Struct, kw_only=True):
    corrections: Annotated[int, msgspec.Meta(ge=1)] | None = None
    drift_share: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None
    schedule_seconds: Annotated[float, msgspec.Meta(gt=0)] | None = None
    job: Annotated[dict[str, Any], msgspec.Meta(description="a job body, as for POST /v1/fine_tuning/jobs")] | None = None


class DeploymentConfig(msgspec.Struct, kw_only=True):
    """Keys the service acts on; a PATCH sets a key to null to remove it."""

    gates: GateConfig | None = None
    eval_dataset_id: str | None = None
    eval_max_rows: Annotated[int, msgspec.Meta(ge=1)] | None = None
    eval_dataset_max_rows: Annotated[int, msgspec.Meta(ge=1)] | None = None
    retention_rows: Annotated[int, msgspec.Meta(ge=1)] | None = None
    retention_path: str | None = None
    eval_backend: Literal["hf_merged", "vllm"] | None = None
    answer_choices: Annotated[list[str], msgspec.Meta(min_length=2, max_length=2000)] | None = None
    triggers: Triggers | None = None
    keep_adapters: Annotated[int, msgspec.Meta(ge=1, description=(
        "keep the newest N adapters (by version); older ones are deleted unless in use"))] | None = None
    keep_snapshots: Annotated[int, msgspec.Meta(ge=1, description=(
        "keep the newest N snapshots; older ones are deleted unless a job or an adapter uses them"))] | None = None


def deployment_json(d: Deployment) -> dict[str, Any]:
    return {"object": "deployment", "name": d.name, "id": d.name, "base_model": d.base_model,
            "production_adapter_id": d.production_adapter_id, "config": d.config or {},
            "created_at": int(d.created_at)}


def checked_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config without null keys, its known keys checked against `DeploymentConfig` (types and ranges:
    a bad value is a 422 naming it, never a trigger or evaluation that fails later), the answer choices
    normalised."""
    config = {k: v for k, v in config.items() if v is not None}
    convert_or_422(config, DeploymentConfig, "config")
    try:
        GateConfig.from_dict(config.get("gates"))  # what the type cannot say: unknown gate keys
    except ValueError as exc:
        raise Unprocessable(str(exc), field="config.gates") from exc
    job = (config.get("triggers") or {}).get("job")
    if job is not None:  # what a trigger will post: checked now, as far as it can be without the database
        if "deployment" in job:
            raise Unprocessable("a trigger's job is for its own deployment: leave deployment out",
                                field="config.triggers.job.deployment")
        with fields_under("config.triggers.job"):
            checked_job_body(job)
    if "answer_choices" in config:
        try:
            config = {**config, "answer_choices": list(validate_choices(config["answer_choices"]))}
        except ValueError as exc:
            raise Unprocessable(str(exc), field="config.answer_choices") from exc
    return config


async def _hold_datasets(s: AsyncSession, config: dict[str, Any]) -> None:
    """The datasets `config` names, held in `s`'s transaction (a deleted one is a 409 naming its key)."""
    if isinstance(config.get("eval_dataset_id"), str):
        await dataset_deletion.hold(s, config["eval_dataset_id"], "config.eval_dataset_id")
    for ds in ((config.get("triggers") or {}).get("job") or {}).get("datasets") or []:
        if isinstance(ds, str):
            await dataset_deletion.hold(s, ds, "config.triggers.job.datasets")


class DeploymentService:
    def __init__(self, sessions: async_sessionmaker[AsyncSession], base_model: str, names: set[str],
                 answer_choices: dict[str, tuple[str, ...]]) -> None:
        self.sessions = sessions
        self.base_model = base_model
        # Shared with the gateway: the routable deployment names, and the answers each is constrained to.
        self.names = names
        self.answer_choices = answer_choices

    def remember(self, dep: Deployment) -> None:
        self.names.add(dep.name)
        for phase in ("load", "probe", "commit"):  # series at zero before the first swap, so rate() counts it
            metrics.SWAP_PHASE_SECONDS.labels(dep.name, phase)
        for kind in ("api", "keep_adapters"):
            metrics.ADAPTERS_DELETED.labels(dep.name, kind)
        for kind in ("api", "keep_snapshots"):
            metrics.SNAPSHOTS_DELETED.labels(dep.name, kind)
        metrics.COMPLETIONS_PRUNED.labels(dep.name)
        choices = (dep.config or {}).get("answer_choices")
        if choices:
            self.answer_choices[dep.name] = tuple(choices)
        else:
            self.answer_choices.pop(dep.name, None)

    async def create(self, name: Any, base_model: Any = None, config: Any = None) -> Deployment:
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise Unprocessable("name must match ^[a-z0-9][a-z0-9_-]{0,62}$", field="name")
        if base_model not in (None, "", self.base_model):
            # One vLLM server serves one base model; several bases need several tuneloop services.
            raise Unprocessable(f"this service serves the base model {self.base_model!r}; "
                                f"a deployment on {base_model!r} needs its own tuneloop instance",
                                field="base_model")
        if config is not None and not isinstance(config, dict):
            raise Unprocessable("config must be an object", field="config")
        config = checked_config(config or {})
        async with self.sessions() as s, s.begin():
            if await s.get(Deployment, name) is not None:
                raise Conflict(f"deployment {name!r} already exists", field="name")
            await _hold_datasets(s, config)
            dep = Deployment(name=name, base_model=self.base_model, config=config)
            s.add(dep)
        self.remember(dep)
        return dep

    async def ensure_default(self) -> None:
        async with self.sessions() as s:
            exists = await s.get(Deployment, "default")
        if exists is None:
            try:
                await self.create("default")
            except Conflict:
                pass

    async def list(self) -> list[Deployment]:
        async with self.sessions() as s:
            return list((await s.execute(select(Deployment).order_by(Deployment.created_at))).scalars())

    async def get(self, name: str) -> Deployment:
        async with self.sessions() as s:
            dep = await s.get(Deployment, name)
        if dep is None:
            raise NotFound(f"deployment {name!r} does not exist")
        return dep

    async def update_config(self, name: str, patch: dict[str, Any]) -> Deployment:
        """JSON merge patch (RFC 7396) at the top level: a key set to null is removed."""
        async with self.sessions() as s, s.begin():
            dep = await s.get(Deployment, name)
            if dep is None:
                raise NotFound(f"deployment {name!r} does not exist")
            dep.config = checked_config({**(dep.config or {}), **patch})
            await _hold_datasets(s, dep.config)
        self.remember(dep)
        return dep
