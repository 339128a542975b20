"""Fairness report with fairlearn on constructed data where one group is served worse."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import demographic_parity_difference

from monitoring.fairness import OTHER, bounded_attributes, group_report

CLASSES = ["card_arrival", "lost_card", "exchange_rate", "top_up", "transfer"]


def served(
    n: int, seed: int, locale_accuracy: dict[str, float], locale_rating: dict[str, float]
) -> pd.DataFrame:
    """Intent predictions and ratings; each locale gets its own accuracy and thumbs-up rate."""
    rng = np.random.default_rng(seed)
    locales = rng.choice(list(locale_accuracy), size=n)
    y_true = rng.choice(CLASSES, size=n)
    correct = rng.random(n) < np.array([locale_accuracy[x] for x in locales])
    wrong = np.array([CLASSES[(CLASSES.index(t) + 1 + rng.integers(4)) % 5] for t in y_true])
    y_pred = np.where(correct, y_true, wrong)
    rating = (rng.random(n) < np.array([locale_rating[x] for x in locales])).astype(float)
    rating[rng.random(n) < 0.3] = np.nan  # not every completion gets feedback
    return pd.DataFrame(
        {
            "locale": locales,
            "y_true": y_true,
            "y_pred": y_pred,
            "rating": rating,
            "user": [f"u{i}" for i in range(n)],
        }
    )


def test_gap_detected_when_one_group_is_served_worse() -> None:
    df = served(6000, 1, {"en": 0.9, "de": 0.9, "fr": 0.6}, {"en": 0.8, "de": 0.8, "fr": 0.5})
    rep = group_report(df, "locale", y_true="y_true", y_pred="y_pred", rating="rating")
    json.dumps(rep, allow_nan=False)
    by = {g["group"]: g for g in rep["groups"]}
    assert by["fr"]["accuracy"] == pytest.approx(0.6, abs=0.04)
    assert by["en"]["accuracy"] == pytest.approx(0.9, abs=0.03)
    gaps = rep["gaps"]
    assert gaps["label_kind"] == "multiclass"
    assert gaps["demographic_parity_difference"] == pytest.approx(0.3, abs=0.05)
    assert gaps["accuracy_gap"] == pytest.approx(gaps["demographic_parity_difference"])  # outcome = correct
    assert gaps["equalized_odds_difference"] > 0.2 and gaps["equalized_odds_worst_class"] in CLASSES
    assert gaps["rating_gap"] == pytest.approx(0.3, abs=0.05) and gaps["lowest_rated_group"] == "fr"
    assert gaps["positive_feedback_parity_difference"] == pytest.approx(gaps["rating_gap"])  # 0/1 ratings
    assert by["fr"]["positive_feedback_rate"] == pytest.approx(by["fr"]["mean_rating"])
    assert sum(g["count"] for g in rep["groups"]) == 6000
    assert by["fr"]["rated"] < by["fr"]["count"]


def test_no_gap_when_groups_are_served_alike() -> None:
    df = served(6000, 2, {"en": 0.85, "de": 0.85, "fr": 0.85}, {"en": 0.7, "de": 0.7, "fr": 0.7})
    gaps = group_report(df, "locale", y_true="y_true", y_pred="y_pred", rating="rating")["gaps"]
    assert gaps["demographic_parity_difference"] < 0.05
    assert gaps["rating_gap"] < 0.06
    assert gaps["equalized_odds_difference"] < 0.1


def test_binary_labels_use_fairlearn_definitions() -> None:
    rng = np.random.default_rng(3)
    n = 4000
    group = rng.choice(["a", "b"], size=n)
    y_true = rng.integers(0, 2, n)
    # group b gets the positive decision far less often, whatever the truth
    y_pred = np.where(group == "a", y_true, y_true & (rng.random(n) < 0.5)).astype(int)
    df = pd.DataFrame({"g": group, "t": y_true, "p": y_pred})
    gaps = group_report(df, "g", y_true="t", y_pred="p")["gaps"]
    assert gaps["label_kind"] == "binary" and gaps["pos_label"] == "1"
    expected = demographic_parity_difference(y_true, y_pred, sensitive_features=group)
    assert gaps["demographic_parity_difference"] == pytest.approx(expected)
    assert gaps["equalized_odds_difference"] == pytest.approx(0.5, abs=0.05)  # TPR 1.0 vs 0.5


def test_ratings_only_and_small_groups_left_out_of_gaps() -> None:
    df = served(3000, 4, {"en": 0.9, "de": 0.9}, {"en": 0.8, "de": 0.78})
    tiny = pd.DataFrame({"locale": ["xx"] * 5, "rating": [0.0] * 5})  # a 5-row group rated 0
    rep = group_report(pd.concat([df, tiny], ignore_index=True), "locale", rating="rating", min_group_size=20)
    by = {g["group"]: g for g in rep["groups"]}
    assert by["xx"]["in_gaps"] is False and by["xx"]["mean_rating"] == 0.0
    assert rep["gaps"]["rating_gap"] < 0.1  # the tiny group would have made it ~0.8
    assert "accuracy" not in by["en"] and "demographic_parity_difference" not in rep["gaps"]


def test_max_groups_folds_the_tail_and_bounded_attributes() -> None:
    rng = np.random.default_rng(5)
    df = pd.DataFrame(
        {
            "city": [f"c{int(x)}" for x in rng.zipf(1.5, 2000) % 60],
            "segment": rng.choice(["retail", "business"], 2000),
            "constant": "x",
            "rating": rng.random(2000),
        }
    )
    df.loc[:10, "segment"] = None
    rep = group_report(df, "city", rating="rating", max_groups=5)
    assert len(rep["groups"]) == 5 and OTHER in {g["group"] for g in rep["groups"]}
    seg = {g["group"] for g in group_report(df, "segment", rating="rating")["groups"]}
    assert seg == {"retail", "business", "(missing)"}
    df["user"] = [f"u{i}" for i in range(2000)]
    assert bounded_attributes(df, ["city", "segment", "constant", "user", "absent"], max_cardinality=20) == [
        "segment"
    ]
    with pytest.raises(ValueError, match="attribute"):
        group_report(df, "nope", rating="rating")


def test_monitor_fairness_reports_from_feedback_rows() -> None:
    """The monitor's blocking half (run in a thread): (output, attributes, rating, correction) rows to a report
    per attribute, with labels from corrections and confirmed answers."""
    from service.core.monitor import fairness_reports

    rows = []
    for i in range(80):
        segment = "voice" if i % 2 else "web"
        right = i % 4 != 1 if segment == "voice" else True  # voice: half wrong, web: all right
        rows.append(("card_arrival", {"segment": segment, "request_id": f"r{i}"},
                     1.0 if right else 0.0, None if right else "lost_card"))
    reports = fairness_reports(rows)
    assert reports is not None and set(reports) == {"segment"}  # request_id is unbounded: not an attribute
    groups = {g["group"]: g for g in reports["segment"]["groups"]}
    assert groups["web"]["accuracy"] == 1.0 and groups["voice"]["accuracy"] == 0.5
    assert groups["web"]["mean_rating"] == 1.0 and groups["voice"]["mean_rating"] == 0.5
    assert fairness_reports([(o, {}, r, c) for o, _, r, c in rows]) is None  # no attributes, no report
