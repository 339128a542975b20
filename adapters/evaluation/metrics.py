"""Task metrics over (expected, produced) answer pairs.

Exact match compares *normalised* answers so that a model is not punished for formatting noise
that no caller cares about: ``normalize_answer`` strips surrounding whitespace, collapses inner
whitespace runs to one space, case-folds, and removes trailing punctuation (``.,;:!?`` and
closing quotes). Inner punctuation and underscores are kept: ``card_arrival`` and ``card arrival``
are different labels.

Label-like tasks (few distinct answers, e.g. intent classification) get accuracy plus macro
precision/recall/F1 from scikit-learn; free-text tasks get corpus BLEU and chrF (sacrebleu, 0-100
scale) and mean ROUGE-L F-measure (rouge-score, 0-1). Exact-match accuracy and the text metrics
are computed for both kinds so that reports are comparable; the gate picks one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass

_WS = re.compile(r"\s+")
_TRAILING_PUNCT = ".,;:!?\"'`)]}»”’"

#: A task is label-like when its distinct expected answers are at most this share of the rows ...
LABEL_LIKE_MAX_RATIO = 0.2
#: ... or when every answer is a short name (≤ this many words) and at most half the rows are distinct:
#: a sample of 300 rows over Banking77's 77 intents has 26 % distinct answers, all single snake_case names.
LABEL_NAME_MAX_WORDS = 3


def normalize_answer(text: str) -> str:
    """Normalise an answer for exact match (see module docstring for the exact rules)."""
    text = _WS.sub(" ", text.strip()).casefold()
    return text.rstrip(_TRAILING_PUNCT).rstrip()


def is_label_like(expected: Sequence[str], max_ratio: float = LABEL_LIKE_MAX_RATIO) -> bool:
    """True when answers repeat enough to be classes (≥ 2 rows).

    Either distinct normalised answers ≤ ``max_ratio`` · rows, or every answer is a short name of at most
    ``LABEL_NAME_MAX_WORDS`` words and distinct answers ≤ half the rows (many classes, few rows each).
    """
    if len(expected) < 2:
        return False
    normalised = [normalize_answer(e) for e in expected]
    distinct = len(set(normalised))
    if distinct <= max_ratio * len(expected):
        return True
    short_names = all(0 < len(a.split()) <= LABEL_NAME_MAX_WORDS and len(a) <= 64 for a in normalised)
    return short_names and distinct <= 0.5 * len(expected)


def exact_matches(expected: Sequence[str], produced: Sequence[str]) -> list[bool]:
    _check_lengths(expected, produced)
    return [normalize_answer(e) == normalize_answer(p) for e, p in zip(expected, produced, strict=True)]


@dataclass(frozen=True)
class TaskMetrics:
    """Headline metrics of one model on one row set; ``None`` where a metric does not apply."""

    rows: int
    accuracy: float
    macro_precision: float | None
    macro_recall: float | None
    macro_f1: float | None
    bleu: float
    chrf: float
    rouge_l: float
    mean_nll: float | None
    perplexity: float | None

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def classification_metrics(expected: Sequence[str], produced: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro precision/recall/F1 over the *expected* label set.

    Produced answers outside the label set count as wrong (they lower recall of the true class)
    but do not get a precision column of their own, so a model cannot dilute the macro average
    by inventing labels.
    """
    from sklearn.metrics import precision_recall_fscore_support

    _check_lengths(expected, produced)
    y_true = [normalize_answer(e) for e in expected]
    y_pred = [normalize_answer(p) for p in produced]
    labels = sorted(set(y_true))
    p, r, f, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=labels, average="macro", zero_division=0
    )
    acc = sum(t == q for t, q in zip(y_true, y_pred, strict=True)) / len(y_true) if y_true else 0.0
    return {"accuracy": acc, "macro_precision": float(p), "macro_recall": float(r), "macro_f1": float(f)}


def text_metrics(expected: Sequence[str], produced: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU and chrF (0-100) and mean ROUGE-L F (0-1) of produced against expected."""
    import sacrebleu
    from rouge_score import rouge_scorer

    _check_lengths(expected, produced)
    if not expected:
        return {"bleu": 0.0, "chrf": 0.0, "rouge_l": 0.0}
    refs = [list(expected)]
    bleu = sacrebleu.corpus_bleu(list(produced), refs).score
    chrf = sacrebleu.corpus_chrf(list(produced), refs).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score(e, p)["rougeL"].fmeasure for e, p in zip(expected, produced, strict=True)]
    return {"bleu": float(bleu), "chrf": float(chrf), "rouge_l": float(sum(rouge) / len(rouge))}


def sentence_chrf(expected: str, produced: str) -> float:
    """chrF of one answer on a 0-1 scale: the per-row score used for free-text fairness groups."""
    import sacrebleu

    return float(sacrebleu.sentence_chrf(produced, [expected]).score) / 100.0


def mean_nll(nlls: Sequence[float]) -> float | None:
    """Mean over answers of the per-answer mean token NLL (each answer weighs the same)."""
    finite = [x for x in nlls if math.isfinite(x)]
    return sum(finite) / len(finite) if finite else None


def perplexity(nll: float | None) -> float | None:
    return math.exp(nll) if nll is not None else None


def task_metrics(
    expected: Sequence[str],
    produced: Sequence[str],
    nlls: Sequence[float] | None,
    label_like: bool,
) -> TaskMetrics:
    """All headline metrics; macro P/R/F1 only for label-like tasks."""
    _check_lengths(expected, produced)
    matches = exact_matches(expected, produced)
    cls = classification_metrics(expected, produced) if label_like else None
    text = text_metrics(expected, produced)
    nll = mean_nll(nlls) if nlls is not None else None
    return TaskMetrics(
        rows=len(expected),
        accuracy=sum(matches) / len(matches) if matches else 0.0,
        macro_precision=cls["macro_precision"] if cls else None,
        macro_recall=cls["macro_recall"] if cls else None,
        macro_f1=cls["macro_f1"] if cls else None,
        bleu=text["bleu"],
        chrf=text["chrf"],
        rouge_l=text["rouge_l"],
        mean_nll=nll,
        perplexity=perplexity(nll),
    )


def _check_lengths(expected: Sequence[str], produced: Sequence[str]) -> None:
    if len(expected) != len(produced):
        raise ValueError(f"expected has {len(expected)} answers but produced has {len(produced)}")
