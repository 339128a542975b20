"""Retention (catastrophic forgetting) check.

Fine-tuning on a narrow task can erode general skill. We measure it as the mean NLL of reference
answers on text far from any adapter's task (GSM8K word problems with human step-by-step answers,
shipped as package data), for the candidate and for the bare base model. A rise of the candidate's
NLL relative to the base is forgetting. NLL needs no generation, so it is cheap and deterministic.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from adapters.evaluation.metrics import mean_nll

DEFAULT_RETENTION_LIMIT = 100


def default_retention_path() -> Path:
    return Path(str(resources.files("adapters") / "data" / "retention_gsm8k.jsonl"))


def load_retention_rows(path: str | Path | None = None, limit: int | None = DEFAULT_RETENTION_LIMIT) -> list[dict[str, Any]]:
    """Retention rows as canonical SFT rows. Accepts ``{"question","answer"}`` or canonical rows.

    The first ``limit`` rows are used (the shipped file is already a seeded random sample), so a
    smaller cap is a prefix of a larger one and results stay comparable between runs.
    """
    if limit is not None and limit < 1:
        raise ValueError("limit must be >= 1 or None")
    p = Path(path) if path is not None else default_retention_path()
    rows: list[dict[str, Any]] = []
    with p.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if "question" in obj and "answer" in obj:
                rows.append({"kind": "sft", "prompt": [{"role": "user", "content": obj["question"]}],
                             "completion": obj["answer"]})
            elif "prompt" in obj and "completion" in obj:
                rows.append(obj)
            else:
                raise ValueError(f"{p}:{lineno}: need question/answer or prompt/completion fields")
            if limit is not None and len(rows) >= limit:
                break
    return rows


@dataclass(frozen=True)
class RetentionResult:
    rows: int
    candidate_nll: float | None
    base_nll: float | None
    relative_change: float | None  # (candidate - base) / base; > 0 means the candidate forgot

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def retention_result(candidate_nlls: Sequence[float], base_nlls: Sequence[float]) -> RetentionResult:
    """Compare mean answer NLL of candidate and base over the same retention rows."""
    if len(candidate_nlls) != len(base_nlls):
        raise ValueError("candidate and base NLL lists must have the same length")
    c, b = mean_nll(candidate_nlls), mean_nll(base_nlls)
    rel = (c - b) / b if c is not None and b is not None and b > 0 and math.isfinite(b) else None
    return RetentionResult(len(candidate_nlls), c, b, rel)
