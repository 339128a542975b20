"""Drift between a reference window and the current window of traffic, computed with evidently 0.7.

The monitor loop builds two DataFrames (``traffic_frame`` turns logged completions into one),
calls ``compute_drift`` outside the request path and exports the numbers to Prometheus itself
(evidently 0.7 has no Prometheus exporter).

Why the methods are fixed per column kind
-----------------------------------------
evidently's automatic choice switches from p-value tests to distances at 1,000 rows, so the same
shift would flip "drifted" when traffic grows. We name the method for every column:

* numerical (lengths, rating): ``wasserstein`` = Wasserstein-1 distance divided by the reference
  std; drift when >= 0.1 (a tenth of a standard deviation of mass moved). A distance, not a
  p-value, so a huge sample does not make a negligible shift "significant".
* categorical (answer label, empty/refusal flag, attribute columns): ``jensenshannon`` distance
  (base e, in [0, 0.83]); drift when >= 0.1.
* text (the raw prompt): evidently's domain classifier (``abs_text_content_drift``): a TF-IDF +
  linear model is trained to tell reference from current prompts; drift when its ROC AUC on a
  held-out half exceeds the threshold. No NLTK data and no network are needed. The AUC of a
  classifier that can tell nothing is 0.5 +/- sqrt((n0 + n1 + 1) / (12 n0 n1)) (Mann-Whitney), so
  the threshold used is ``max(text_threshold, 0.5 + 3 * that sd)``: small windows do not raise
  alarms on noise, large windows use the configured AUC. Text is subsampled to ``text_max_rows``
  rows per side (seeded) because the classifier dominates the run time (see benchmarks/drift.py).
  Its vectorizer drops words in more than half of the pooled prompts (``max_df=0.5``, fixed in
  evidently), so a word added to every current prompt (a new prompt template) is invisible to it.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

os.environ.setdefault("DO_NOT_TRACK", "1")  # evidently telemetry off; must be set before import

__all__ = [
    "DriftResult",
    "DriftSpec",
    "FeatureDrift",
    "compute_drift",
    "is_empty_or_refusal",
    "traffic_frame",
]

NUM_METHODS = ("wasserstein", "ks", "psi", "jensenshannon", "hellinger", "energy")
CAT_METHODS = ("jensenshannon", "chisquare", "psi", "hellinger", "tvd", "z")
TEXT_METHODS = ("abs_text_content_drift", "perc_text_content_drift")
# Methods whose score is a p-value (drift when score < threshold); the rest are distances/AUCs.
_PVALUE_METHODS = {"ks", "chisquare", "z"}

_REFUSAL = re.compile(
    r"^\s*(i'?m sorry|i am sorry|sorry,? (but )?i|i can(no|')t|i cannot|i am unable|i'm unable|"
    r"as an ai|i (do not|don't) have (access|the ability))",
    re.IGNORECASE,
)


def is_empty_or_refusal(text: str | None) -> bool:
    """True for an empty answer or one that opens with a stock refusal (English heuristics)."""
    return text is None or not str(text).strip() or bool(_REFUSAL.match(str(text)))


def traffic_frame(records: Iterable[Mapping[str, Any]], attribute_keys: Sequence[str] = ()) -> pd.DataFrame:
    """Logged completions -> the frame ``DriftSpec.default`` expects.

    Each record may carry ``prompt``, ``output``, ``rating`` (None without feedback), ``label``
    (the answer's class, when the application has one) and ``attributes`` (a dict of bounded group
    labels). Lengths are in characters (no tokenizer needed). Attributes become ``attr_<key>``.
    """
    rows = []
    for r in records:
        prompt = str(r.get("prompt") or "")
        output = r.get("output")
        attrs = r.get("attributes") or {}
        row: dict[str, Any] = {
            "prompt": prompt,
            "prompt_length": len(prompt),
            "answer_length": len(output or ""),
            "rating": float(r["rating"]) if r.get("rating") is not None else math.nan,
            "answer_label": str(r["label"]) if r.get("label") is not None else "(none)",
            "empty_or_refusal": "yes" if is_empty_or_refusal(output) else "no",
        }
        for k in attribute_keys:
            v = attrs.get(k)
            row[f"attr_{k}"] = str(v) if v is not None else "(missing)"
        rows.append(row)
    cols = [
        "prompt",
        "prompt_length",
        "answer_length",
        "rating",
        "answer_label",
        "empty_or_refusal",
        *[f"attr_{k}" for k in attribute_keys],
    ]
    return pd.DataFrame(rows, columns=cols)


@dataclass(frozen=True)
class DriftSpec:
    """Which columns to check and how. Thresholds are per column kind (see the module docstring)."""

    numerical: tuple[str, ...] = ("prompt_length", "answer_length", "rating")
    categorical: tuple[str, ...] = ("answer_label", "empty_or_refusal")
    text: tuple[str, ...] = ("prompt",)
    num_method: str = "wasserstein"
    num_threshold: float = 0.1
    cat_method: str = "jensenshannon"
    cat_threshold: float = 0.1
    text_method: str = "abs_text_content_drift"
    text_threshold: float = 0.55
    text_max_rows: int = 5000
    drift_share: float = 0.5
    min_rows: int = 30
    render_html: bool = False
    seed: int = 0

    @classmethod
    def default(cls, attribute_keys: Sequence[str] = (), **overrides: Any) -> DriftSpec:
        """The spec for ``traffic_frame`` output, with ``attr_<key>`` as categorical columns."""
        base = cls()
        cat = base.categorical + tuple(f"attr_{k}" for k in attribute_keys)
        return cls(**{"categorical": cat, **overrides})

    def __post_init__(self) -> None:
        for name in ("numerical", "categorical", "text"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        cols = self.numerical + self.categorical + self.text
        if not cols:
            raise ValueError("drift_spec: at least one of numerical, categorical, text must name a column")
        if len(set(cols)) != len(cols):
            raise ValueError(f"drift_spec: a column may appear in one kind only, got {list(cols)}")
        for name, value, allowed in (
            ("num_method", self.num_method, NUM_METHODS),
            ("cat_method", self.cat_method, CAT_METHODS),
            ("text_method", self.text_method, TEXT_METHODS),
        ):
            if value not in allowed:
                raise ValueError(f"drift_spec.{name} must be one of {allowed}, got {value!r}")
        for name in ("num_threshold", "cat_threshold"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"drift_spec.{name} must be > 0, got {v}")
        if not 0.5 <= self.text_threshold < 1:
            raise ValueError(f"drift_spec.text_threshold must be in [0.5, 1), got {self.text_threshold}")
        if self.text_max_rows < 100:
            raise ValueError(f"drift_spec.text_max_rows must be >= 100, got {self.text_max_rows}")
        if not 0 < self.drift_share <= 1:
            raise ValueError(f"drift_spec.drift_share must be in (0, 1], got {self.drift_share}")
        if self.min_rows < 2:
            raise ValueError(f"drift_spec.min_rows must be >= 2, got {self.min_rows}")


@dataclass(frozen=True)
class FeatureDrift:
    feature: str
    kind: str  # numerical | categorical | text
    method: str
    score: float | None  # None: too few non-missing rows in one of the windows
    threshold: float
    drifted: bool


@dataclass(frozen=True)
class DriftResult:
    features: list[FeatureDrift]
    share: float  # drifted / checked features
    drifted: bool  # share >= spec.drift_share
    html: str | None = None
    reference_rows: int = 0
    current_rows: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "features": [f.__dict__ for f in self.features],
            "share": self.share,
            "drifted": self.drifted,
            "reference_rows": self.reference_rows,
            "current_rows": self.current_rows,
        }


def _null_auc_sd(n_ref: int, n_cur: int) -> float:
    """SD of a no-skill ROC AUC on evidently's 50% held-out split (Mann-Whitney null variance)."""
    n0, n1 = max(n_ref // 2, 1), max(n_cur // 2, 1)
    return math.sqrt((n0 + n1 + 1) / (12.0 * n0 * n1))


def _text_sample(s: pd.Series, cap: int, seed: int) -> pd.Series:
    s = s.dropna().astype(str)
    s = s[s.str.strip() != ""]
    return s.sample(n=cap, random_state=seed) if len(s) > cap else s


def compute_drift(
    reference: pd.DataFrame, current: pd.DataFrame, spec: DriftSpec | None = None
) -> DriftResult:
    """Per-column drift of ``current`` against ``reference`` with evidently's ``ValueDrift``.

    Columns with fewer than ``spec.min_rows`` non-missing values in either window (e.g. ratings
    before feedback arrives) are reported with ``score=None`` and are not counted in ``share``.
    """
    spec = spec or DriftSpec()
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift

    if reference.empty or current.empty:
        raise ValueError("reference and current must both have rows")
    kinds = {
        **{c: "numerical" for c in spec.numerical},
        **{c: "categorical" for c in spec.categorical},
        **{c: "text" for c in spec.text},
    }
    for frame, name in ((reference, "reference"), (current, "current")):
        missing = [c for c in kinds if c not in frame.columns]
        if missing:
            raise ValueError(f"{name} is missing columns {missing}")

    reference = reference.reset_index(drop=True)
    current = current.reset_index(drop=True)
    ref = pd.DataFrame(index=reference.index)
    cur = pd.DataFrame(index=current.index)
    for c, kind in kinds.items():
        if kind == "numerical":
            ref[c] = pd.to_numeric(reference[c], errors="coerce").astype(float)
            cur[c] = pd.to_numeric(current[c], errors="coerce").astype(float)
        elif kind == "categorical":
            ref[c] = reference[c].astype("string").fillna("(missing)").astype(str)
            cur[c] = current[c].astype("string").fillna("(missing)").astype(str)

    methods = {
        "numerical": (spec.num_method, spec.num_threshold),
        "categorical": (spec.cat_method, spec.cat_threshold),
    }
    results: dict[str, FeatureDrift] = {}
    planned: list[tuple[str, str, str, float]] = []  # column, kind, method, threshold
    for c, kind in kinds.items():
        if kind == "text":
            continue
        n_ref, n_cur = int(ref[c].notna().sum()), int(cur[c].notna().sum())
        method, thr = methods[kind]
        if min(n_ref, n_cur) < spec.min_rows:
            results[c] = FeatureDrift(c, kind, method, None, thr, False)
        else:
            planned.append((c, kind, method, thr))

    # Text columns: subsample (seeded) and blank the other rows; evidently drops missing values
    # per column, so one report (and one HTML page) covers every column.
    for c in spec.text:
        r_txt = _text_sample(reference[c], spec.text_max_rows, spec.seed)
        c_txt = _text_sample(current[c], spec.text_max_rows, spec.seed + 1)
        if min(len(r_txt), len(c_txt)) < spec.min_rows:
            results[c] = FeatureDrift(c, "text", spec.text_method, None, spec.text_threshold, False)
            continue
        thr = spec.text_threshold
        if spec.text_method == "abs_text_content_drift":
            thr = min(max(thr, 0.5 + 3.0 * _null_auc_sd(len(r_txt), len(c_txt))), 0.99)
        ref[c] = pd.Series(r_txt, dtype=object).reindex(ref.index)
        cur[c] = pd.Series(c_txt, dtype=object).reindex(cur.index)
        planned.append((c, "text", spec.text_method, thr))

    used = [c for c, _, _, _ in planned]
    data_def = DataDefinition(
        numerical_columns=[c for c, k, _, _ in planned if k == "numerical"],
        categorical_columns=[c for c, k, _, _ in planned if k == "categorical"],
        text_columns=[c for c, k, _, _ in planned if k == "text"],
    )
    snapshot = None
    if planned:
        report = Report(
            [ValueDrift(column=c, method=m, threshold=t) for c, _, m, t in planned], include_tests=True
        )
        snapshot = report.run(
            Dataset.from_pandas(cur[used], data_definition=data_def),
            Dataset.from_pandas(ref[used], data_definition=data_def),
        )
    snapshots = [snapshot] if snapshot is not None else []

    by_column: dict[str, tuple[float, bool | None]] = {}
    for snap in snapshots:
        d = snap.dict()
        status = {t["metric_config"]["metric_id"]: t["status"] for t in d["tests"]}
        for m in d["metrics"]:
            col = m["config"]["column"]
            st = status.get(m["id"])
            by_column[col] = (float(m["value"]), None if st is None else st == "FAIL")

    for c, kind, method, thr in planned:
        score, failed = by_column[c]
        if failed is None:  # no test result: apply the method's own rule
            failed = score < thr if method in _PVALUE_METHODS else score >= thr
        results[c] = FeatureDrift(c, kind, method, score, thr, bool(failed))

    features = [results[c] for c in kinds]
    checked = [f for f in features if f.score is not None]
    share = sum(f.drifted for f in checked) / len(checked) if checked else 0.0
    html = None
    if spec.render_html and snapshots:
        html = snapshots[0].get_html_str(as_iframe=False)
    return DriftResult(
        features, share, bool(checked) and share >= spec.drift_share, html, len(reference), len(current)
    )
