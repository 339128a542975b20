"""The JSON response bodies, declared for the OpenAPI document (and so for generated clients).

Handlers build their responses as dicts (`*_json` in `service.core`); these types only describe them, and the
tests hold the two together: every JSON response a test receives from the real service is validated against
the documented schema (`tests/openapi_conformance.py`), and the fuzz test checks it with schemathesis too.
Nested results reuse the dataclasses that compute them (`TaskMetrics`, `RetentionResult`, `GateOutcome`,
`ErrorAnalysis`, `StepReport`, `GuardrailResult`, ...), and configs their request types (`CurationConfig`,
`Hyperparameters`, ...), so their schema cannot drift from the code. What stays an open object is open by nature:
an event's `data` (its keys depend on the event type), a monitor run's result, and a curation step's `details`.
"""

from __future__ import annotations

from typing import Annotated, Any, Generic, Literal, TypeVar

import msgspec

from adapters.curation.config import CurationConfig
from adapters.curation.steps import StepReport
from adapters.evaluation.errors import ErrorAnalysis
from adapters.evaluation.gates import GateOutcome
from adapters.evaluation.generate import BackendKind, ModelRef
from adapters.evaluation.metrics import TaskMetrics
from adapters.evaluation.retention import RetentionResult
from adapters.evaluation.suites import FairnessComparison
from adapters.training.config import Hyperparameters, SearchSpec
from monitoring.experiments import Action, Guardrail, GuardrailResult, Policy
from service.core.deployments import DeploymentConfig
from service.core.experiments import AutoDeploy, Goal

T = TypeVar("T")
Object = dict[str, Any]
Timestamp = Annotated[int, msgspec.Meta(description="Unix seconds")]
Instant = Annotated[float, msgspec.Meta(description="Unix seconds, fractional")]
FeedbackRange = Annotated[list[int], msgspec.Meta(min_length=2, max_length=2,
                                                  description="the feedback ids it was made from: [first, last]")]


class _Out(msgspec.Struct, kw_only=True):
    """A response object: a field without a default is always present (null where it has no value)."""


class Problem(_Out, kw_only=True):
    """RFC 9457 problem details: every error response (`application/problem+json`)."""

    type: str
    title: str
    status: int
    detail: str
    instance: str
    field: Annotated[str, msgspec.Meta(description="the request field (or NDJSON line) at fault")] | None = None
    errors: Annotated[list[ProblemItem], msgspec.Meta(description="every fault, when a request has several")] | None = None


class ProblemItem(msgspec.Struct, kw_only=True):
    """One fault: of a request's validation (`field`, `message`), of a batch item (`index` too), or a bad NDJSON
    line (`line`, `field`, `reason`: the same items as an upload's `errors`)."""

    field: str | None
    message: str | None = None
    index: Annotated[int, msgspec.Meta(description="0-based position in a batch body")] | None = None
    line: Annotated[int, msgspec.Meta(description="1-based line number in an NDJSON body")] | None = None
    reason: str | None = None


class Page(_Out, Generic[T], kw_only=True):
    object: Literal["list"]
    data: list[T]
    has_more: Annotated[bool, msgspec.Meta(description="paged lists only")] = False


# --- health ----------------------------------------------------------------------------------------------
class Health(_Out, kw_only=True):
    status: Literal["ok"]


class Ready(_Out, kw_only=True):
    status: Literal["ready", "not ready"]
    database: bool
    vllm: bool


# --- inference (OpenAI shaped; vLLM's other fields pass through) -----------------------------------------
class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatMessageOut(msgspec.Struct, kw_only=True):
    role: str
    content: str | None


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int
    message: ChatMessageOut
    finish_reason: str | None


class ChatCompletion(msgspec.Struct, kw_only=True):
    id: Annotated[str, msgspec.Meta(description="the completion id: feedback refers to it")]
    object: Literal["chat.completion"]
    created: int
    model: Annotated[str, msgspec.Meta(description="the deployment")]
    choices: list[ChatChoice]
    usage: Usage


class TextChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    finish_reason: str | None


class TextCompletion(msgspec.Struct, kw_only=True):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage


class Model(_Out, kw_only=True):
    id: str
    object: Literal["model"]
    created: Timestamp
    owned_by: str


