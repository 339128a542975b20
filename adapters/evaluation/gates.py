"""Promotion gates: may a candidate adapter replace the reference (production or base)?

Three checks, each reported whether it passed or failed so a reviewer sees the whole picture:

* task — ``candidate[metric] - reference[metric] >= min_task_delta`` (accuracy for label-like tasks,
  chrF (0-100) for free text unless ``task_metric`` says otherwise);
* retention — relative rise of retention-set NLL vs the base model ``<= max_retention_increase``;
* fairness — for every bounded attribute, the rise of the largest of DPD/EOD vs the reference
  ``<= max_fairness_gap_increase``.

A gate set to ``None`` is disabled (reported as skipped, never failing). A check with no data
(no retention rows, no bounded attributes) passes and says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adapters.evaluation.suites import EvaluationResult

TASK_METRICS = ("auto", "accuracy", "macro_f1", "chrf", "bleu", "rouge_l")


@dataclass(frozen=True)
class GateConfig:
    min_task_delta: float | None = 0.0  # candidate - reference, in the metric's own units
    task_metric: str = "auto"  # auto = accuracy for label-like tasks, chrf otherwise
    max_retention_increase: float | None = 0.05  # relative NLL rise vs base (0.05 = +5 %)
    max_fairness_gap_increase: float | None = 0.05  # absolute rise of max(DPD, EOD) vs reference

    def __post_init__(self) -> None:
        if self.task_metric not in TASK_METRICS:
            raise ValueError(f"task_metric must be one of {', '.join(TASK_METRICS)}; got {self.task_metric!r}")
        if self.min_task_delta is not None and not (
            math.isfinite(self.min_task_delta) and -100.0 <= self.min_task_delta <= 100.0
        ):
            raise ValueError("min_task_delta must be a number in [-100, 100] or None")
        if self.max_retention_increase is not None and not (0.0 <= self.max_retention_increase <= 10.0):
            raise ValueError("max_retention_increase must be in [0, 10] or None")
        if self.max_fairness_gap_increase is not None and not (0.0 <= self.max_fairness_gap_increase <= 1.0):
            raise ValueError("max_fairness_gap_increase must be in [0, 1] or None")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> GateConfig:
        data = dict(data or {})
        unknown = set(data) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown gate field(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    def resolved_metric(self, label_like: bool) -> str:
        if self.task_metric != "auto":
            return self.task_metric
        return "accuracy" if label_like else "chrf"


@dataclass(frozen=True)
class GateCheck:
    name: str  # "task" | "retention" | "fairness:<attribute>"
    passed: bool
    reason: str
    value: float | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class GateOutcome:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    checks: list[GateCheck] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reasons": list(self.reasons), "checks": [asdict(c) for c in self.checks]}


def apply_gates(result: EvaluationResult, config: GateConfig) -> GateOutcome:
    checks = [_task_check(result, config), _retention_check(result, config), *_fairness_checks(result, config)]
    return GateOutcome(
        passed=all(c.passed for c in checks),
        reasons=[f"{'PASS' if c.passed else 'FAIL'} {c.name}: {c.reason}" for c in checks],
        checks=checks,
    )


def _task_check(result: EvaluationResult, config: GateConfig) -> GateCheck:
    metric = config.resolved_metric(result.label_like)
    if config.min_task_delta is None:
        return GateCheck("task", True, f"{metric} gate disabled")
    cand = getattr(result.task["candidate"], metric)
    ref = getattr(result.task["reference"], metric)
    if cand is None or ref is None:
        return GateCheck("task", False, f"{metric} is not available for this task (label-like: {result.label_like})")
    delta = cand - ref
    ok = delta >= config.min_task_delta - 1e-12
    return GateCheck(
        "task", ok,
        f"{metric} {cand:.4f} vs reference {ref:.4f} (delta {delta:+.4f} {'>=' if ok else '<'} "
        f"min {config.min_task_delta:+.4f})",
        value=delta, threshold=config.min_task_delta,
    )


def _retention_check(result: EvaluationResult, config: GateConfig) -> GateCheck:
    if config.max_retention_increase is None:
        return GateCheck("retention", True, "gate disabled")
    r = result.retention
    if r is None or r.relative_change is None:
        return GateCheck("retention", True, "skipped: no retention rows were evaluated")
    ok = r.relative_change <= config.max_retention_increase + 1e-12
    return GateCheck(
        "retention", ok,
        f"NLL {r.candidate_nll:.4f} vs base {r.base_nll:.4f} (change {r.relative_change:+.2%} "
        f"{'<=' if ok else '>'} max {config.max_retention_increase:+.2%})",
        value=r.relative_change, threshold=config.max_retention_increase,
    )


def _fairness_checks(result: EvaluationResult, config: GateConfig) -> list[GateCheck]:
    if config.max_fairness_gap_increase is None:
        return [GateCheck("fairness", True, "gate disabled")]
    if not result.fairness:
        return [GateCheck("fairness", True, "skipped: no attribute with bounded cardinality")]
    out = []
    for comp in result.fairness:
        cand, ref = comp.candidate.max_gap, comp.reference.max_gap
        name = f"fairness:{comp.attribute}"
        if cand is None:
            out.append(GateCheck(name, True, "skipped: gap undefined (a single populated group)"))
            continue
        increase = cand - (ref or 0.0)
        ok = increase <= config.max_fairness_gap_increase + 1e-12
        out.append(GateCheck(
            name, ok,
            f"max(DPD, EOD) {cand:.4f} vs reference {ref if ref is not None else float('nan'):.4f} "
            f"(increase {increase:+.4f} {'<=' if ok else '>'} max {config.max_fairness_gap_increase:.4f})",
            value=increase, threshold=config.max_fairness_gap_increase,
        ))
    return out
