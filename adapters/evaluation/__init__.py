"""Evaluation of adapters: task metrics, error analysis, retention, fairness, gates and reports.

Entry point: ``evaluate(candidate, reference, rows, retention_rows, gates, backend, progress, should_stop)``.
"""

from adapters.evaluation.gates import GateCheck, GateConfig, GateOutcome, apply_gates
from adapters.evaluation.generate import (
    BackendConfig,
    GenerationError,
    Generator,
    MergedHFGenerator,
    ModelRef,
    VLLMGenerator,
)
from adapters.evaluation.report import report_html, report_json
from adapters.evaluation.retention import load_retention_rows
from adapters.evaluation.suites import EvaluationCancelled, EvaluationResult, assemble_result, evaluate

__all__ = [
    "BackendConfig",
    "EvaluationCancelled",
    "EvaluationResult",
    "GateCheck",
    "GateConfig",
    "GateOutcome",
    "GenerationError",
    "Generator",
    "MergedHFGenerator",
    "ModelRef",
    "VLLMGenerator",
    "apply_gates",
    "assemble_result",
    "evaluate",
    "load_retention_rows",
    "report_html",
    "report_json",
]
