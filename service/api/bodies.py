"""The JSON request bodies, declared for the OpenAPI document (and so for generated clients and fuzzing).

Handlers parse bodies themselves (`common.json_body`) so that every error is one problem+json naming the
field at fault; these types only describe the wire shape. Nested configs reuse the dataclasses that validate
them (`Hyperparameters`, `CurationConfig`, `GateConfig`, `Policy`, ...), and `tests/unit/test_request_bodies.py`
checks that the top-level fields here are exactly the ones the services accept. `openapi.operation` puts
them into the document.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from adapters.curation.config import CurationConfig
from adapters.training.config import METHODS, Hyperparameters, SearchSpec
from monitoring.experiments import Guardrail, Policy
from service.auth import SCOPES
from service.core.deployments import NAME_RE, DeploymentConfig
from service.core.experiments import AutoDeploy, Goal
from service.storage.models import MAX_USER

Text = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Name = Annotated[str, msgspec.Meta(pattern=NAME_RE.pattern)]
DeploymentName = Annotated[str, msgspec.Meta(examples=["default"], description="a deployment name")]


class _Body(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A body whose unknown fields are a 422."""


# --- inference (OpenAI shaped; other OpenAI/vLLM sampling fields pass through to vLLM) ----------------------
class ChatMessage(msgspec.Struct, kw_only=True):
    role: Literal["system", "user", "assistant"]
    content: str


Attributes = Annotated[dict[Annotated[str, msgspec.Meta(max_length=64)], Annotated[str, msgspec.Meta(max_length=128)]],
                       msgspec.Meta(max_length=16)]


class _Inference(msgspec.Struct, kw_only=True):
    model: Annotated[str, msgspec.Meta(description="a deployment name")]
    user: Annotated[str, msgspec.Meta(max_length=MAX_USER, description=(
        "the end user: the unit experiments assign by, and whose data `POST /v1/erasure_jobs` erases"))] | None = None
    metadata: Annotated[Attributes, msgspec.Meta(description="group attributes stored with the completion")] | None = None
    stream: bool = False
    max_tokens: Annotated[int, msgspec.Meta(ge=1)] | None = None
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0, le=1)] | None = None


class ChatCompletionRequest(_Inference, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]


class CompletionRequest(_Inference, kw_only=True):
    prompt: Annotated[str, msgspec.Meta(min_length=1)]


# --- deployments, keys ---------------------------------------------------------------------------------------
class DeploymentCreate(_Body):
    name: Name
    base_model: str | None = None
    config: DeploymentConfig | None = None


class DeploymentPatch(_Body):
    config: DeploymentConfig


class Promote(_Body):
    adapter_id: str
    force: Annotated[bool, msgspec.Meta(description="promote an adapter that failed its gates (recorded)")] = False
    reason: Annotated[str, msgspec.Meta(max_length=500)] | None = None


class ApiKeyCreate(_Body):
    name: Text
    scope: Literal[SCOPES] = "app"  # type: ignore[valid-type]


# --- data ----------------------------------------------------------------------------------------------------
class FeedbackItem(_Body):
    """At least one of `rating` or `correction`."""

    completion_id: Annotated[str, msgspec.Meta(min_length=1, description="x-tuneloop-completion-id")]
    rating: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    correction: Annotated[str, msgspec.Meta(min_length=1, max_length=100_000)] | None = None
    comment: Annotated[str, msgspec.Meta(max_length=100_000)] | None = None
    attributes: Attributes | None = None
    id: Annotated[Text, msgspec.Meta(description="a client id: a retry with the same id stores nothing new")] | None = None


FeedbackBody = FeedbackItem | Annotated[list[FeedbackItem], msgspec.Meta(min_length=1, max_length=1000)]


class DatasetCreate(_Body):
    name: Text
    deployment: DeploymentName


class TrainingRow(msgspec.Struct, kw_only=True):
    """One line of an upload. The chat shape is shown; prompt/completion, preference (prompt/chosen/rejected)
    and unpaired (prompt/completion/label) rows are accepted too (`adapters/curation/rows.py`)."""

    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    attributes: Attributes | None = None


Upload = Annotated[list[TrainingRow], msgspec.Meta(description="NDJSON: one row object per line")]


class SnapshotCreate(_Body):
    include_feedback: bool = False
    curation: CurationConfig | None = None


class ErasureCreate(_Body):
    deployment: DeploymentName
    user: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_USER,
                                      description="the `user` the application sent with its requests")]


# --- training ------------------------------------------------------------------------------------------------
class Method(_Body):
    type: Literal[METHODS] = "sft"  # type: ignore[valid-type]
    hyperparameters: Hyperparameters | Literal["auto"] = "auto"


class JobCreate(_Body):
    deployment: DeploymentName
    snapshot_id: str | None = None
    datasets: list[str] | None = None
    include_feedback: bool = False
    method: Method | None = None
    search: SearchSpec | None = None
    suffix: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9_-]{1,40}$")] | None = None
    seed: Annotated[int, msgspec.Meta(ge=0, lt=2**31)] | None = None
    auto_deploy: AutoDeploy | None = None
    curation: CurationConfig | None = None
    parent_adapter_id: Annotated[str, msgspec.Meta(
        description="continue from this adapter's weights (its LoRA shape is kept)")] | None = None


# --- experiments ---------------------------------------------------------------------------------------------
class VariantSpec(_Body):
    name: Annotated[str, msgspec.Meta(min_length=1)]
    adapter_id: Annotated[str | None, msgspec.Meta(description='an adapter id, "production", or null for the base')]
    weight: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    force: bool = False


class ExperimentCreate(_Body):
    deployment: DeploymentName
    variants: Annotated[list[VariantSpec], msgspec.Meta(min_length=2)]
    goal: Goal | None = None
    guardrails: list[Guardrail] | None = None
    policy: Policy | None = None
    seed: str | int | None = None