class CompletionLog(_Out, kw_only=True):
    object: Literal["completion.log"]
    id: str
    deployment: str
    adapter: Annotated[str, msgspec.Meta(description="the served name that answered")]
    adapter_id: str | None
    experiment_id: str | None
    variant: str | None
    user: str | None
    metadata: Object | None
    kind: Literal["chat", "text"]
    messages: Annotated[Any, msgspec.Meta(description="chat completions: the request's messages")] = None
    prompt: Annotated[Any, msgspec.Meta(description="text completions: the prompt")] = None
    output: str | None
    finish_reason: str | None
    usage: Usage
    latency_seconds: float | None
    stream: bool
    error: str | None
    created_at: Timestamp


# --- deployments, keys, serving --------------------------------------------------------------------------
class Deployment(_Out, kw_only=True):
    object: Literal["deployment"]
    name: str
    id: str
    base_model: str
    production_adapter_id: str | None
    config: DeploymentConfig
    created_at: Timestamp
    serving: Annotated[str | None, msgspec.Meta(description="the served name production routes to")] = None
    staged: Annotated[str | None, msgspec.Meta(
        description="served name of the newest adapter that passed its evaluation, loaded and probed ahead of a "
                    "promote, which then only switches routing")] = None
    standby: Annotated[str | None, msgspec.Meta(
        description="served name of the previous production, kept loaded until the next swap, so a rollback only "
                    "switches routing")] = None


class ApiKey(_Out, kw_only=True):
    object: Literal["api_key"]
    id: str
    name: str
    scope: Literal["app", "admin"]
    key: Annotated[str, msgspec.Meta(description="shown once, here")]
    created_at: Timestamp


class DeploymentEvent(_Out, kw_only=True):
    object: Literal["deployment.event"]
    id: int
    deployment: str
    type: str
    adapter_id: str | None
    previous_adapter_id: str | None
    forced: bool
    reason: str | None
    created_at: Instant


# --- data ------------------------------------------------------------------------------------------------
class FeedbackIds(_Out, kw_only=True):
    object: Literal["list"]
    ids: Annotated[list[int], msgspec.Meta(description="one per item, in the order sent")]


class Feedback(_Out, kw_only=True):
    object: Literal["feedback"]
    id: int
    client_id: str | None
    completion_id: str | None
    deployment: str
    rating: float | None
    correction: str | None
    comment: str | None
    attributes: Object | None
    created_at: Instant


class FeedbackPage(Page[Feedback], kw_only=True):
    next_cursor: int | None = None


class Dataset(_Out, kw_only=True):
    object: Literal["dataset"]
    id: str
    name: str
    deployment: str
    created_at: Timestamp
    deleted_at: Timestamp | None
    records: Annotated[int, msgspec.Meta(description="on create and show")] = 0


class LineError(_Out, kw_only=True):
    line: Annotated[int, msgspec.Meta(description="1-based line number in the NDJSON body")]
    field: Annotated[str, msgspec.Meta(description='the JSON path at fault (`messages[1].role`), or "line"')]
    reason: str


class UploadResult(_Out, kw_only=True):
    object: Literal["dataset.upload"]
    id: str
    accepted: int
    duplicates: int
    rejected: int
    errors: Annotated[list[LineError], msgspec.Meta(description="the first bad lines (at most 1,000)")]


class SnapshotCounts(_Out, kw_only=True):
    input: Annotated[int, msgspec.Meta(description="rows before curation (records + rows made from feedback)")]
    train: int
    validation: int


class Snapshot(_Out, kw_only=True):
    object: Literal["snapshot"]
    id: str
    dataset_id: str | None
    deployment: str
    counts: SnapshotCounts
    curation: Annotated[CurationConfig, msgspec.Meta(description="the whole config it was curated with, defaults filled")]
    feedback_range: FeedbackRange | None
    created_at: Timestamp
    deleted_at: Timestamp | None
    deleted_reason: str | None


class LengthStats(msgspec.Struct, kw_only=True):
    count: int
    min: float
    mean: float
    p50: float
    p90: float
    max: float


class SplitSummary(msgspec.Struct, kw_only=True):
    rows: int
    kinds: Annotated[dict[str, int], msgspec.Meta(description="rows per kind: sft, preference, unpaired")]
    labels: Annotated[dict[str, int] | None, msgspec.Meta(description="the most frequent answers, label-like data only")]
    distinct_labels: int | None
    unpaired_labels: Annotated[dict[str, int] | None, msgspec.Meta(description='"good" / "bad" unpaired rows')]
    prompt_chars: LengthStats
    answer_chars: LengthStats
    prompt_words: LengthStats
    answer_words: LengthStats
    prompt_turns: LengthStats
    attributes: Annotated[dict[str, dict[str, int]], msgspec.Meta(description="row attribute → value → rows")]
    weights: Annotated[LengthStats | None, msgspec.Meta(description="label-balance weights, if balancing weighted")]


