"""Fairness suite: does a model serve every group of users equally well?

For every row attribute with bounded cardinality (2..``max_groups`` distinct scalar values) we
report per-group accuracy, selection rate and mean per-row score, plus demographic parity
difference (DPD) and equalized odds difference (EOD) from fairlearn, for candidate and reference.

What is "selected" depends on the task:

* binary label tasks (exactly two expected labels, or ``positive_label`` given): y_true / y_pred are
  "expected / produced answer is the positive label" — the textbook setting;
* other tasks: y_true = 1 for every row and y_pred = "the answer was right", so selection rate is the
  group's accuracy, DPD is the accuracy gap between groups and EOD reduces to the same gap of true
  positive rates (there are no negatives). For free text, "right" means sentence chrF ≥ 0.5.

The group statistics come from ``monitoring.fairness.group_report`` (the service's one fairlearn
wrapper, shared with live monitoring); ``_fallback_group_report`` mirrors its contract for
environments where that module is absent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_MAX_GROUPS = 20


@dataclass(frozen=True)
class GroupStats:
    group: str
    count: int
    accuracy: float | None
    selection_rate: float | None
    mean_rating: float | None


@dataclass(frozen=True)
class AttributeFairness:
    attribute: str
    groups: list[GroupStats] = field(default_factory=list)
    demographic_parity_difference: float | None = None
    equalized_odds_difference: float | None = None

    @property
    def max_gap(self) -> float | None:
        gaps = [g for g in (self.demographic_parity_difference, self.equalized_odds_difference)
                if g is not None and math.isfinite(g)]
        return max(gaps) if gaps else None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bounded_attributes(attributes: Sequence[Mapping[str, Any]], max_groups: int = DEFAULT_MAX_GROUPS) -> list[str]:
    """Attribute keys whose values are scalars with 2..max_groups distinct values (sorted keys).

    A key with one value cannot show a gap; one with many values is an identifier, not a group,
    and must not become a metric label.
    """
    values: dict[str, set[Any]] = {}
    bad: set[str] = set()
    for attrs in attributes:
        for k, v in attrs.items():
            if v is None:
                continue
            if not isinstance(v, (str, int, bool)) or isinstance(v, float):
                bad.add(k)
                continue
            values.setdefault(k, set()).add(str(v))
    return sorted(k for k, vs in values.items() if k not in bad and 2 <= len(vs) <= max_groups)


def fairness_frame(
    attributes: Sequence[Mapping[str, Any]],
    y_true: Sequence[int],
    y_pred: Sequence[int],
    rating: Sequence[float],
    keys: Sequence[str],
) -> Any:
    import pandas as pd

    data: dict[str, Any] = {k: [str(a.get(k)) if a.get(k) is not None else "(missing)" for a in attributes]
                            for k in keys}
    data.update({"y_true": list(y_true), "y_pred": list(y_pred), "rating": list(rating)})
    return pd.DataFrame(data)


def attribute_report(df: Any, attribute: str, max_groups: int = DEFAULT_MAX_GROUPS) -> AttributeFairness:
    """Group report for one attribute via monitoring.fairness (or the local fallback)."""
    try:
        from monitoring.fairness import group_report  # type: ignore[import-not-found]
    except ImportError:
        group_report = _fallback_group_report
    raw = group_report(df, attribute, "y_true", "y_pred", "rating", max_groups)
    return _from_report(attribute, raw)


def _from_report(attribute: str, raw: Mapping[str, Any]) -> AttributeFairness:
    groups_raw = raw.get("groups", [])
    if isinstance(groups_raw, Mapping):  # {"group": {...}} shape
        groups_raw = [{"group": g, **v} for g, v in groups_raw.items()]
    groups = [
        GroupStats(
            group=str(g.get("group")),
            count=int(g.get("count", g.get("n", 0))),
            accuracy=_num(g.get("accuracy")),
            selection_rate=_num(g.get("selection_rate")),
            mean_rating=_num(g.get("mean_rating", g.get("rating"))),
        )
        for g in groups_raw
    ]
    return AttributeFairness(
        attribute=attribute,
        groups=sorted(groups, key=lambda g: g.group),
        demographic_parity_difference=_num(raw.get("demographic_parity_difference")),
        equalized_odds_difference=_num(raw.get("equalized_odds_difference")),
    )


def _fallback_group_report(
    df: Any, attribute: str, y_true: str, y_pred: str, rating: str | None, max_groups: int
) -> dict[str, Any]:
    """fairlearn MetricFrame over one attribute; rare groups beyond ``max_groups`` pooled as "other"."""
    import numpy as np
    from fairlearn.metrics import (
        MetricFrame,
        count,
        demographic_parity_difference,
        equalized_odds_difference,
        selection_rate,
    )
    from sklearn.metrics import accuracy_score

    sf = df[attribute].astype(str)
    top = sf.value_counts().index[:max_groups]
    sf = sf.where(sf.isin(top), "other")
    yt, yp = df[y_true].to_numpy(), df[y_pred].to_numpy()
    metrics: dict[str, Any] = {"count": count, "accuracy": accuracy_score, "selection_rate": selection_rate}
    frame = MetricFrame(metrics=metrics, y_true=yt, y_pred=yp, sensitive_features=sf)
    by = frame.by_group
    ratings = df.groupby(sf)[rating].mean() if rating else None
    groups = [
        {
            "group": str(g),
            "count": int(by.loc[g, "count"]),
            "accuracy": float(by.loc[g, "accuracy"]),
            "selection_rate": float(by.loc[g, "selection_rate"]),
            "mean_rating": float(ratings.loc[g]) if ratings is not None else None,
        }
        for g in by.index
    ]
    with np.errstate(all="ignore"):
        dpd = float(demographic_parity_difference(yt, yp, sensitive_features=sf))
        eod = float(equalized_odds_difference(yt, yp, sensitive_features=sf))
    return {"attribute": attribute, "groups": groups,
            "demographic_parity_difference": dpd, "equalized_odds_difference": eod}


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None
