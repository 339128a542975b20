"""Per-group quality and fairness gaps with fairlearn's ``MetricFrame``.

Used by offline evaluation (candidate vs production on a labelled set) and by the periodic traffic
monitor (ratings only). Groups come from bounded attributes (``segment``, ``locale``...), never
from free text: ``bounded_attributes`` picks the keys that are safe to group by.

Definitions
-----------
* **outcome** (what "selection" means here): for *binary* labels, ``y_pred == pos_label`` (the
  usual demographic-parity reading: who gets the positive decision); for *multiclass* labels
  (intent classification, Banking77), ``y_pred == y_true``: the "selection" is being served a
  correct answer. ``selection_rate`` and ``demographic_parity_difference`` use this outcome.
* **equalized_odds_difference**: binary labels: fairlearn's, on ``(y_true == pos, y_pred == pos)``.
  Multiclass: one-vs-rest per class, the worst class (largest gap in true- or false-positive
  rate between groups), over classes with at least ``min_group_size`` rows in every group
  (rarer classes only add noise). The class that gives the worst gap is reported.
* **positive feedback**: ``rating >= 0.5``; ``positive_feedback_parity_difference`` is the
  demographic-parity difference of that outcome over rated rows.
* **rating_gap**: max - min of the per-group mean rating.

Gaps are computed over groups with at least ``min_group_size`` rows for that metric (small groups
are still listed, flagged ``in_gaps: false``), so one user in a rare locale does not set an alarm.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from fairlearn.metrics import (
    MetricFrame,
    count,
    demographic_parity_difference,
    equalized_odds_difference,
    selection_rate,
)
from sklearn.metrics import accuracy_score

__all__ = ["MISSING", "OTHER", "bounded_attributes", "group_labels", "group_report"]

OTHER = "(other)"
MISSING = "(missing)"


def bounded_attributes(df: pd.DataFrame, keys: Sequence[str], max_cardinality: int = 20) -> list[str]:
    """The keys (columns of ``df``) with 2..``max_cardinality`` distinct non-missing values.

    One value gives no comparison; more than ``max_cardinality`` is an identifier or free text, not
    a group label, and would make per-group metrics (and Prometheus label sets) explode.
    """
    if max_cardinality < 2:
        raise ValueError(f"max_cardinality must be >= 2, got {max_cardinality}")
    out = []
    for k in keys:
        if k in df.columns:
            n = df[k].dropna().astype(str).nunique()
            if 2 <= n <= max_cardinality:
                out.append(k)
    return out


def group_labels(values: pd.Series, max_groups: int = 20) -> pd.Series:
    """String group labels: missing -> "(missing)"; beyond the ``max_groups - 1`` largest -> "(other)"."""
    if max_groups < 2:
        raise ValueError(f"max_groups must be >= 2, got {max_groups}")
    g = values.astype("string").fillna(MISSING).astype(str)
    counts = g.value_counts()
    if len(counts) > max_groups:
        keep = set(counts.index[: max_groups - 1])
        g = g.where(g.isin(keep), OTHER)
    return g


def _num(x: Any) -> float | None:
    if x is None:
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _gap(values: pd.Series) -> float | None:
    v = values.dropna()
    return float(v.max() - v.min()) if len(v) >= 2 else None


def _big_enough(groups: pd.Series, min_size: int) -> pd.Series:
    sizes = groups.map(groups.value_counts())
    return sizes >= min_size


def _label_metrics(
    y_true: pd.Series, y_pred: pd.Series, groups: pd.Series, pos_label: Any, min_group_size: int
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    classes = pd.unique(pd.concat([y_true, y_pred]).astype(str))
    yt, yp = y_true.astype(str), y_pred.astype(str)
    binary = len(classes) <= 2 and pos_label is not None
    if len(classes) <= 2 and pos_label is None and set(classes) <= {"0", "1", "True", "False", "0.0", "1.0"}:
        present = [c for c in ("1", "True", "1.0") if c in set(classes)]
        pos_label, binary = (present[0] if present else "1"), True
    pos = str(pos_label) if binary else None
    outcome = (yp == pos) if binary else (yp == yt)
    acc_frame = MetricFrame(
        metrics={"accuracy": accuracy_score, "labeled": count},
        y_true=yt.to_numpy(),
        y_pred=yp.to_numpy(),
        sensitive_features=groups.to_numpy(),
    )
    sel_frame = MetricFrame(
        metrics=selection_rate,
        y_true=outcome.to_numpy(),
        y_pred=outcome.to_numpy(),
        sensitive_features=groups.to_numpy(),
    )
    per_group: dict[str, dict[str, Any]] = {}
    for g in acc_frame.by_group.index:
        per_group[str(g)] = {
            "labeled": int(acc_frame.by_group.loc[g, "labeled"]),
            "accuracy": _num(acc_frame.by_group.loc[g, "accuracy"]),
            "selection_rate": _num(sel_frame.by_group.loc[g]),
        }

    keep = _big_enough(groups, min_group_size)
    summary: dict[str, Any] = {
        "label_kind": "binary" if binary else "multiclass",
        "pos_label": pos,
        "outcome": f"y_pred == {pos!r}" if binary else "y_pred == y_true",
    }
    if keep.sum() == 0 or groups[keep].nunique() < 2:
        summary.update(demographic_parity_difference=None, equalized_odds_difference=None, accuracy_gap=None)
        return per_group, summary
    g_k, o_k, yt_k, yp_k = groups[keep].to_numpy(), outcome[keep].to_numpy(), yt[keep], yp[keep]
    summary["demographic_parity_difference"] = _num(
        demographic_parity_difference(o_k, o_k, sensitive_features=g_k)
    )
    summary["accuracy_gap"] = _gap(
        acc_frame.by_group["accuracy"][[g for g in acc_frame.by_group.index if g in set(g_k)]]
    )
    if binary:
        summary["equalized_odds_difference"] = _num(
            equalized_odds_difference(
                (yt_k == pos).to_numpy(), (yp_k == pos).to_numpy(), sensitive_features=g_k
            )
        )
    else:
        worst, worst_class = None, None
        table = pd.crosstab(yt_k, g_k)
        for c in table.index[(table >= min_group_size).all(axis=1)]:
            eod = _num(
                equalized_odds_difference(
                    (yt_k == c).to_numpy(), (yp_k == c).to_numpy(), sensitive_features=g_k
                )
            )
            if eod is not None and (worst is None or eod > worst):
                worst, worst_class = eod, str(c)
        summary["equalized_odds_difference"] = worst
        summary["equalized_odds_worst_class"] = worst_class
    return per_group, summary


def _rating_metrics(
    rating: pd.Series, groups: pd.Series, min_group_size: int
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    r = pd.to_numeric(rating, errors="coerce")
    rated = r.notna()
    per_group: dict[str, dict[str, Any]] = {}
    if rated.sum() == 0:
        return per_group, {"rating_gap": None, "positive_feedback_parity_difference": None}
    r, g = r[rated], groups[rated]
    positive = (r >= 0.5).to_numpy()
    frame = MetricFrame(
        metrics={"mean_rating": lambda yt, yp: float(np.mean(yt)), "rated": count},
        y_true=r.to_numpy(),
        y_pred=r.to_numpy(),
        sensitive_features=g.to_numpy(),
    )
    pos_frame = MetricFrame(
        metrics=selection_rate, y_true=positive, y_pred=positive, sensitive_features=g.to_numpy()
    )
    for k in frame.by_group.index:
        per_group[str(k)] = {
            "rated": int(frame.by_group.loc[k, "rated"]),
            "mean_rating": _num(frame.by_group.loc[k, "mean_rating"]),
            "positive_feedback_rate": _num(pos_frame.by_group.loc[k]),
        }
    keep = _big_enough(g, min_group_size)
    big = set(g[keep])
    if len(big) < 2:
        return per_group, {"rating_gap": None, "positive_feedback_parity_difference": None}
    means = frame.by_group["mean_rating"][[k for k in frame.by_group.index if k in big]]
    return per_group, {
        "rating_gap": _gap(means),
        "lowest_rated_group": str(means.idxmin()),
        "positive_feedback_parity_difference": _num(
            demographic_parity_difference(
                positive[keep.to_numpy()], positive[keep.to_numpy()], sensitive_features=g[keep].to_numpy()
            )
        ),
    }


def group_report(
    df: pd.DataFrame,
    attribute: str,
    y_true: str | None = None,
    y_pred: str | None = None,
    rating: str | None = None,
    max_groups: int = 20,
    pos_label: Any = None,
    min_group_size: int = 20,
) -> dict[str, Any]:
    """Per-group count, accuracy, selection rate, mean rating, positive-feedback rate, and the gaps.

    ``y_true``/``y_pred`` (column names) enable the label metrics, ``rating`` the feedback metrics;
    rows with a missing label or rating are left out of those metrics only. ``pos_label`` marks the
    positive class of binary labels (0/1 and True/False are recognised without it). Returns a
    JSON-ready dict: ``{"attribute", "rows", "groups": [...], "gaps": {...}}``.
    """
    if attribute not in df.columns:
        raise ValueError(f"attribute {attribute!r} is not a column of df")
    for name, col in (("y_true", y_true), ("y_pred", y_pred), ("rating", rating)):
        if col is not None and col not in df.columns:
            raise ValueError(f"{name} column {col!r} is not in df")
    if (y_true is None) != (y_pred is None):
        raise ValueError("y_true and y_pred must be given together")
    if min_group_size < 1:
        raise ValueError(f"min_group_size must be >= 1, got {min_group_size}")
    groups = group_labels(df[attribute], max_groups)
    counts = groups.value_counts()
    rows: dict[str, dict[str, Any]] = {
        str(g): {"group": str(g), "count": int(n), "in_gaps": bool(n >= min_group_size)}
        for g, n in counts.items()
    }
    gaps: dict[str, Any] = {}
    if y_true is not None and y_pred is not None:
        labeled = df[y_true].notna() & df[y_pred].notna()
        if labeled.any():
            per, summary = _label_metrics(
                df.loc[labeled, y_true], df.loc[labeled, y_pred], groups[labeled], pos_label, min_group_size
            )
            for g, m in per.items():
                rows[g].update(m)
            gaps.update(summary)
    if rating is not None:
        per, summary = _rating_metrics(df[rating], groups, min_group_size)
        for g, m in per.items():
            rows[g].update(m)
        gaps.update(summary)
    return {
        "attribute": attribute,
        "rows": len(df),
        "min_group_size": min_group_size,
        "groups": sorted(rows.values(), key=lambda r: -r["count"]),
        "gaps": gaps,
    }
