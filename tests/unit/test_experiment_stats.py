"""A/B statistics: assignment, SRM, confidence sequences, decisions (A/A error rate and power), Thompson."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from scipy import stats

from monitoring.experiments import (
    Decision,
    Guardrail,
    Policy,
    VariantData,
    anytime_pvalue,
    assign,
    assign_request,
    bucket,
    confidence_sequence_diff,
    cs_diff_from_stats,
    decide,
    fixed_interval_diff,
    hash_v2,
    ramp_weight,
    ramp_weights,
    srm_pvalue,
    summarize,
    thompson_weights,
)

# --- assignment -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seed", "unit", "expected"),
    [  # GrowthBook's SDK spec test vectors for hash version 2 (packages/sdk-js/test/cases.json)
        ("seed", "a", 0.0505),
        ("seed", "b", 0.2696),
        ("foo", "ab", 0.2575),
        ("foo", "def", 0.2019),
        ("89123klj", "8952klfjas09ujkasdf", 0.124),
        ("90850943850283058242805", "123", 0.7516),
        ("()**(%$##$%#$#", '___)((*":&', 0.0128),
    ],
)
def test_hash_v2_matches_growthbook_vectors(seed: str, unit: str, expected: float) -> None:
    assert hash_v2(seed, unit) == pytest.approx(expected, abs=1e-9)


def test_assignment_is_sticky_and_follows_weights() -> None:
    weights = [0.5, 0.3, 0.2]
    units = [f"user-{i}" for i in range(20_000)]
    first = [assign("exp-42", u, weights) for u in units]
    assert first == [assign("exp-42", u, weights) for u in units]  # sticky
    counts = np.bincount(first, minlength=3)
    p = stats.chisquare(counts, f_exp=np.array(weights) * len(units)).pvalue
    assert p > 0.001, counts
    # another seed reshuffles units (independent experiments)
    other = [assign("exp-43", u, weights) for u in units]
    assert np.mean(np.array(first) == np.array(other)) < 0.5
    # bucket in [0, 1)
    assert all(0 <= bucket("exp-42", u) < 1 for u in units[:100])


def test_assignment_weights_are_normalised_and_validated() -> None:
    units = [str(i) for i in range(2000)]
    assert [assign("s", u, [2, 2]) for u in units] == [assign("s", u, [0.5, 0.5]) for u in units]
    assert {assign("s", u, [0, 1]) for u in units} == {1}
    with pytest.raises(ValueError, match="weights"):
        assign("s", "u", [0, 0])
    with pytest.raises(ValueError, match="weights"):
        assign("s", "u", [-1, 2])


def test_assign_request_is_random_with_weights() -> None:
    rng = random.Random(7)
    picks = np.bincount([assign_request([0.8, 0.2], rng) for _ in range(10_000)], minlength=2)
    assert stats.chisquare(picks, f_exp=[8000, 2000]).pvalue > 0.001
    assert picks[1] > 1500


# --- SRM --------------------------------------------------------------------------------------


def test_srm_detects_52_48_split_and_accepts_a_fair_one() -> None:
    assert srm_pvalue([10_400, 9_600], [0.5, 0.5]) < 0.001
    rng = np.random.default_rng(1)
    fair = rng.binomial(20_000, 0.5)
    assert srm_pvalue([fair, 20_000 - fair], [1, 1]) > 0.001
    # same number scipy.stats.chisquare gives
    counts = [5_100, 2_950, 1_950]
    expected = stats.chisquare(counts, f_exp=np.array([0.5, 0.3, 0.2]) * sum(counts)).pvalue
    assert srm_pvalue(counts, [0.5, 0.3, 0.2]) == pytest.approx(expected, rel=1e-9)
    assert srm_pvalue([10, 5], [1, 0]) == 0.0  # traffic on a closed arm


# --- intervals --------------------------------------------------------------------------------


def test_confidence_sequence_is_wider_than_fixed_interval_and_covers() -> None:
    rng = np.random.default_rng(3)
    t, c = rng.random(800) * 0.5 + 0.3, rng.random(800) * 0.5 + 0.25
    cs = confidence_sequence_diff(t, c, alpha=0.05)
    ci = fixed_interval_diff(t, c, alpha=0.05)
    assert cs.estimate == pytest.approx(ci.estimate)
    assert cs.lower < ci.lower < ci.upper < cs.upper
    assert cs.lower < 0.05 < cs.upper  # true difference is 0.05
    # the anytime p-value is the level at which the CS just touches zero
    p = anytime_pvalue(t, c, alpha=0.05)
    edge = confidence_sequence_diff(t, c, alpha=p, rho_alpha=0.05)
    assert min(abs(edge.lower), abs(edge.upper)) == pytest.approx(0, abs=1e-9)


def test_confidence_sequence_time_uniform_coverage_vectorised() -> None:
    """Across 4,000 paths x 40 looks, the CS misses the true difference on < alpha of the paths."""
    rng = np.random.default_rng(11)
    paths, looks, per = 4000, 40, 25
    t = (rng.random((paths, looks * per)) < 0.7).astype(float)
    c = (rng.random((paths, looks * per)) < 0.6).astype(float)
    n = np.arange(1, looks + 1) * per
    ct, cc = np.cumsum(t, axis=1)[:, n - 1], np.cumsum(c, axis=1)[:, n - 1]
    mt, mc = ct / n, cc / n
    vt, vc = mt * (1 - mt) * n / (n - 1), mc * (1 - mc) * n / (n - 1)
    lo, hi, _ = cs_diff_from_stats(mt, vt, n, mc, vc, n, 0.05, 2000)
    ever_missed = ((lo > 0.1) | (hi < 0.1)).any(axis=1).mean()
    assert ever_missed <= 0.05, ever_missed
    # while a fixed 95% interval peeked 40 times misses far more often
    se = np.sqrt(vt / n + vc / n)
    naive_missed = (np.abs(mt - mc - 0.1) > 1.96 * se).any(axis=1).mean()
    assert naive_missed > 0.15, naive_missed


# --- policy validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mode": "bandit"}, "mode"),
        ({"alpha": 0.7}, "alpha"),
        ({"min_samples_per_variant": 1}, "min_samples_per_variant"),
        ({"max_duration_seconds": 0}, "max_duration_seconds"),
        ({"ramp": (0.1, 0.05)}, "ramp"),
        ({"ramp": (0.5, 1.5)}, "ramp"),
        ({"srm_threshold": 0}, "srm_threshold"),
    ],
)
def test_policy_validation_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        Policy(**kwargs)


def test_guardrail_and_variant_validation() -> None:
    with pytest.raises(ValueError, match="metric"):
        Guardrail("bleu", 0.1)
    with pytest.raises(ValueError, match="max_regression"):
        Guardrail("rating", -0.1)
    with pytest.raises(ValueError, match="ratings"):
        VariantData("a", True, 0.5, ratings=np.array([0.5, 1.5]))
    with pytest.raises(ValueError, match="errors"):
        VariantData("a", True, 0.5, errors=3, requests=2)


def test_ramp_helpers() -> None:
    p = Policy(ramp=(0.05, 0.2, 0.5))
    assert [ramp_weight(p, s) for s in range(5)] == [0.05, 0.2, 0.5, 0.5, 0.5]
    assert ramp_weights(p, 0, 2) == pytest.approx([0.95, 0.025, 0.025])
    assert ramp_weights(Policy(), 0, 1) == [0.5, 0.5]


# --- decide -----------------------------------------------------------------------------------


def _variants(
    c: np.ndarray, t: np.ndarray, ctrl: dict | None = None, cand: dict | None = None
) -> list[VariantData]:
    return [
        VariantData("control", True, 0.5, ratings=c, units=c.size, requests=c.size, **(ctrl or {})),
        VariantData("candidate", False, 0.5, ratings=t, units=t.size, requests=t.size, **(cand or {})),
    ]


POLICY = Policy(alpha=0.05, min_samples_per_variant=100, cs_tuning_n=2000, max_duration_seconds=1e9)


def _simulate(
    n_experiments: int, lift: float, seed: int, looks: int = 20, per_look: int = 50
) -> dict[str, int]:
    """Each experiment: thumbs-up ratings (Bernoulli), a decide() look after every batch of 50 per arm,
    stop at the first non-continue action."""
    rng = np.random.default_rng(seed)
    n_max = looks * per_look
    ctrl = (rng.random((n_experiments, n_max)) < 0.5).astype(float)
    cand = (rng.random((n_experiments, n_max)) < 0.5 + lift).astype(float)
    outcomes: dict[str, int] = {}
    for e in range(n_experiments):
        action = "continue"
        for k in range(1, looks + 1):
            n = k * per_look
            d = decide(_variants(ctrl[e, :n], cand[e, :n]), POLICY, elapsed_seconds=60.0 * k)
            if d.action != "continue":
                action = d.action
                break
        outcomes[action] = outcomes.get(action, 0) + 1
    return outcomes


def test_aa_false_promotion_rate_is_below_alpha_with_20_looks() -> None:
    out = _simulate(1000, lift=0.0, seed=2024)
    false_promotions = out.get("promote", 0) / 1000
    assert false_promotions <= POLICY.alpha, out
    assert out.get("continue", 0) >= 900, out  # the sequence does not trip on noise


def test_power_detects_a_point_one_rating_lift() -> None:
    """+0.1 mean rating (0.5 -> 0.6 thumbs-up) with at most 1,000 ratings per arm, 20 looks."""
    out = _simulate(300, lift=0.1, seed=99)
    assert out.get("promote", 0) / 300 >= 0.8, out
    assert out.get("rollback", 0) == 0, out


def test_decide_rolls_back_a_worse_candidate_and_holds_on_srm() -> None:
    rng = np.random.default_rng(5)
    c = (rng.random(1500) < 0.6).astype(float)
    t = (rng.random(1500) < 0.45).astype(float)
    d = decide(_variants(c, t), POLICY, 10.0)
    assert d.action == "rollback" and d.winner is None and "lower mean rating" in d.reason
    assert d.apply is True  # auto_rollback defaults to True

    vs = _variants(c, c.copy())
    vs[0].units, vs[1].units = 10_400, 9_600
    d = decide(vs, POLICY, 10.0)
    assert d.action == "hold_srm" and d.numbers["srm_pvalue"] < 0.001


def test_decide_waits_for_min_samples_then_stops_at_max_duration() -> None:
    c = np.ones(50) * 0.2
    t = np.ones(50) * 0.9
    policy = Policy(min_samples_per_variant=100, max_duration_seconds=3600)
    assert decide(_variants(c, t), policy, 10).action == "continue"
    d = decide(_variants(c, t), policy, 3600)
    assert d.action == "stop_inconclusive" and d.winner is None


def test_guardrail_trips_and_blocks_promotion() -> None:
    rng = np.random.default_rng(8)
    n = 2000
    c = (rng.random(n) < 0.5).astype(float)
    t = (rng.random(n) < 0.65).astype(float)  # clearly better rating ...
    policy = Policy(
        min_samples_per_variant=100,
        guardrails=(
            Guardrail("error_rate", 0.5),
            Guardrail("latency_p95_seconds", 0.2),
            Guardrail("output_tokens", 10, relative=False),
        ),
    )
    lat_c = rng.lognormal(0, 0.3, n)
    healthy = decide(
        _variants(
            c,
            t,
            ctrl={"latencies": lat_c, "errors": 20},
            cand={"latencies": rng.lognormal(0, 0.3, n), "errors": 22},
        ),
        policy,
        1,
    )
    assert healthy.action == "promote" and healthy.winner == "candidate"
    assert {g["status"] for g in healthy.numbers["guardrails"]} == {
        "ok",
        "insufficient_data",
    }  # no tokens given

    # ... but 40% slower at p95 -> the latency guardrail trips and the experiment rolls back
    slow = decide(
        _variants(c, t, ctrl={"latencies": lat_c}, cand={"latencies": rng.lognormal(0, 0.3, n) * 1.4}),
        policy,
        1,
    )
    assert slow.action == "rollback" and "latency_p95_seconds" in slow.reason
    # error rate 1% -> 4%
    errs = decide(_variants(c, t, ctrl={"errors": 20}, cand={"errors": 80}), policy, 1)
    assert errs.action == "rollback" and "error_rate" in errs.reason
    # 30 more output tokens per answer, allowed 10 absolute
    tok = decide(
        _variants(
            c,
            t,
            ctrl={"output_tokens": rng.normal(100, 20, n)},
            cand={"output_tokens": rng.normal(130, 20, n)},
        ),
        policy,
        1,
    )
    assert tok.action == "rollback" and "output_tokens" in tok.reason
    # a rating guardrail: candidate 0.05 worse on rating with 0 tolerance -> trips before min samples
    worse = (rng.random(n) < 0.42).astype(float)
    rg = decide(
        _variants(c, worse), Policy(min_samples_per_variant=5000, guardrails=(Guardrail("rating", 0.0),)), 1
    )
    assert rg.action == "rollback" and "rating" in rg.reason


def test_holm_with_three_variants() -> None:
    rng = np.random.default_rng(21)
    n = 1500
    c = (rng.random(n) < 0.5).astype(float)
    strong = (rng.random(n) < 0.62).astype(float)
    weak = (rng.random(n) < 0.52).astype(float)
    vs = [
        VariantData("control", True, 1 / 3, ratings=c, units=n),
        VariantData("weak", False, 1 / 3, ratings=weak, units=n),
        VariantData("strong", False, 1 / 3, ratings=strong, units=n),
    ]
    d = decide(vs, POLICY, 1.0)
    assert d.action == "promote" and d.winner == "strong"
    comps = {c["variant"]: c for c in d.numbers["comparisons"]}
    from statsmodels.stats.multitest import multipletests

    raw = [comps["weak"]["p_anytime"], comps["strong"]["p_anytime"]]
    assert [comps["weak"]["p_holm"], comps["strong"]["p_holm"]] == pytest.approx(
        list(multipletests(raw, method="holm")[1])
    )
    # the strongest variant is tested at alpha/2, the other at alpha/1 (Holm levels)
    assert comps["strong"]["anytime_interval"]["alpha"] == pytest.approx(0.025)
    assert comps["weak"]["anytime_interval"]["alpha"] == pytest.approx(0.05)
    assert comps["strong"]["significant"] and not comps["weak"]["significant"]


def test_summary_is_json_ready() -> None:
    rng = np.random.default_rng(4)
    c = rng.random(300)
    vs = _variants(
        c, rng.random(300), ctrl={"latencies": rng.random(300)}, cand={"latencies": rng.random(300)}
    )
    s = summarize(vs, Policy(guardrails=(Guardrail("latency_p95_seconds", 0.1),)))
    json.dumps(s, allow_nan=False)
    cand = next(v for v in s["variants"] if v["name"] == "candidate")
    assert cand["feedback_count"] == 300 and cand["units"] == 300
    lift = cand["lift"]
    assert lift["anytime_interval"]["lower"] < lift["fixed_interval"]["lower"] < lift["absolute"]
    assert cand["guardrails"][0]["metric"] == "latency_p95_seconds"
    lo, hi = next(v for v in s["variants"] if v["is_control"])["mean_rating_ci"]
    assert lo < float(c.mean()) < hi
    assert 0 <= s["srm_pvalue"] <= 1
    assert isinstance(decide(vs, Policy(), 1.0), Decision)


# --- Thompson ---------------------------------------------------------------------------------


def test_thompson_floor_and_best_arm_gets_most_traffic() -> None:
    rng = np.random.default_rng(12)
    vs = [
        VariantData("control", True, 0.25, ratings=(rng.random(400) < 0.5).astype(float)),
        VariantData("a", False, 0.25, ratings=(rng.random(400) < 0.52).astype(float)),
        VariantData("b", False, 0.25, ratings=(rng.random(400) < 0.65).astype(float)),
        VariantData("c", False, 0.25, ratings=(rng.random(400) < 0.3).astype(float)),
    ]
    w = thompson_weights(vs, floor=0.05, draws=10_000, rng=np.random.default_rng(0))
    assert sum(w) == pytest.approx(1.0)
    assert min(w) >= 0.05 - 1e-12
    assert int(np.argmax(w)) == 2 and w[2] > 0.7
    # fractional ratings work and no data = equal shares
    empty = [VariantData(n, n == "x", 0.5) for n in ("x", "y")]
    assert thompson_weights(empty, rng=np.random.default_rng(1)) == pytest.approx([0.5, 0.5], abs=0.03)
    with pytest.raises(ValueError, match="floor"):
        thompson_weights(vs, floor=0.3)
    assert math.isclose(sum(thompson_weights(vs, floor=0.0, draws=500)), 1.0)
