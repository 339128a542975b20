"""A/B experiment statistics: assignment, SRM, anytime-valid comparisons, guardrails, decisions.

Pure functions over plain Python / numpy data: the service stores counts and ratings, calls
``decide`` on every look, and acts on the ``Decision``. Nothing here reads the DB or the env.

Why these choices
-----------------
* **Assignment** uses GrowthBook's hash v2 (FNV-1a 32-bit, hashed twice, 10,000 buckets), so a
  unit id lands in the same variant on every request and in every process, and the buckets agree
  with GrowthBook's own SDK test vectors.
* **Goal metric** (mean rating in [0, 1]) is compared with an *asymptotic confidence sequence*
  (Waudby-Smith, Arbour, Sinha, Kennedy & Ramdas 2023, "Time-uniform central limit theory and
  asymptotic confidence sequences", Thm 2.2; the form GrowthBook and Eppo use). A CS stays valid
  however often we look, so the monitor may call ``decide`` after every batch without inflating
  the false-promotion rate (the A/A test in ``tests/unit/test_experiment_stats.py`` checks this).
* **Several treatments**: anytime-valid p-values (the CS inverted) go through Holm's step-down
  (``statsmodels.stats.multitest.multipletests``). A p-value that is valid at every stopping time is
  a valid p-value at the time we stop, so Holm's family-wise guarantee carries over. The interval we
  report for a treatment is the CS at its Holm level ``alpha / (m - rank)`` (rank = 0 for the
  smallest p-value), so "interval above zero" and "Holm rejects" agree for the first rejections.

The confidence sequence
-----------------------
For a difference of means with ``n_t`` and ``n_c`` observations, ``se^2 = s_t^2/n_t + s_c^2/n_c``,
``N = n_t + n_c`` and the per-observation variance ``sigma^2 = N * se^2``, the two-sided (1 - alpha)
CS is ``estimate +/- sigma * sqrt( 2 (N rho^2 + 1) / (N^2 rho^2) * log( sqrt(N rho^2 + 1) / alpha ) )``.

``rho`` is the tuning parameter: it chooses the sample size at which the CS is tightest (it is
valid at every N whatever rho is). We set it from ``tuning_n`` (the total sample size, both arms,
you expect at the decision) with the paper's closed-form approximation
``rho^2 = (-2 log alpha + log(-2 log alpha + 1)) / tuning_n``. At that N the CS is ~1.5x as wide as
a fixed-horizon 95% interval; that is the price of peeking.

One-sided checks (guardrails) use the same two-sided CS at level alpha: the probability that the
true value ever leaves one side is at most the probability it ever leaves either side (<= alpha).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
from msgspec import Meta
from scipy import special, stats
from statsmodels.stats.multitest import multipletests

__all__ = [
    "Action",
    "Decision",
    "Guardrail",
    "GuardrailResult",
    "Interval",
    "Policy",
    "VariantData",
    "anytime_pvalue",
    "anytime_pvalue_from_stats",
    "assign",
    "assign_request",
    "bucket",
    "bucket_ranges",
    "confidence_sequence_diff",
    "cs_diff_from_stats",
    "cs_halfwidth",
    "cs_rho2",
    "decide",
    "evaluate_guardrails",
    "fixed_interval_diff",
    "fnv1a32",
    "hash_v2",
    "ramp_weight",
    "ramp_weights",
    "srm_pvalue",
    "summarize",
    "thompson_weights",
]

Action = Literal["continue", "promote", "rollback", "stop_inconclusive", "hold_srm"]
GUARDRAIL_METRICS = ("rating", "error_rate", "latency_p95_seconds", "output_tokens")
# Direction of harm: for the rating a *decrease* is a regression, for the others an increase.
_HIGHER_IS_WORSE = {"rating": False, "error_rate": True, "latency_p95_seconds": True, "output_tokens": True}
_P95 = 0.95


# --------------------------------------------------------------------------------------------
# Assignment
# --------------------------------------------------------------------------------------------


def fnv1a32(text: str) -> int:
    """FNV-1a 32-bit over the code points of ``text`` (as GrowthBook's Python SDK does)."""
    h = 0x811C9DC5
    for ch in text:
        h ^= ord(ch)
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h


def hash_v2(seed: str, unit: str) -> float:
    """GrowthBook hash version 2: ``(fnv1a32(str(fnv1a32(seed + unit))) % 10000) / 10000``.

    Hashing twice removes the correlation v1 had between experiments whose seeds share a prefix.
    """
    return (fnv1a32(str(fnv1a32(seed + unit))) % 10000) / 10000


def bucket(seed: str, unit: str) -> float:
    """The unit's position in [0, 1) for this experiment seed (10,000 distinct buckets)."""
    return hash_v2(seed, str(unit))


def _normalise(weights: Sequence[float]) -> list[float]:
    w = [float(x) for x in weights]
    if not w:
        raise ValueError("weights: need at least one variant weight")
    if any(not math.isfinite(x) or x < 0 for x in w):
        raise ValueError(f"weights: every weight must be finite and >= 0, got {w}")
    total = sum(w)
    if total <= 0:
        raise ValueError("weights: at least one weight must be > 0")
    return [x / total for x in w]


def bucket_ranges(weights: Sequence[float]) -> list[tuple[float, float]]:
    """Contiguous [start, end) ranges from cumulative normalised weights (GrowthBook's layout)."""
    ranges: list[tuple[float, float]] = []
    start = 0.0
    for w in _normalise(weights):
        ranges.append((start, start + w))
        start += w
    return ranges


def assign(seed: str, unit: str, weights: Sequence[float]) -> int:
    """Sticky variant index for ``unit``: the same seed, unit and weights always give the same arm."""
    b = bucket(seed, unit)
    ranges = bucket_ranges(weights)
    for i, (lo, hi) in enumerate(ranges):
        if lo <= b < hi:
            return i
    # Float rounding can leave the last end at 0.9999999; the bucket then belongs to the last arm
    # that has any weight.
    return max(i for i, (lo, hi) in enumerate(ranges) if hi > lo)


def assign_request(weights: Sequence[float], rng: random.Random | None = None) -> int:
    """Random (non-sticky) arm for a request that carries no unit id."""
    w = _normalise(weights)
    r = (rng or random).random()
    acc = 0.0
    for i, x in enumerate(w):
        acc += x
        if r < acc:
            return i
    return max(i for i, x in enumerate(w) if x > 0)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def srm_pvalue(observed_counts: Sequence[int], expected_weights: Sequence[float]) -> float:
    """Sample-ratio-mismatch p-value: chi-square goodness of fit of counts against the weights.

    A tiny p-value (GrowthBook and Microsoft use < 0.001) means assignment or logging is broken, so
    every comparison is suspect. Pearson's statistic is computed here and its tail taken with
    ``scipy.special.chdtrc``: the same number ``scipy.stats.chisquare`` returns (the tests check it),
    at a tenth of the cost, which matters because the monitor calls this on every look.
    """
    obs = np.asarray(observed_counts, dtype=float)
    w = np.asarray(_normalise(expected_weights))
    if obs.shape != w.shape:
        raise ValueError("observed_counts and expected_weights must have the same length")
    if np.any(obs < 0):
        raise ValueError("observed_counts must be >= 0")
    keep = w > 0
    if np.any(obs[~keep] > 0):
        return 0.0  # traffic reached an arm that should get none
    total = obs[keep].sum()
    if total == 0 or keep.sum() < 2:
        return 1.0
    expected = w[keep] * total
    chi2 = float(((obs[keep] - expected) ** 2 / expected).sum())
    return float(special.chdtrc(int(keep.sum()) - 1, chi2))


@dataclass(frozen=True)
class Interval:
    """An interval for a treatment-minus-control difference (or a single mean)."""

    lower: float
    upper: float
    estimate: float
    alpha: float = 0.05

    def excludes_zero(self) -> bool:
        return self.lower > 0 or self.upper < 0

    def as_dict(self) -> dict[str, float | None]:
        return {
            k: _num(v)
            for k, v in (
                ("lower", self.lower),
                ("upper", self.upper),
                ("estimate", self.estimate),
                ("alpha", self.alpha),
            )
        }


def cs_rho2(alpha: float, tuning_n: float) -> float:
    """rho^2 that makes the CS tightest near ``tuning_n`` total observations (paper's approximation)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if tuning_n <= 0:
        raise ValueError(f"tuning_n must be > 0, got {tuning_n}")
    a = -2.0 * math.log(alpha)
    return (a + math.log(a + 1.0)) / tuning_n


def cs_halfwidth(sigma: Any, n: Any, alpha: float, tuning_n: float, rho_alpha: float | None = None) -> Any:
    """Half-width of the asymptotic CS: ``sigma * sqrt(2(n r + 1)/(n^2 r) * log(sqrt(n r + 1)/alpha))``.

    ``sigma`` is the per-observation standard deviation, ``n`` the number of observations, and
    ``r = rho^2`` is tuned at ``rho_alpha`` (default ``alpha``). Arrays broadcast, so simulations
    can evaluate thousands of looks at once.
    """
    r = cs_rho2(rho_alpha if rho_alpha is not None else alpha, tuning_n)
    n = np.asarray(n, dtype=float)
    nr1 = n * r + 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        margin = np.sqrt(2.0 * nr1 / (n * n * r) * np.log(np.sqrt(nr1) / alpha))
    return np.asarray(sigma, dtype=float) * margin


def _diff_stats(mean_t: Any, var_t: Any, n_t: Any, mean_c: Any, var_c: Any, n_c: Any) -> tuple[Any, Any, Any]:
    """(estimate, per-observation sigma, N) for a difference of two independent means."""
    n_t = np.asarray(n_t, dtype=float)
    n_c = np.asarray(n_c, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        se2 = np.asarray(var_t, dtype=float) / n_t + np.asarray(var_c, dtype=float) / n_c
    n = n_t + n_c
    return np.asarray(mean_t, dtype=float) - np.asarray(mean_c, dtype=float), np.sqrt(n * se2), n


def cs_diff_from_stats(
    mean_t: Any, var_t: Any, n_t: Any, mean_c: Any, var_c: Any, n_c: Any, alpha: float, tuning_n: float
) -> tuple[Any, Any, Any]:
    """Vectorised CS for ``mean_t - mean_c`` from summary statistics: (lower, upper, estimate)."""
    est, sigma, n = _diff_stats(mean_t, var_t, n_t, mean_c, var_c, n_c)
    hw = cs_halfwidth(sigma, n, alpha, tuning_n)
    return est - hw, est + hw, est


def anytime_pvalue_from_stats(
    mean_t: Any, var_t: Any, n_t: Any, mean_c: Any, var_c: Any, n_c: Any, alpha: float, tuning_n: float
) -> Any:
    """The smallest level at which the CS excludes zero: P(ever <= a | no difference) <= a.

    ``rho`` is tuned at ``alpha`` (the design level) so the p-value and the CS agree at alpha.
    """
    est, sigma, n = _diff_stats(mean_t, var_t, n_t, mean_c, var_c, n_c)
    r = cs_rho2(alpha, tuning_n)
    nr1 = n * r + 1.0
    with np.errstate(divide="ignore", invalid="ignore"):
        z2 = np.where(sigma > 0, (est / sigma) ** 2 * n, np.where(est != 0, np.inf, 0.0))
        p = np.sqrt(nr1) * np.exp(-z2 * n * r / (2.0 * nr1))
    return np.clip(np.nan_to_num(p, nan=1.0), 0.0, 1.0)


def _mean_var_n(x: np.ndarray) -> tuple[float, float, int]:
    n = int(x.size)
    if n == 0:
        return math.nan, math.nan, 0
    return float(x.mean()), float(x.var(ddof=1)) if n > 1 else 0.0, n


def confidence_sequence_diff(
    x_treat: Sequence[float] | np.ndarray,
    x_ctrl: Sequence[float] | np.ndarray,
    alpha: float = 0.05,
    tuning_n: float = 2000,
    rho_alpha: float | None = None,
) -> Interval:
    """Anytime-valid (1 - alpha) interval for ``mean(x_treat) - mean(x_ctrl)``.

    ``rho_alpha`` is the level rho is tuned for (defaults to ``alpha``); Holm-adjusted intervals
    pass the design alpha there so that rho does not change with the rank of a variant.
    """
    mt, vt, nt = _mean_var_n(np.asarray(x_treat, dtype=float))
    mc, vc, nc = _mean_var_n(np.asarray(x_ctrl, dtype=float))
    if nt < 2 or nc < 2:
        return Interval(-math.inf, math.inf, mt - mc if nt and nc else math.nan, alpha)
    est, sigma, n = _diff_stats(mt, vt, nt, mc, vc, nc)
    hw = float(cs_halfwidth(sigma, n, alpha, tuning_n, rho_alpha))
    return Interval(float(est) - hw, float(est) + hw, float(est), alpha)


def anytime_pvalue(
    x_treat: Sequence[float] | np.ndarray,
    x_ctrl: Sequence[float] | np.ndarray,
    alpha: float = 0.05,
    tuning_n: float = 2000,
) -> float:
    """Anytime-valid p-value for "no difference in means" (see ``anytime_pvalue_from_stats``)."""
    mt, vt, nt = _mean_var_n(np.asarray(x_treat, dtype=float))
    mc, vc, nc = _mean_var_n(np.asarray(x_ctrl, dtype=float))
    if nt < 2 or nc < 2:
        return 1.0
    return float(anytime_pvalue_from_stats(mt, vt, nt, mc, vc, nc, alpha, tuning_n))


def fixed_interval_diff(
    x_treat: Sequence[float] | np.ndarray, x_ctrl: Sequence[float] | np.ndarray, alpha: float = 0.05
) -> Interval:
    """Welch t interval for the difference of means: valid for ONE look only (for display)."""
    xt = np.asarray(x_treat, dtype=float)
    xc = np.asarray(x_ctrl, dtype=float)
    est = float(xt.mean() - xc.mean()) if xt.size and xc.size else math.nan
    if xt.size < 2 or xc.size < 2 or (xt.var() == 0 and xc.var() == 0):
        return Interval(
            -math.inf if xt.size < 2 or xc.size < 2 else est,
            math.inf if xt.size < 2 or xc.size < 2 else est,
            est,
            alpha,
        )
    ci = stats.ttest_ind(xt, xc, equal_var=False).confidence_interval(confidence_level=1 - alpha)
    return Interval(float(ci.low), float(ci.high), est, alpha)


def _mean_interval(x: np.ndarray, alpha: float) -> Interval:
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan, alpha)
    m = float(x.mean())
    if x.size < 2 or x.std() == 0:
        return Interval(m, m, m, alpha) if x.size >= 2 else Interval(-math.inf, math.inf, m, alpha)
    lo, hi = stats.t.interval(1 - alpha, x.size - 1, loc=m, scale=stats.sem(x))
    return Interval(float(lo), float(hi), m, alpha)


# --------------------------------------------------------------------------------------------
# Configuration and data
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Guardrail:
    """A metric that must not regress by more than ``max_regression``.

    ``relative=True``: ``max_regression`` is a fraction of the control's value (0.1 = 10% worse:
    rating 10% lower, or error rate / p95 latency / output tokens 10% higher).
    ``relative=False``: it is in the metric's own units (rating points, error-rate points, seconds,
    tokens). ``max_regression=0`` trips on any significant regression.
    """

    metric: str
    max_regression: Annotated[float, Meta(ge=0)]
    relative: bool = True

    def __post_init__(self) -> None:
        if self.metric not in GUARDRAIL_METRICS:
            raise ValueError(f"guardrail.metric must be one of {GUARDRAIL_METRICS}, got {self.metric!r}")
        if not (math.isfinite(self.max_regression) and self.max_regression >= 0):
            raise ValueError(f"guardrail.max_regression must be finite and >= 0, got {self.max_regression}")


@dataclass(frozen=True)
class Policy:
    """How an experiment is run and decided.

    * ``mode``: ``fixed`` keeps the configured weights (or the ramp); ``thompson`` re-weights traffic
      with ``thompson_weights`` (SRM is then not checked: weights move by design).
    * ``alpha``: family-wise error for the goal comparison and for each guardrail family.
    * ``min_samples_per_variant``: ratings every variant needs before a goal decision.
    * ``max_duration_seconds``: after this, stop inconclusive and keep production.
    * ``auto_promote`` / ``auto_rollback``: whether the service may act on the decision itself.
    * ``ramp``: treatment traffic share per stage, increasing in (0, 1]; empty = no ramp.
    * ``guardrails``: see ``Guardrail``; evaluated once each arm has ``guardrail_min_samples``.
    * ``srm_threshold``: SRM p-value below which the experiment is held.
    * ``cs_tuning_n``: total observations (both arms) at which the confidence sequence is tightest.
    * ``thompson_floor``: minimum traffic share per arm in thompson mode.
    """

    # The `Meta` ranges put the checks below into the API schema (service/api/openapi.py); __post_init__ enforces them.
    mode: Literal["fixed", "thompson"] = "fixed"
    alpha: Annotated[float, Meta(gt=0, lt=0.5)] = 0.05
    min_samples_per_variant: Annotated[int, Meta(ge=2)] = 200
    max_duration_seconds: Annotated[float, Meta(gt=0)] = 14 * 24 * 3600.0
    auto_promote: bool = False
    auto_rollback: bool = True
    ramp: tuple[Annotated[float, Meta(gt=0, le=1)], ...] = ()
    guardrails: tuple[Guardrail, ...] = ()
    srm_threshold: Annotated[float, Meta(gt=0, lt=1)] = 0.001
    cs_tuning_n: Annotated[int, Meta(ge=1)] = 2000
    guardrail_min_samples: Annotated[int, Meta(ge=2)] = 50
    thompson_floor: Annotated[float, Meta(ge=0, lt=0.5)] = 0.05

    def __post_init__(self) -> None:
        if self.mode not in ("fixed", "thompson"):
            raise ValueError(f"policy.mode must be 'fixed' or 'thompson', got {self.mode!r}")
        if not 0 < self.alpha < 0.5:
            raise ValueError(f"policy.alpha must be in (0, 0.5), got {self.alpha}")
        if int(self.min_samples_per_variant) < 2:
            raise ValueError(
                f"policy.min_samples_per_variant must be >= 2, got {self.min_samples_per_variant}"
            )
        if not (self.max_duration_seconds > 0 and math.isfinite(self.max_duration_seconds)):
            raise ValueError(
                f"policy.max_duration_seconds must be finite and > 0, got {self.max_duration_seconds}"
            )
        ramp = tuple(float(r) for r in self.ramp)
        object.__setattr__(self, "ramp", ramp)
        if any(not 0 < r <= 1 for r in ramp):
            raise ValueError(f"policy.ramp values must be in (0, 1], got {list(ramp)}")
        if any(b <= a for a, b in itertools.pairwise(ramp)):
            raise ValueError(f"policy.ramp must be strictly increasing, got {list(ramp)}")
        object.__setattr__(self, "guardrails", tuple(self.guardrails))
        if any(not isinstance(g, Guardrail) for g in self.guardrails):
            raise ValueError("policy.guardrails must be Guardrail instances")
        if not 0 < self.srm_threshold < 1:
            raise ValueError(f"policy.srm_threshold must be in (0, 1), got {self.srm_threshold}")
        if int(self.cs_tuning_n) < 1:
            raise ValueError(f"policy.cs_tuning_n must be >= 1, got {self.cs_tuning_n}")
        if int(self.guardrail_min_samples) < 2:
            raise ValueError(f"policy.guardrail_min_samples must be >= 2, got {self.guardrail_min_samples}")
        if not 0 <= self.thompson_floor < 0.5:
            raise ValueError(f"policy.thompson_floor must be in [0, 0.5), got {self.thompson_floor}")


def _as_array(x: Any, name: str) -> np.ndarray:
    arr = np.asarray([] if x is None else x, dtype=float).ravel()
    if arr.size and not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite numbers")
    return arr


@dataclass
class VariantData:
    """What the service has collected for one arm.

    ``ratings``: one value in [0, 1] per feedback (treated as independent; pass per-unit means if a
    few heavy users dominate). ``latencies`` in seconds and ``output_tokens`` per request.
    ``units``: distinct unit ids assigned (SRM uses units when > 0, else requests).
    ``weight``: the traffic share the counts were collected under (for SRM).
    """

    name: str
    is_control: bool
    weight: float
    ratings: np.ndarray = field(default_factory=lambda: np.empty(0))
    errors: int = 0
    requests: int = 0
    latencies: np.ndarray = field(default_factory=lambda: np.empty(0))
    output_tokens: np.ndarray = field(default_factory=lambda: np.empty(0))
    units: int = 0

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("variant.name must be a non-empty string")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"variant.weight must be finite and >= 0, got {self.weight}")
        self.ratings = _as_array(self.ratings, "variant.ratings")
        if self.ratings.size and (self.ratings.min() < 0 or self.ratings.max() > 1):
            raise ValueError("variant.ratings must be in [0, 1]")
        self.latencies = _as_array(self.latencies, "variant.latencies")
        self.output_tokens = _as_array(self.output_tokens, "variant.output_tokens")
        if self.requests < 0 or self.errors < 0 or self.units < 0:
            raise ValueError("variant.requests, errors and units must be >= 0")
        if self.errors > self.requests:
            raise ValueError(f"variant.errors ({self.errors}) cannot exceed requests ({self.requests})")


@dataclass(frozen=True)
class GuardrailResult:
    variant: str
    metric: str
    status: Literal["ok", "tripped", "insufficient_data"]
    control_value: float | None
    treatment_value: float | None
    allowed_regression: float | None
    regression_lower_bound: float | None  # anytime-valid lower bound of the regression

    def as_dict(self) -> dict[str, Any]:
        return {k: _num(v) if isinstance(v, float) else v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Decision:
    """What the monitor should do. ``apply`` says whether the policy lets it act without a human."""

    action: Action
    winner: str | None
    reason: str
    numbers: dict[str, Any]
    apply: bool = False


# --------------------------------------------------------------------------------------------
# Thompson sampling and ramps
# --------------------------------------------------------------------------------------------


def thompson_weights(
    variants: Sequence[VariantData],
    floor: float = 0.05,
    draws: int = 10000,
    rng: np.random.Generator | None = None,
) -> list[float]:
    """Traffic shares = P(arm has the best mean rating), with at least ``floor`` per arm.

    Ratings are fractional successes: Beta(1 + sum r, 1 + sum (1 - r)) per arm. The floor keeps
    every arm measurable (and the control comparison alive); the rest is split by the probability.
    """
    k = len(variants)
    if k < 1:
        raise ValueError("variants: need at least one")
    if not 0 <= floor or floor * k >= 1:
        raise ValueError(f"floor must be >= 0 and floor * n_variants < 1, got {floor} x {k}")
    if draws < 1:
        raise ValueError("draws must be >= 1")
    rng = rng if rng is not None else np.random.default_rng()
    a = np.array([1.0 + v.ratings.sum() for v in variants])
    b = np.array([1.0 + (1.0 - v.ratings).sum() for v in variants])
    samples = rng.beta(a, b, size=(draws, k))
    p_best = np.bincount(samples.argmax(axis=1), minlength=k) / draws
    w = floor + (1.0 - floor * k) * p_best
    return [float(x) for x in w / w.sum()]


def ramp_weight(policy: Policy, stage: int) -> float:
    """Total treatment share at ramp ``stage`` (0-based; past the end stays at the last step)."""
    if stage < 0:
        raise ValueError(f"stage must be >= 0, got {stage}")
    if not policy.ramp:
        return 1.0
    return policy.ramp[min(stage, len(policy.ramp) - 1)]


def ramp_weights(policy: Policy, stage: int, n_treatments: int) -> list[float]:
    """[control, t1, t2, ...] shares at a ramp stage: treatments split the ramp share equally.

    Without a ramp all arms get equal shares. SRM must then compare counts collected in this stage
    only (or their time-weighted expected shares), not counts from earlier stages.
    """
    if n_treatments < 1:
        raise ValueError("n_treatments must be >= 1")
    if not policy.ramp:
        return [1.0 / (n_treatments + 1)] * (n_treatments + 1)
    r = ramp_weight(policy, stage)
    if r >= 1.0:
        # Full ramp = an even split (the control keeps a share so the comparison goes on).
        return [1.0 / (n_treatments + 1)] * (n_treatments + 1)
    return [1.0 - r] + [r / n_treatments] * n_treatments


# --------------------------------------------------------------------------------------------
# Guardrails
# --------------------------------------------------------------------------------------------


def _metric_samples(v: VariantData, metric: str) -> tuple[float, float, int]:
    """(mean, variance, n) of a per-request (or per-rating) metric."""
    if metric == "rating":
        return _mean_var_n(v.ratings)
    if metric == "output_tokens":
        return _mean_var_n(v.output_tokens)
    if metric == "error_rate":
        n = v.requests
        if n == 0:
            return math.nan, math.nan, 0
        p = v.errors / n
        return p, p * (1 - p) * n / max(n - 1, 1), n
    raise ValueError(metric)


def _guardrail(
    g: Guardrail, t: VariantData, c: VariantData, alpha: float, tuning_n: float, min_n: int
) -> GuardrailResult:
    if g.metric == "latency_p95_seconds":
        return _latency_guardrail(g, t, c, alpha, tuning_n, min_n)
    mt, vt, nt = _metric_samples(t, g.metric)
    mc, vc, nc = _metric_samples(c, g.metric)
    if nt < min_n or nc < min_n:
        return GuardrailResult(t.name, g.metric, "insufficient_data", _num(mc), _num(mt), None, None)
    allowed = g.max_regression * abs(mc) if g.relative else g.max_regression
    lo, hi, _ = cs_diff_from_stats(mt, vt, nt, mc, vc, nc, alpha, tuning_n)
    # regression = how much worse the treatment is; its lower bound is the evidence of harm
    reg_lo = float(lo) if _HIGHER_IS_WORSE[g.metric] else -float(hi)
    status = "tripped" if reg_lo > allowed else "ok"
    return GuardrailResult(t.name, g.metric, status, mc, mt, allowed, reg_lo)


def _latency_guardrail(
    g: Guardrail, t: VariantData, c: VariantData, alpha: float, tuning_n: float, min_n: int
) -> GuardrailResult:
    """p95 latency via tail exceedance.

    "Treatment p95 > allowed threshold" is the same event as "more than 5% of treatment requests
    are slower than the threshold", a Bernoulli mean, so the usual anytime-valid CS applies (a
    one-sample CS on the indicator). The threshold is ``(1 + m) * p95_control`` (relative) or
    ``p95_control + m`` (absolute); the control p95 is a plug-in estimate, which is accurate once
    the control has a few hundred requests. ``regression_lower_bound`` in the result is the lower
    bound of (treatment share beyond the threshold - 5%); ``allowed_regression`` is in seconds.
    """
    lt, lc = t.latencies, c.latencies
    if lt.size < min_n or lc.size < min_n:
        return GuardrailResult(
            t.name,
            g.metric,
            "insufficient_data",
            _num(float(np.quantile(lc, _P95))) if lc.size else None,
            _num(float(np.quantile(lt, _P95))) if lt.size else None,
            None,
            None,
        )
    q_c = float(np.quantile(lc, _P95))
    q_t = float(np.quantile(lt, _P95))
    threshold = q_c * (1 + g.max_regression) if g.relative else q_c + g.max_regression
    exceed = (lt > threshold).astype(float)
    p, var, n = _mean_var_n(exceed)
    hw = float(cs_halfwidth(math.sqrt(var), n, alpha, tuning_n))
    excess_lo = p - hw - (1 - _P95)  # > 0: more than 5% of treatment requests beyond the threshold
    status = "tripped" if excess_lo > 0 else "ok"
    return GuardrailResult(t.name, g.metric, status, q_c, q_t, threshold - q_c, excess_lo)


def evaluate_guardrails(variants: Sequence[VariantData], policy: Policy) -> list[GuardrailResult]:
    """Every guardrail for every treatment against the control (one-sided, anytime-valid).

    alpha is split Bonferroni-style over the guardrail checks: there is no "winner" to pick among
    guardrails, each must simply not cry wolf, and Bonferroni is what Holm reduces to for the
    first (and usually only) rejection.
    """
    control, treatments = _split(variants)
    checks = len(policy.guardrails) * len(treatments)
    if checks == 0:
        return []
    a = policy.alpha / checks
    return [
        _guardrail(g, t, control, a, policy.cs_tuning_n, policy.guardrail_min_samples)
        for t in treatments
        for g in policy.guardrails
    ]


# --------------------------------------------------------------------------------------------
# Decisions
# --------------------------------------------------------------------------------------------


def _split(variants: Sequence[VariantData]) -> tuple[VariantData, list[VariantData]]:
    controls = [v for v in variants if v.is_control]
    if len(controls) != 1:
        raise ValueError(f"variants: need exactly one control, got {len(controls)}")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variants: names must be unique, got {names}")
    treatments = [v for v in variants if not v.is_control]
    if not treatments:
        raise ValueError("variants: need at least one treatment")
    return controls[0], treatments


def _srm(variants: Sequence[VariantData], policy: Policy) -> float | None:
    if policy.mode == "thompson":
        return None
    counts = [v.units for v in variants]
    if sum(counts) == 0:
        counts = [v.requests for v in variants]
    if sum(counts) == 0 or sum(v.weight for v in variants) <= 0:
        return None
    return srm_pvalue(counts, [v.weight for v in variants])


def _goal_comparisons(
    control: VariantData, treatments: list[VariantData], policy: Policy, with_fixed: bool = False
) -> list[dict[str, Any]]:
    """Per-treatment anytime-valid comparison of mean rating, Holm-corrected over treatments."""
    a, tn = policy.alpha, policy.cs_tuning_n
    pvals = np.array([anytime_pvalue(t.ratings, control.ratings, a, tn) for t in treatments])
    m = len(treatments)
    if m == 1:
        reject, p_adj = pvals <= a, pvals
    else:
        reject, p_adj, _, _ = multipletests(pvals, alpha=a, method="holm")
    ranks = np.empty(m, dtype=int)
    ranks[np.argsort(pvals, kind="stable")] = np.arange(m)
    out = []
    for i, t in enumerate(treatments):
        level = a / (m - ranks[i])
        cs = confidence_sequence_diff(t.ratings, control.ratings, level, tn, rho_alpha=a)
        row = {
            "variant": t.name,
            "n_treatment": int(t.ratings.size),
            "n_control": int(control.ratings.size),
            "anytime_interval": cs,
            "p_anytime": float(pvals[i]),
            "p_holm": float(p_adj[i]),
            "significant": bool(reject[i]),
        }
        if with_fixed:  # display only: a t interval is valid for one look, never for decisions
            row["fixed_interval"] = fixed_interval_diff(t.ratings, control.ratings, a)
        out.append(row)
    return out


def decide(variants: list[VariantData], policy: Policy, elapsed_seconds: float) -> Decision:
    """One look at an experiment. Order: SRM hold > promote > guardrail rollback > goal rollback > stop.

    * ``hold_srm``: SRM p < ``srm_threshold``: no comparison can be trusted.
    * ``promote``: every variant has ``min_samples_per_variant`` ratings, a treatment's Holm-adjusted
      anytime-valid test is significant with a positive lift (the interval lies above zero), and it
      trips no guardrail. Several winners: the largest estimated lift.
    * ``rollback``: any treatment trips a guardrail (harm to users outweighs the information still
      to gain; restart without that arm), or every treatment is significantly worse on the goal.
    * ``stop_inconclusive``: ``max_duration_seconds`` reached; production (the control) stays.
    """
    control, treatments = _split(variants)
    srm = _srm(variants, policy)
    numbers: dict[str, Any] = {
        "srm_pvalue": _num(srm),
        "elapsed_seconds": float(elapsed_seconds),
        "samples": {v.name: int(v.ratings.size) for v in variants},
    }
    if srm is not None and srm < policy.srm_threshold:
        return Decision(
            "hold_srm",
            None,
            f"sample ratio mismatch (p={srm:.2g} < {policy.srm_threshold})",
            numbers,
            apply=True,
        )

    comps = _goal_comparisons(control, treatments, policy)
    guards = evaluate_guardrails(variants, policy)
    numbers["comparisons"] = [_comparison_dict(c) for c in comps]
    numbers["guardrails"] = [g.as_dict() for g in guards]
    tripped = [g for g in guards if g.status == "tripped"]
    tripped_names = {g.variant for g in tripped}
    enough = all(v.ratings.size >= policy.min_samples_per_variant for v in variants)

    if enough:
        winners = [
            c
            for c in comps
            if c["significant"] and c["anytime_interval"].estimate > 0 and c["variant"] not in tripped_names
        ]
        if winners:
            best = max(winners, key=lambda c: c["anytime_interval"].estimate)
            cs = best["anytime_interval"]
            return Decision(
                "promote",
                best["variant"],
                f"{best['variant']} improves mean rating by {cs.estimate:+.4f} "
                f"(anytime-valid interval [{cs.lower:+.4f}, {cs.upper:+.4f}], "
                f"Holm p={best['p_holm']:.3g}) and trips no guardrail",
                numbers,
                apply=policy.auto_promote,
            )
    if tripped:
        desc = "; ".join(f"{g.variant}: {g.metric}" for g in tripped)
        return Decision("rollback", None, f"guardrail tripped ({desc})", numbers, apply=policy.auto_rollback)
    if enough and all(c["significant"] and c["anytime_interval"].estimate < 0 for c in comps):
        return Decision(
            "rollback",
            None,
            "every treatment has a significantly lower mean rating than control",
            numbers,
            apply=policy.auto_rollback,
        )
    if elapsed_seconds >= policy.max_duration_seconds:
        return Decision(
            "stop_inconclusive",
            None,
            f"max duration {policy.max_duration_seconds:.0f}s reached without a decision; keeping production",
            numbers,
            apply=True,
        )
    why = "collecting samples" if not enough else "no significant difference yet"
    return Decision("continue", None, why, numbers, apply=False)


def _comparison_dict(c: dict[str, Any]) -> dict[str, Any]:
    return {k: v.as_dict() if isinstance(v, Interval) else v for k, v in c.items()}


def summarize(variants: Sequence[VariantData], policy: Policy) -> dict[str, Any]:
    """JSON-ready picture of an experiment for ``GET /v1/experiments/{id}`` (NaN/inf -> None)."""
    control, treatments = _split(variants)
    comps = {c["variant"]: c for c in _goal_comparisons(control, treatments, policy, with_fixed=True)}
    guards = evaluate_guardrails(variants, policy)
    out_variants = []
    for v in variants:
        mean_ci = _mean_interval(v.ratings, policy.alpha)
        row: dict[str, Any] = {
            "name": v.name,
            "is_control": v.is_control,
            "weight": float(v.weight),
            "units": int(v.units),
            "requests": int(v.requests),
            "errors": int(v.errors),
            "error_rate": _num(v.errors / v.requests) if v.requests else None,
            "feedback_count": int(v.ratings.size),
            "mean_rating": _num(mean_ci.estimate),
            "mean_rating_ci": [_num(mean_ci.lower), _num(mean_ci.upper)],
            "latency_p95_seconds": _num(float(np.quantile(v.latencies, _P95))) if v.latencies.size else None,
            "mean_output_tokens": _num(float(v.output_tokens.mean())) if v.output_tokens.size else None,
        }
        if not v.is_control:
            c = comps[v.name]
            mc = float(control.ratings.mean()) if control.ratings.size else math.nan
            cs: Interval = c["anytime_interval"]
            row["lift"] = {
                "absolute": _num(cs.estimate),
                "relative": _num(cs.estimate / mc) if mc and math.isfinite(mc) else None,
                "anytime_interval": cs.as_dict(),
                "fixed_interval": c["fixed_interval"].as_dict(),
                "p_anytime": _num(c["p_anytime"]),
                "p_holm": _num(c["p_holm"]),
                "significant": c["significant"],
            }
            row["guardrails"] = [g.as_dict() for g in guards if g.variant == v.name]
        out_variants.append(row)
    return {
        "variants": out_variants,
        "srm_pvalue": _num(_srm(variants, policy)),
        "alpha": policy.alpha,
        "mode": policy.mode,
        "method": "asymptotic confidence sequence (Waudby-Smith et al. 2023), Holm",
    }


def _num(x: Any) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None