class SplitCounts(msgspec.Struct, kw_only=True):
    train: int
    validation: int


class SnapshotReport(_Out, kw_only=True):
    """The curation's data-quality report as JSON (`text/html` gives the page with plots)."""

    object: Literal["snapshot.report"]
    snapshot_id: str
    input_count: int
    output_count: int
    removed_total: int
    added_total: int
    flagged_total: int
    counts: SplitCounts
    label_like: bool
    splits: Annotated[dict[str, SplitSummary], msgspec.Meta(description='keyed "train" and "validation"')]
    steps: Annotated[list[StepReport], msgspec.Meta(description="each curation step: removals with reasons, examples")]
    config: CurationConfig
    content_hash: str


class EvaluationDetails(msgspec.Struct, kw_only=True):
    """`adapters.evaluation.suites.EvaluationResult.to_dict()`: every suite's numbers, candidate and reference."""

    candidate: ModelRef
    reference: ModelRef
    backend: BackendKind
    label_like: bool
    rows: int
    skipped_rows: int
    answer_choices: int | None
    task: Annotated[dict[str, TaskMetrics], msgspec.Meta(description='keyed "candidate" and "reference"')]
    errors: Annotated[dict[str, ErrorAnalysis], msgspec.Meta(description='keyed "candidate" and "reference"')]
    retention: RetentionResult | None
    fairness: list[FairnessComparison]
    timings: Annotated[dict[str, float], msgspec.Meta(description="seconds per phase")]
    gates: GateOutcome | None


class LossPoint(msgspec.Struct, kw_only=True):
    step: float
    loss: float


class ValidationPoint(msgspec.Struct, kw_only=True):
    """A validation loss at a step: a job's `val_history` and a report's loss curve."""

    step: float
    val_loss: float


class LossCurve(msgspec.Struct, kw_only=True):
    train: list[LossPoint]
    validation: list[ValidationPoint]


class EvaluationReport(_Out, kw_only=True):
    """The whole evaluation as JSON (`text/html` gives the page with plots): everything behind the summary."""

    object: Literal["evaluation.report"]
    id: str
    status: str
    reasons: list[str] | None
    schema_version: int | None = None
    evaluation: Annotated[EvaluationDetails, msgspec.Meta(description="absent if the evaluation errored")] | None = None
    loss_curve: Annotated[LossCurve, msgspec.Meta(description="from the training job's events")] | None = None
    seconds: float | None = None
    error: Annotated[str, msgspec.Meta(description="why an evaluation ended in error")] | None = None


# --- jobs ------------------------------------------------------------------------------------------------
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class JobError(_Out, kw_only=True):
    message: str
    code: Annotated[str, msgspec.Meta(description="curation_error, training_error, parent_adapter, drift_error, ...")] \
        | None = None


class _JobTimes(_Out, kw_only=True):
    id: str
    status: JobStatus
    deployment: str
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None
    attempts: int
    error: Annotated[JobError | None, msgspec.Meta(description="why a failed job failed")]


class SnapshotSources(_Out, kw_only=True):
    deployment: str
    datasets: list[str]
    include_feedback: bool
    curation: CurationConfig


class SnapshotJob(_JobTimes, kw_only=True):
    object: Literal["snapshot.job"]
    snapshot_id: Annotated[str | None, msgspec.Meta(description="set when the job has succeeded")]
    sources: SnapshotSources | None


class SearchTrial(msgspec.Struct, kw_only=True):
    number: int
    state: str
    value: Annotated[float | None, msgspec.Meta(description="the trial's best validation loss")]
    params: Annotated[dict[str, Any], msgspec.Meta(description="the hyperparameters it tried")]


