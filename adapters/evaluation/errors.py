"""Error analysis: where a model goes wrong, not just how often.

Confusions and per-class accuracy use the normalised answers of ``metrics.normalize_answer`` (so a
confusion is never "Card_arrival → card_arrival."), but display the first original spelling seen.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from adapters.evaluation.metrics import normalize_answer


@dataclass(frozen=True)
class Confusion:
    expected: str
    produced: str
    count: int


@dataclass(frozen=True)
class ClassAccuracy:
    label: str
    support: int
    correct: int
    accuracy: float


@dataclass(frozen=True)
class Example:
    index: int
    prompt: str
    expected: str
    produced: str
    nll: float | None
    correct: bool


@dataclass(frozen=True)
class ErrorAnalysis:
    confusions: list[Confusion] = field(default_factory=list)
    per_class: list[ClassAccuracy] = field(default_factory=list)
    worst: list[Example] = field(default_factory=list)

    def to_dict(self) -> dict[str, list[dict[str, object]]]:
        return {
            "confusions": [asdict(c) for c in self.confusions],
            "per_class": [asdict(c) for c in self.per_class],
            "worst": [asdict(e) for e in self.worst],
        }


def top_confusions(expected: Sequence[str], produced: Sequence[str], k: int = 20) -> list[Confusion]:
    """Most frequent (expected → produced) mistakes, ties broken alphabetically for stable reports."""
    display: dict[str, str] = {}
    counts: Counter[tuple[str, str]] = Counter()
    for e, p in zip(expected, produced, strict=True):
        ne, np_ = normalize_answer(e), normalize_answer(p)
        display.setdefault(ne, e.strip())
        display.setdefault(np_, p.strip())
        if ne != np_:
            counts[(ne, np_)] += 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return [Confusion(display[e], display[p], n) for (e, p), n in ranked]


def per_class_accuracy(expected: Sequence[str], produced: Sequence[str]) -> list[ClassAccuracy]:
    """Accuracy per expected label, sorted from worst to best (then by label)."""
    display: dict[str, str] = {}
    support: dict[str, int] = defaultdict(int)
    correct: dict[str, int] = defaultdict(int)
    for e, p in zip(expected, produced, strict=True):
        ne = normalize_answer(e)
        display.setdefault(ne, e.strip())
        support[ne] += 1
        correct[ne] += ne == normalize_answer(p)
    out = [ClassAccuracy(display[k], support[k], correct[k], correct[k] / support[k]) for k in support]
    return sorted(out, key=lambda c: (c.accuracy, c.label))


def worst_examples(
    prompts: Sequence[str],
    expected: Sequence[str],
    produced: Sequence[str],
    nlls: Sequence[float] | None,
    k: int = 10,
) -> list[Example]:
    """Wrong answers first, then the highest answer NLL: the rows a reviewer should read."""
    rows = []
    for i, (q, e, p) in enumerate(zip(prompts, expected, produced, strict=True)):
        nll = nlls[i] if nlls is not None and math.isfinite(nlls[i]) else None
        rows.append(Example(i, q, e, p, nll, normalize_answer(e) == normalize_answer(p)))
    rows.sort(key=lambda x: (x.correct, -(x.nll if x.nll is not None else -math.inf), x.index))
    return rows[:k]


def analyse_errors(
    prompts: Sequence[str],
    expected: Sequence[str],
    produced: Sequence[str],
    nlls: Sequence[float] | None,
    label_like: bool,
    top_k: int = 20,
    worst_k: int = 10,
) -> ErrorAnalysis:
    """Confusions and per-class accuracy (label-like tasks only) plus worst examples (always)."""
    return ErrorAnalysis(
        confusions=top_confusions(expected, produced, top_k) if label_like else [],
        per_class=per_class_accuracy(expected, produced) if label_like else [],
        worst=worst_examples(prompts, expected, produced, nlls, worst_k),
    )
