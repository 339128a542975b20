"""Task metrics and error analysis on constructed predictions with hand-computed values."""

from __future__ import annotations

import math

import pytest

from adapters.evaluation.errors import analyse_errors, per_class_accuracy, top_confusions, worst_examples
from adapters.evaluation.metrics import (
    classification_metrics,
    exact_matches,
    is_label_like,
    mean_nll,
    normalize_answer,
    perplexity,
    task_metrics,
    text_metrics,
)
from adapters.evaluation.rows import to_examples


@pytest.mark.parametrize(
    ("raw", "norm"),
    [("  Card_Arrival. ", "card_arrival"), ("Yes!!", "yes"), ("a  b\n c", "a b c"), ("'quoted'", "'quoted"),
     ("3.5", "3.5"), ("card arrival?", "card arrival")],
)
def test_normalize_answer(raw: str, norm: str) -> None:
    assert normalize_answer(raw) == norm


def test_exact_match_normalises_but_keeps_underscores() -> None:
    assert exact_matches(["card_arrival", "Yes"], ["Card_Arrival.", "yes "]) == [True, True]
    assert exact_matches(["card_arrival"], ["card arrival"]) == [False]
    with pytest.raises(ValueError, match="same|answers"):
        exact_matches(["a"], ["a", "b"])


def test_label_like_threshold() -> None:
    assert is_label_like(["a", "b"] * 5)  # 2 distinct <= 0.2 * 10
    assert is_label_like(["a", "b", "c"] * 3)  # 3 > 0.2 * 9, but short names with 1/3 distinct
    assert not is_label_like(["one two three four", "five six seven eight", "nine ten eleven twelve"] * 3)
    assert not is_label_like(["x"])
    many_classes = [f"intent_{i % 77}" for i in range(300)]  # Banking77-like: 77 names over 300 rows
    assert is_label_like(many_classes)
    assert not is_label_like([f"intent_{i}" for i in range(300)])  # every answer different: not classes
    prose = [f"the answer is number {i % 77} of many" for i in range(300)]
    assert not is_label_like(prose)  # long answers with 26 % distinct stay free text


def test_classification_metrics_known_values() -> None:
    expected = ["a", "a", "a", "b", "b", "c"]
    produced = ["a", "a", "b", "b", "zzz", "c"]
    m = classification_metrics(expected, produced)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # precision: a=2/2, b=1/2, c=1/1 ; recall: a=2/3, b=1/2, c=1/1 ("zzz" is not a column)
    assert m["macro_precision"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["macro_recall"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    f = [2 * 1 * (2 / 3) / (1 + 2 / 3), 0.5, 1.0]
    assert m["macro_f1"] == pytest.approx(sum(f) / 3)


def test_text_metrics_perfect_and_disjoint() -> None:
    refs = ["the cat sat on the mat", "a quick brown fox jumps"]
    perfect = text_metrics(refs, refs)
    assert perfect["bleu"] == pytest.approx(100.0)
    assert perfect["chrf"] == pytest.approx(100.0)
    assert perfect["rouge_l"] == pytest.approx(1.0)
    bad = text_metrics(refs, ["zzz qqq", "vvv www"])
    assert bad["bleu"] == pytest.approx(0.0) and bad["rouge_l"] == pytest.approx(0.0)
    assert bad["chrf"] < 5.0
    half = text_metrics(["the cat sat"], ["the cat"])
    assert half["rouge_l"] == pytest.approx(2 * 1.0 * (2 / 3) / (1 + 2 / 3))  # P=1, R=2/3


def test_nll_and_perplexity() -> None:
    assert mean_nll([1.0, 3.0, float("nan")]) == pytest.approx(2.0)
    assert mean_nll([]) is None
    assert perplexity(2.0) == pytest.approx(math.e**2)


def test_task_metrics_label_vs_free_text() -> None:
    lab = task_metrics(["a", "b"] * 5, ["a"] * 10, [0.5] * 10, label_like=True)
    assert lab.accuracy == pytest.approx(0.5) and lab.macro_f1 is not None
    assert lab.perplexity == pytest.approx(math.exp(0.5))
    free = task_metrics(["x y"], ["x y"], None, label_like=False)
    assert free.macro_f1 is None and free.mean_nll is None and free.chrf == pytest.approx(100.0)


def test_error_analysis() -> None:
    expected = ["a", "a", "a", "b", "b", "c"]
    produced = ["b", "b", "a", "c", "b", "c"]
    conf = top_confusions(expected, produced)
    assert [(c.expected, c.produced, c.count) for c in conf] == [("a", "b", 2), ("b", "c", 1)]
    pc = per_class_accuracy(expected, produced)
    assert [(c.label, c.support, c.correct) for c in pc] == [("a", 3, 1), ("b", 2, 1), ("c", 1, 1)]
    assert pc[0].accuracy == pytest.approx(1 / 3)
    worst = worst_examples(["q"] * 6, expected, produced, [0.1, 0.9, 5.0, 0.3, 0.2, 7.0], k=3)
    # wrong rows first (0, 1, 3), highest NLL first among them
    assert [w.index for w in worst] == [1, 3, 0]
    assert not any(w.correct for w in worst)
    free = analyse_errors(["q"] * 6, expected, produced, None, label_like=False)
    assert free.confusions == [] and free.per_class == [] and len(free.worst) == 6


def test_rows_parsing() -> None:
    rows = [
        {"kind": "sft", "prompt": [{"role": "user", "content": "hi"}], "completion": "yo", "attributes": {"s": "a"}},
        {"prompt": "plain", "completion": "x"},
        {"kind": "dpo", "prompt": "p", "chosen": "a", "rejected": "b"},
    ]
    ex, skipped = to_examples(rows)
    assert skipped == 1 and len(ex) == 2
    assert ex[0].prompt_text == "hi" and ex[0].attributes == {"s": "a"}
    assert ex[1].prompt == [{"role": "user", "content": "plain"}]
    with pytest.raises(ValueError, match="row 0: field 'completion'"):
        to_examples([{"prompt": "p", "completion": 3}])