class TrainingMetrics(msgspec.Struct, kw_only=True):
    """What the training recipe reported. Which keys are present depends on the method: SFT reports them all,
    DPO/KTO the losses, steps and validation history, a search its trials; a cancelled run only `steps`."""

    train_loss: float | None = None
    steps: int | None = None
    total_steps: int | None = None
    epochs: float | None = None
    train_rows: int | None = None
    replay_rows: Annotated[int, msgspec.Meta(description="rows of the base model's own answers mixed in")] | None = None
    validation_rows: int | None = None
    best_val_loss: Annotated[float, msgspec.Meta(description="of the adapter kept")] | None = None
    best_step: int | None = None
    stopped_early: bool | None = None
    runtime_seconds: float | None = None
    precision: Literal["fp32", "bf16"] | None = None
    tokens_per_second: float | None = None
    val_history: list[ValidationPoint] | None = None
    last_loss: Annotated[float, msgspec.Meta(description="the last step event's loss")] | None = None
    last_val_loss: float | None = None
    best_trial: int | None = None
    best_params: dict[str, Any] | None = None
    n_trials: int | None = None
    trials: list[SearchTrial] | None = None


class FineTuningJob(_JobTimes, kw_only=True):
    object: Literal["fine_tuning.job"]
    model: str
    method: str | None
    snapshot_id: str | None
    hyperparameters: Annotated[Hyperparameters | None, msgspec.Meta(description="empty until a search chose them")]
    trained_tokens: int | None
    metrics: TrainingMetrics | None
    adapter_id: str | None
    fine_tuned_model: str | None
    suffix: str | None
    seed: int | None
    search: SearchSpec | None
    auto_deploy: AutoDeploy | None
    parent_adapter_id: str | None


class DriftJobResult(msgspec.Struct, kw_only=True):
    """The outcome in brief; the full result is the monitor run `monitor_run_id` (`GET /v1/monitoring/drift`)."""

    reference_rows: int
    current_rows: int
    reference_source: str
    skipped: Annotated[str, msgspec.Meta(description="why nothing was computed (too few rows)")] | None = None
    monitor_run_id: int | None = None
    share: Annotated[float, msgspec.Meta(description="drifted / checked features")] | None = None
    drifted: Annotated[list[str], msgspec.Meta(description="the features that drifted")] | None = None


class DriftJob(_JobTimes, kw_only=True):
    object: Literal["drift.job"]
    result: Annotated[DriftJobResult | None, msgspec.Meta(description="set when the job has finished")]


class ErasureResult(msgspec.Struct, kw_only=True):
    """What the erasure deleted, and the copies it could not delete."""

    completions: Annotated[int, msgspec.Meta(description="completions deleted")]
    feedback: Annotated[int, msgspec.Meta(description="feedback items deleted")]
    snapshots: Annotated[list[str], msgspec.Meta(
        description="snapshots whose curated rows may hold the user's feedback (DELETE /v1/snapshots/{id})")]
    adapters: Annotated[list[str], msgspec.Meta(description="adapters trained on the user's feedback")]


class ErasureJob(_JobTimes, kw_only=True):
    object: Literal["erasure.job"]
    user: str
    result: Annotated[ErasureResult | None, msgspec.Meta(
        description="set when the job has finished (when cancelled: what was deleted until then)")]


class JobEvent(_Out, kw_only=True):
    object: Literal["fine_tuning.job.event"]
    id: int
    created_at: Instant
    type: str
    level: str
    message: str
    data: Object | None


class Checkpoint(_Out, kw_only=True):
    object: Literal["fine_tuning.job.checkpoint"]
    id: str
    step_number: int | None
    path: str | None
    metrics: Object
    exists: bool
    created_at: Timestamp


class MonitorAccepted(_Out, kw_only=True):
    status: Literal["accepted"]
    deployment: str
    drift_job: DriftJob


class MonitorRun(msgspec.Struct, kw_only=True):
    """One stored drift, fairness or trigger result; its other keys are the result itself."""

    id: int
    deployment: str
    kind: Literal["drift", "fairness", "trigger"]
    created_at: Instant


# --- adapters, evaluations, experiments ------------------------------------------------------------------
class Adapter(_Out, kw_only=True):
    object: Literal["adapter"]
    id: str
    deployment: str
    version: int
    status: str
    method: str
    path: str
    base_model: str
    base_model_hash: str | None
    job_id: str | None
    snapshot_id: str | None
    feedback_range: FeedbackRange | None
    hyperparameters: Hyperparameters | None
    metrics: Annotated[TrainingMetrics | None, msgspec.Meta(description="its training job's metrics")]
    evaluation_id: str | None
    parent_adapter_id: str | None
    created_at: Timestamp
    deleted_at: Timestamp | None
    deleted_reason: str | None


