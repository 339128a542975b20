"""Fairness suite: does a model serve every group of users equally well?

For every row attribute with bounded cardinality (2..``max_groups`` distinct scalar values) we
report per-group accuracy, selection rate and mean per-row score, plus demographic parity
difference (DPD) and equalized odds difference (EOD), for candidate and reference. The numbers
come from ``monitoring.fairness.group_report`` (fairlearn ``MetricFrame``), the same code that
watches live traffic, so offline and online fairness mean the same thing:

* label-like tasks: y_true / y_pred are the normalised expected / produced labels. Multiclass:
  "selection" is being served a correct answer (DPD = accuracy gap) and EOD is the worst
  one-vs-rest class gap; binary tasks with ``positive_label``: the textbook definitions.
* free text: y_true = 1, y_pred = "sentence chrF >= 0.5", so DPD is the gap in the share of good
  answers; the per-row score (chrF, or exact match for labels) is the group's mean rating.

Gaps only count groups with at least ``min_group_size`` rows (small groups are listed, not gapped).
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
    in_gaps: bool = True  # False: too few rows to count towards the gaps


@dataclass(frozen=True)
class AttributeFairness:
    attribute: str
    groups: list[GroupStats] = field(default_factory=list)
    demographic_parity_difference: float | None = None
    equalized_odds_difference: float | None = None
    equalized_odds_worst_class: str | None = None

    @property
    def max_gap(self) -> float | None:
        gaps = [g for g in (self.demographic_parity_difference, self.equalized_odds_difference)
                if g is not None and math.isfinite(g)]
        return max(gaps) if gaps else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_gap": self.max_gap}


def bounded_attributes(attributes: Sequence[Mapping[str, Any]], max_groups: int = DEFAULT_MAX_GROUPS) -> list[str]:
    """Attribute keys with scalar values and 2..max_groups distinct values (sorted).

    A key with one value cannot show a gap; one with many values is an identifier, not a group —
    so is one with more distinct values than half the rows (groups of about one row). Keys holding
    lists/objects/floats anywhere are not group labels and are left out.
    """
    from monitoring.fairness import bounded_attributes as bounded_columns

    keys: set[str] = set()
    bad: set[str] = set()
    for attrs in attributes:
        for k, v in attrs.items():
            if v is None:
                continue
            (keys if isinstance(v, (str, int, bool)) and not isinstance(v, float) else bad).add(k)
    candidates = sorted(keys - bad)
    if not candidates:
        return []
    df = fairness_frame(attributes, [], [], [], candidates, with_outcomes=False)
    limit = max(2, min(max_groups, len(attributes) // 2))
    return sorted(bounded_columns(df, candidates, limit))


def fairness_frame(
    attributes: Sequence[Mapping[str, Any]],
    y_true: Sequence[Any],
    y_pred: Sequence[Any],
    rating: Sequence[float],
    keys: Sequence[str],
    *,
    with_outcomes: bool = True,
) -> Any:
    """One row per example: the attribute columns (missing -> None) plus y_true, y_pred, rating."""
    import pandas as pd

    data: dict[str, Any] = {k: [None if a.get(k) is None else str(a.get(k)) for a in attributes] for k in keys}
    if with_outcomes:
        data.update({"y_true": list(y_true), "y_pred": list(y_pred), "rating": list(rating)})
    return pd.DataFrame(data)


def attribute_report(
    df: Any,
    attribute: str,
    max_groups: int = DEFAULT_MAX_GROUPS,
    pos_label: Any = None,
    min_group_size: int = 20,
) -> AttributeFairness:
    """Group statistics and gaps for one attribute (``monitoring.fairness.group_report``)."""
    from monitoring.fairness import group_report

    raw = group_report(df, attribute, "y_true", "y_pred", "rating", max_groups,
                       pos_label=pos_label, min_group_size=min_group_size)
    return _from_report(attribute, raw)


def _from_report(attribute: str, raw: Mapping[str, Any]) -> AttributeFairness:
    gaps = raw.get("gaps", {})
    groups = [
        GroupStats(
            group=str(g.get("group")),
            count=int(g.get("count", 0)),
            accuracy=_num(g.get("accuracy")),
            selection_rate=_num(g.get("selection_rate")),
            mean_rating=_num(g.get("mean_rating")),
            in_gaps=bool(g.get("in_gaps", True)),
        )
        for g in raw.get("groups", [])
    ]
    worst = gaps.get("equalized_odds_worst_class")
    return AttributeFairness(
        attribute=attribute,
        groups=sorted(groups, key=lambda g: g.group),
        demographic_parity_difference=_num(gaps.get("demographic_parity_difference")),
        equalized_odds_difference=_num(gaps.get("equalized_odds_difference")),
        equalized_odds_worst_class=str(worst) if worst is not None else None,
    )


def _num(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None
