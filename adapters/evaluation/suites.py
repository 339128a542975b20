"""One evaluation run: candidate vs reference on the same rows, then gates.

``evaluate`` runs every suite — task metrics, error analysis, retention (forgetting), fairness —
loading one model at a time (candidate, reference, and the bare base only if retention needs it and
the reference is not already the base) so peak memory is one model. Work is cut into chunks;
between chunks it reports progress and honours ``should_stop`` (raises ``EvaluationCancelled``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from adapters.evaluation.errors import ErrorAnalysis, analyse_errors
from adapters.evaluation.fairness import (
    DEFAULT_MAX_GROUPS,
    AttributeFairness,
    attribute_report,
    bounded_attributes,
    fairness_frame,
)
from adapters.evaluation.gates import GateConfig, GateOutcome, apply_gates
from adapters.evaluation.generate import BackendConfig, ChatEncoder, Generator, Message, ModelRef
from adapters.evaluation.metrics import (
    TaskMetrics,
    is_label_like,
    normalize_answer,
    sentence_chrf,
    task_metrics,
)
from adapters.evaluation.retention import RetentionResult, retention_result
from adapters.evaluation.rows import EvalExample, to_examples

__all__ = ["EvaluationCancelled", "EvaluationResult", "FairnessComparison", "ModelRef", "assemble_result", "evaluate"]

ProgressFn = Callable[[dict[str, Any]], None]
StopFn = Callable[[], bool]

#: Free-text rows count as "right" for fairness selection when sentence chrF reaches this.
FREE_TEXT_CORRECT_CHRF = 0.5


class EvaluationCancelled(Exception):
    """``should_stop()`` returned True; partial results are discarded."""


@dataclass(frozen=True)
class FairnessComparison:
    attribute: str
    candidate: AttributeFairness
    reference: AttributeFairness

    def to_dict(self) -> dict[str, Any]:
        return {"attribute": self.attribute, "candidate": self.candidate.to_dict(),
                "reference": self.reference.to_dict()}


@dataclass
class EvaluationResult:
    candidate: ModelRef
    reference: ModelRef
    backend: str
    label_like: bool
    rows: int
    skipped_rows: int
    task: dict[str, TaskMetrics]  # "candidate" / "reference"
    errors: dict[str, ErrorAnalysis]
    retention: RetentionResult | None
    fairness: list[FairnessComparison]
    predictions: list[dict[str, Any]]  # per row: prompt, expected, candidate, reference (+ NLLs)
    timings: dict[str, float] = field(default_factory=dict)
    gates: GateOutcome | None = None
    answer_choices: int | None = None  # how many answers generation was constrained to, if it was

    def to_dict(self, include_predictions: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "candidate": _ref_dict(self.candidate),
            "reference": _ref_dict(self.reference),
            "backend": self.backend,
            "label_like": self.label_like,
            "rows": self.rows,
            "skipped_rows": self.skipped_rows,
            "answer_choices": self.answer_choices,
            "task": {k: v.to_dict() for k, v in self.task.items()},
            "errors": {k: v.to_dict() for k, v in self.errors.items()},
            "retention": self.retention.to_dict() if self.retention else None,
            "fairness": [f.to_dict() for f in self.fairness],
            "timings": dict(self.timings),
            "gates": self.gates.to_dict() if self.gates else None,
        }
        if include_predictions:
            out["predictions"] = list(self.predictions)
        return out


def evaluate(
    candidate: ModelRef,
    reference: ModelRef,
    rows: Sequence[Mapping[str, Any]],
    retention_rows: Sequence[Mapping[str, Any]] | None = None,
    gates: GateConfig | None = None,
    backend: BackendConfig | str = "hf_merged",
    progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
    *,
    max_new_tokens: int | None = None,
    answer_choices: Sequence[str] | None = None,
    label_like: bool | None = None,
    positive_label: str | None = None,
    max_groups: int = DEFAULT_MAX_GROUPS,
    min_group_size: int = 20,
    chunk_size: int = 64,
) -> EvaluationResult:
    """Evaluate ``candidate`` against ``reference`` on ``rows`` and apply ``gates``.

    ``max_new_tokens`` defaults to the longest reference answer (in tokens) + 8, so label tasks do
    not pay for long generations. ``answer_choices`` constrains every answer to one of them, as the
    gateway does for a deployment that names them. ``label_like`` overrides the automatic detection.
    ``positive_label`` switches the fairness suite to binary selection; gaps count only groups with
    ``min_group_size`` rows or more (see fairness.py).
    """
    gates = gates or GateConfig()
    cfg = BackendConfig(kind=backend) if isinstance(backend, str) else backend  # type: ignore[arg-type]
    if chunk_size < 1:
        raise ValueError("chunk_size must be >= 1")
    if cfg.kind == "vllm":
        chunk_size = max(chunk_size, 2 * cfg.max_concurrency)
    examples, skipped = to_examples(rows)
    if not examples:
        raise ValueError("rows: no row with a reference answer (kind 'sft' with a completion)")
    retention_examples = to_examples(retention_rows)[0] if retention_rows else []
    expected = [e.answer for e in examples]
    label_like = is_label_like(expected) if label_like is None else label_like
    if max_new_tokens is None:
        enc = ChatEncoder.from_path(candidate.base_model_path)
        longest = max(len(enc.answer_ids(e.prompt, e.answer)) for e in examples)
        if answer_choices:
            longest = max(longest, *(len(enc.answer_ids(examples[0].prompt, c)) for c in answer_choices))
        max_new_tokens = min(longest + 8, 512)
    elif max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")

    reference_is_base = reference.adapter_path is None and reference.base_model_path == candidate.base_model_path
    need_base = bool(retention_examples) and not reference_is_base
    n, r = len(examples), len(retention_examples)
    total = 2 * (2 * n) + (r if retention_examples else 0) * 2
    tracker = _Progress(progress, should_stop, total)
    timings: dict[str, float] = {}

    def run_model(role: str, ref: ModelRef, task: bool, retention: bool) -> tuple[list[str], list[float], list[float]]:
        t0 = time.perf_counter()
        tracker.emit({"phase": "load", "model": role})
        with cfg.open(ref) as gen:
            answers: list[str] = []
            nlls: list[float] = []
            ret: list[float] = []
            if task:
                answers = _chunked(gen, "generate", examples, chunk_size, tracker, role, max_new_tokens,
                                   answer_choices)
                nlls = _chunked(gen, "nll", examples, chunk_size, tracker, role)
            if retention:
                ret = _chunked(gen, "retention", retention_examples, chunk_size, tracker, role)
        timings[role] = time.perf_counter() - t0
        return answers, nlls, ret

    cand_answers, cand_nll, cand_ret = run_model("candidate", candidate, True, bool(retention_examples))
    ref_answers, ref_nll, ref_ret = run_model("reference", reference, True, bool(retention_examples) and reference_is_base)
    if need_base:
        _, _, ref_ret = run_model("base", candidate.base, False, True)

    tracker.emit({"phase": "analyse"})
    result = assemble_result(
        candidate, reference, examples, cand_answers, ref_answers, cand_nll, ref_nll,
        cand_ret if retention_examples else None, ref_ret if retention_examples else None, gates,
        backend=cfg.kind, label_like=label_like, skipped_rows=skipped, positive_label=positive_label,
        max_groups=max_groups, min_group_size=min_group_size,
    )
    result.timings = timings
    result.answer_choices = len(answer_choices) if answer_choices else None
    tracker.emit({"phase": "done", "passed": result.gates.passed})
    return result


def assemble_result(
    candidate: ModelRef,
    reference: ModelRef,
    examples: list[EvalExample],
    cand_answers: list[str],
    ref_answers: list[str],
    cand_nll: list[float],
    ref_nll: list[float],
    cand_retention_nll: list[float] | None,
    base_retention_nll: list[float] | None,
    gates: GateConfig,
    *,
    backend: str = "hf_merged",
    label_like: bool | None = None,
    skipped_rows: int = 0,
    positive_label: str | None = None,
    max_groups: int = DEFAULT_MAX_GROUPS,
    min_group_size: int = 20,
) -> EvaluationResult:
    """All suites from model outputs (no model needed): the pure half of ``evaluate``."""
    expected = [e.answer for e in examples]
    label_like = is_label_like(expected) if label_like is None else label_like
    prompts = [e.prompt_text for e in examples]
    task = {
        "candidate": task_metrics(expected, cand_answers, cand_nll, label_like),
        "reference": task_metrics(expected, ref_answers, ref_nll, label_like),
    }
    errors = {
        "candidate": analyse_errors(prompts, expected, cand_answers, cand_nll, label_like),
        "reference": analyse_errors(prompts, expected, ref_answers, ref_nll, label_like),
    }
    retention = (
        retention_result(cand_retention_nll, base_retention_nll)
        if cand_retention_nll is not None and base_retention_nll is not None and cand_retention_nll
        else None
    )
    fairness = _fairness(examples, cand_answers, ref_answers, label_like, positive_label, max_groups,
                         min_group_size)
    predictions = [
        {"index": i, "prompt": prompts[i], "expected": expected[i], "candidate": cand_answers[i],
         "reference": ref_answers[i], "candidate_nll": cand_nll[i], "reference_nll": ref_nll[i]}
        for i in range(len(examples))
    ]
    result = EvaluationResult(
        candidate=candidate, reference=reference, backend=backend, label_like=label_like, rows=len(examples),
        skipped_rows=skipped_rows, task=task, errors=errors, retention=retention, fairness=fairness,
        predictions=predictions,
    )
    result.gates = apply_gates(result, gates)
    return result


class _Progress:
    def __init__(self, fn: ProgressFn | None, should_stop: StopFn | None, total: int) -> None:
        self.fn, self.should_stop, self.total, self.done = fn, should_stop, max(total, 1), 0

    def check(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise EvaluationCancelled("evaluation stopped on request")

    def advance(self, k: int, event: dict[str, Any]) -> None:
        self.done += k
        self.emit(event)

    def emit(self, event: dict[str, Any]) -> None:
        if self.fn is not None:
            self.fn({"type": "evaluation", **event, "fraction": min(self.done / self.total, 1.0)})
        self.check()


def _chunked(
    gen: Generator,
    phase: str,
    examples: list[EvalExample],
    chunk_size: int,
    tracker: _Progress,
    role: str,
    max_new_tokens: int = 0,
    choices: Sequence[str] | None = None,
) -> list[Any]:
    out: list[Any] = []
    for start in range(0, len(examples), chunk_size):
        tracker.check()
        chunk = examples[start : start + chunk_size]
        prompts: list[list[Message]] = [e.prompt for e in chunk]
        if phase == "generate":
            out.extend(gen.generate(prompts, max_new_tokens, choices))
        else:
            out.extend(gen.answer_nll(prompts, [e.answer for e in chunk]))
        tracker.advance(len(chunk), {"phase": phase, "model": role, "done": len(out), "total": len(examples)})
    return out


def _fairness(
    examples: list[EvalExample],
    cand: list[str],
    ref: list[str],
    label_like: bool,
    positive_label: str | None,
    max_groups: int,
    min_group_size: int,
) -> list[FairnessComparison]:
    attrs = [e.attributes for e in examples]
    keys = bounded_attributes(attrs, max_groups)
    if not keys:
        return []
    expected = [e.answer for e in examples]

    def report(produced: list[str], key: str) -> AttributeFairness:
        if label_like:
            y_true: list[Any] = [normalize_answer(e) for e in expected]
            y_pred: list[Any] = [normalize_answer(p) for p in produced]
            scores = [float(t == p) for t, p in zip(y_true, y_pred, strict=True)]
        else:
            scores = [sentence_chrf(e, p) for e, p in zip(expected, produced, strict=True)]
            y_true, y_pred = [1] * len(expected), [int(s >= FREE_TEXT_CORRECT_CHRF) for s in scores]
        df = fairness_frame(attrs, y_true, y_pred, scores, keys)
        pos = normalize_answer(positive_label) if positive_label is not None and label_like else None
        return attribute_report(df, key, max_groups, pos_label=pos, min_group_size=min_group_size)

    return [FairnessComparison(k, report(cand, k), report(ref, k)) for k in keys]


def _ref_dict(ref: ModelRef) -> dict[str, Any]:
    return {"base_model_path": ref.base_model_path, "adapter_path": ref.adapter_path, "label": ref.label}