class EvaluationSummary(_Out, kw_only=True):
    """The headline numbers; the report (`GET /v1/evaluations/{id}/report`) has errors, fairness and plots."""

    rows: int
    label_like: Annotated[bool, msgspec.Meta(description="answers are labels: accuracy and macro P/R/F1 apply")]
    answer_choices: Annotated[int | None, msgspec.Meta(description="how many answers generation was held to")]
    backend: BackendKind
    task: Annotated[dict[str, TaskMetrics], msgspec.Meta(description='keyed "candidate" and "reference"')]
    retention: Annotated[RetentionResult | None, msgspec.Meta(description="candidate vs base NLL on the retention set")]
    gates: GateOutcome | None


class Evaluation(_Out, kw_only=True):
    object: Literal["evaluation"]
    id: str
    adapter_id: str
    job_id: str | None
    reference: Annotated[str, msgspec.Meta(description='the production adapter compared with, or "base"')]
    status: Literal["queued", "running", "passed", "failed", "error", "cancelled"]
    reasons: Annotated[list[str] | None, msgspec.Meta(description="one line per gate check: PASS or FAIL, with why")]
    summary: Annotated[EvaluationSummary | None, msgspec.Meta(description="null until the evaluation has run")]
    created_at: Timestamp
    finished_at: Timestamp | None


class ExperimentEvent(_Out, kw_only=True):
    type: str
    data: Object | None
    created_at: Instant


class Interval(msgspec.Struct, kw_only=True):
    lower: float | None
    upper: float | None
    estimate: float | None
    alpha: float | None


class Lift(_Out, kw_only=True):
    """Treatment minus control on the goal metric; `significant` uses the anytime-valid interval, Holm-adjusted."""

    absolute: float | None
    relative: float | None
    anytime_interval: Interval
    fixed_interval: Annotated[Interval, msgspec.Meta(description="a fixed-horizon t interval, for reference only")]
    p_anytime: float | None
    p_holm: float | None
    significant: bool


class VariantStatistics(_Out, kw_only=True):
    name: str
    is_control: bool
    weight: float
    units: Annotated[int, msgspec.Meta(description="distinct `user`s assigned in the current ramp stage")]
    requests: int
    errors: int
    error_rate: float | None
    feedback_count: int
    mean_rating: float | None
    mean_rating_ci: list[float | None]
    latency_p95_seconds: float | None
    mean_output_tokens: float | None
    lift: Annotated[Lift | None, msgspec.Meta(description="treatments only")] = None
    guardrails: Annotated[list[GuardrailResult], msgspec.Meta(description="treatments only")] = []


class ExperimentStatistics(_Out, kw_only=True):
    variants: list[VariantStatistics]
    srm_pvalue: Annotated[float | None, msgspec.Meta(description="sample-ratio mismatch, chi-square on units")]
    alpha: float
    mode: Literal["fixed", "thompson"]
    method: str


class ExperimentVariant(_Out, kw_only=True):
    name: str
    adapter_id: Annotated[str | None, msgspec.Meta(description="null: the base model")]
    weight: float
    is_control: bool


class ExperimentDecision(_Out, kw_only=True):
    action: Action
    winner: str | None
    reason: str
    apply: Annotated[bool, msgspec.Meta(description="whether the policy lets the monitor act on it")]
    at: Instant


class ExperimentState(_Out, kw_only=True):
    """The monitor's bookkeeping, empty until the experiment has started."""

    weights: Annotated[list[float], msgspec.Meta(description="traffic share per variant, in variant order")] | None = None
    stage: Annotated[int, msgspec.Meta(description="index into policy.ramp")] | None = None
    stage_started_at: Instant | None = None


class Experiment(_Out, kw_only=True):
    object: Literal["experiment"]
    id: str
    deployment: str
    status: Literal["pending", "running", "promoted", "rolled_back", "inconclusive", "stopped", "failed"]
    variants: list[ExperimentVariant]
    goal: Goal
    guardrails: list[Guardrail]
    policy: Policy
    decision: Annotated[ExperimentDecision | None, msgspec.Meta(description="the monitor's latest decision")]
    state: ExperimentState
    summary: Annotated[ExperimentStatistics | None, msgspec.Meta(description="show and create only")]
    created_at: Timestamp
    finished_at: Timestamp | None
    events: Annotated[list[ExperimentEvent], msgspec.Meta(description="show only")] = []
