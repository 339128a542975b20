"""Drift with the real evidently 0.7 report on synthetic banking-like traffic."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from monitoring.drift import DriftSpec, compute_drift, is_empty_or_refusal, traffic_frame

INTENTS = {
    "card_arrival": [
        "when will my new card arrive",
        "my card has not arrived yet",
        "how long does card delivery take",
    ],
    "lost_card": ["i lost my card what do i do", "my card was stolen", "please block my lost card"],
    "exchange_rate": [
        "what exchange rate do you use",
        "how much is the euro to dollar rate",
        "why is the rate different",
    ],
    "top_up": ["how do i top up my account", "my top up failed", "can i top up with a bank transfer"],
    "transfer": [
        "my transfer is pending",
        "how long does an international transfer take",
        "i sent money to the wrong account",
    ],
}
OFF_TOPIC = [
    "what is a good recipe for pasta tonight",
    "recommend a hiking trail near the mountains",
    "how do i fix a flat bicycle tire",
    "which football team won the league",
    "tips for growing tomatoes in pots",
]
FILLERS = ["please", "hi", "hello there", "thanks", "asap", "urgent", "quick question", "help"]


def banking_traffic(
    n: int,
    seed: int,
    intent_p: list[float] | None = None,
    length_scale: float = 1.0,
    off_topic: float = 0.0,
    refusal_rate: float = 0.03,
) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    names = list(INTENTS)
    labels = rng.choice(names, size=n, p=intent_p or [0.2] * 5)
    records = []
    for label in labels:
        if rng.random() < off_topic:
            base = OFF_TOPIC[rng.integers(len(OFF_TOPIC))]
        else:
            base = INTENTS[label][rng.integers(3)]
        prompt = f"{FILLERS[rng.integers(len(FILLERS))]} {base} {FILLERS[rng.integers(len(FILLERS))]}"
        words = max(1, int(rng.normal(25, 6) * length_scale))
        output = (
            "I'm sorry, I can't help with that."
            if rng.random() < refusal_rate
            else " ".join(["you can check this in the app"] * (words // 7 + 1))
        )
        records.append(
            {
                "prompt": prompt,
                "output": output,
                "label": label,
                "rating": float(rng.random() < 0.7) if rng.random() < 0.4 else None,
                "attributes": {"segment": rng.choice(["retail", "business"], p=[0.8, 0.2])},
            }
        )
    return traffic_frame(records, attribute_keys=["segment"])


SPEC = DriftSpec.default(attribute_keys=["segment"])


def test_traffic_frame_and_refusal_flag() -> None:
    df = traffic_frame(
        [
            {"prompt": "hi", "output": "", "rating": 1, "attributes": {"segment": "a"}},
            {"prompt": "card?", "output": "I'm sorry, I cannot do that"},
            {"prompt": "rate", "output": "The rate is 1.1", "label": "exchange_rate"},
        ],
        ["segment"],
    )
    assert list(df["empty_or_refusal"]) == ["yes", "yes", "no"]
    assert list(df["attr_segment"]) == ["a", "(missing)", "(missing)"]
    assert df["rating"].isna().tolist() == [False, True, True]
    assert df["prompt_length"].tolist() == [2, 5, 4]
    assert not is_empty_or_refusal("Sorry to hear that! Here is how to block your card.")


def test_no_drift_between_samples_of_the_same_distribution() -> None:
    res = compute_drift(banking_traffic(2000, 1), banking_traffic(2000, 2), SPEC)
    assert not res.drifted, res.features
    assert [f.feature for f in res.features if f.drifted] == []
    by = {f.feature: f for f in res.features}
    assert by["prompt_length"].method == "wasserstein" and by["answer_label"].method == "jensenshannon"
    assert by["prompt"].method == "abs_text_content_drift"
    assert by["prompt"].score < by["prompt"].threshold
    assert by["rating"].score is not None  # ratings are ~40% present, NaNs dropped
    assert res.share == 0.0 and res.html is None


def test_drift_detected_when_intent_mix_and_lengths_shift() -> None:
    ref = banking_traffic(2000, 3)
    cur = banking_traffic(2000, 4, intent_p=[0.05, 0.05, 0.1, 0.1, 0.7], length_scale=1.6, refusal_rate=0.2)
    res = compute_drift(ref, cur, SPEC)
    drifted = {f.feature for f in res.features if f.drifted}
    assert {"answer_label", "answer_length", "empty_or_refusal"} <= drifted, res.features
    assert "attr_segment" not in drifted and "rating" not in drifted
    assert res.drifted and res.share >= 0.5


def test_text_drift_detected_when_prompts_change_topic() -> None:
    ref = banking_traffic(1500, 5)
    cur = banking_traffic(1500, 6, off_topic=0.5)
    spec = DriftSpec(numerical=(), categorical=(), text=("prompt",), render_html=True)
    res = compute_drift(ref, cur, spec)
    (f,) = res.features
    assert f.drifted and f.score > 0.7, f
    assert res.html is not None and "<html" in res.html.lower()


def test_text_threshold_adapts_to_small_windows_and_missing_columns_fail() -> None:
    small = compute_drift(
        banking_traffic(120, 7),
        banking_traffic(120, 8),
        DriftSpec(numerical=(), categorical=(), text=("prompt",)),
    )
    assert small.features[0].threshold > 0.6  # 0.5 + 3 sd of a no-skill AUC on 60 vs 60 rows
    with pytest.raises(ValueError, match="missing columns"):
        compute_drift(banking_traffic(50, 1).drop(columns=["rating"]), banking_traffic(50, 2), SPEC)
    with pytest.raises(ValueError, match="num_method"):
        DriftSpec(num_method="magic")


def test_too_few_values_are_reported_not_guessed() -> None:
    ref, cur = banking_traffic(300, 9), banking_traffic(300, 10)
    cur["rating"] = np.nan
    res = compute_drift(ref, cur, SPEC)
    rating = next(f for f in res.features if f.feature == "rating")
    assert rating.score is None and not rating.drifted
