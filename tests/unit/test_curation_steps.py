"""Each curation step on small hand-made data (real datasketch and scikit-learn)."""

from __future__ import annotations

from collections import Counter

import pytest

from adapters.curation import steps as S
from adapters.curation.config import (
    STEP_NAMES,
    ConflictsConfig,
    CurationConfig,
    ExactDedupeConfig,
    GroupBalanceConfig,
    LabelBalanceConfig,
    LengthFilterConfig,
    NearDedupeConfig,
    NormalizeConfig,
    SplitConfig,
)
from adapters.curation.pipeline import approx_token_count, run_pipeline
from adapters.curation.rows import Message, Row


def sft(prompt: str, answer: str, **attrs: str) -> Row:
    return Row(kind="sft", prompt=(Message("user", prompt),), completion=answer, attributes=attrs)


LONG = (
    "I ordered a replacement debit card three weeks ago after my old one expired and the tracking page "
    "still says it is being prepared so could you please tell me when it will finally arrive at my home address"
)


# -- normalize -------------------------------------------------------------------------------
def test_normalize_nfc_controls_whitespace() -> None:
    row = sft("  Cafe\u0301\x00 \u200bis   open\t\there \r\n\r\n\r\n\r\nnext  line  ", " answer\x07 ")
    (out,), rep = S.normalize([row], NormalizeConfig())
    assert out.prompt[0].content == "Café is open here\n\nnext line"
    assert out.completion == "answer"
    assert rep.changed == 1 and rep.reasons == {"normalized": 1}
    assert rep.examples[0]["before"]["completion"] == " answer\x07 "
    flat, _ = S.normalize([row], NormalizeConfig(keep_newlines=False))
    assert flat[0].prompt[0].content == "Café is open here next line"
    same, rep2 = S.normalize([sft("clean", "text")], NormalizeConfig())
    assert rep2.changed == 0 and same[0] == sft("clean", "text")
    _, off = S.normalize([row], NormalizeConfig(enabled=False))
    assert off.skipped == "disabled"


# -- length_filter ---------------------------------------------------------------------------
def test_length_filter_reasons() -> None:
    rows = [
        sft("", "a"),
        sft("question", ""),
        sft("one", "two"),  # 2 tokens < 3
        sft(" ".join(["w"] * 20), "x"),  # 21 tokens > 10
        sft("a fine question", "ok"),  # 4 tokens
        Row(kind="preference", prompt=(Message("user", "q q"),), chosen="good answer here", rejected=""),
    ]
    out, rep = S.length_filter(rows, LengthFilterConfig(min_tokens=3, max_tokens=10), approx_token_count)
    assert out == [rows[4]]
    assert rep.removed == 5
    assert rep.reasons == {"empty_prompt": 1, "empty_answer": 2, "too_short": 1, "too_long": 1}
    assert rep.details["tokens"]["max"] == 4


def test_length_filter_uses_the_given_tokenizer() -> None:
    calls: list[str] = []

    def chars(text: str) -> int:  # a "tokenizer" that counts characters
        calls.append(text)
        return len(text)

    rows = [sft("abcdef", "ghij"), sft("ab", "c")]
    out, rep = S.length_filter(rows, LengthFilterConfig(min_tokens=5, max_tokens=10), chars)
    assert out == [sft("abcdef", "ghij")] and rep.reasons == {"too_short": 1}
    assert sorted(calls) == ["ab", "abcdef", "c", "ghij"]


# -- exact_dedupe ----------------------------------------------------------------------------
def test_exact_dedupe_counts_and_keeps_first() -> None:
    rows = [sft("a", "x", seg="1"), sft("b", "y"), sft("a", "x", seg="2"), sft("a", "x"), sft("b", "y")]
    out, rep = S.exact_dedupe(rows, ExactDedupeConfig())
    assert out == [rows[0], rows[1]]
    assert rep.removed == 3 and rep.reasons == {"exact_duplicate": 3} and rep.details["duplicate_groups"] == 2
    assert rep.examples[0]["duplicate_of"] == 0


# -- near_dedupe -----------------------------------------------------------------------------
def test_near_dedupe_removes_one_word_changes_of_long_rows_only() -> None:
    near = LONG.replace("three weeks", "four weeks")
    rows = [
        sft(LONG, "card_arrival"),
        sft("what is my balance", "balance"),
        sft(near, "card_arrival"),
        sft("what is my pin", "pin"),  # one word of a short row changed: too different at 0.9
        sft(LONG, "card_delivery_estimate"),  # same prompt, other answer: a conflict, not a duplicate
    ]
    out, rep = S.near_dedupe(rows, NearDedupeConfig())
    assert out == [rows[0], rows[1], rows[3], rows[4]]
    assert rep.removed == 1 and rep.reasons == {"near_duplicate": 1}
    ex = rep.examples[0]
    assert ex["row"]["prompt"][0]["content"] == near and ex["similar_to"]["prompt"][0]["content"] == LONG
    assert 0.9 <= ex["similarity"] < 1.0

    rows.append(sft("what is my pin code", "pin"))  # prompt Jaccard 4/5 with rows[3], same answer
    assert S.near_dedupe(rows, NearDedupeConfig())[1].removed == 1
    loose, rep2 = S.near_dedupe(rows, NearDedupeConfig(threshold=0.7))
    assert rows[5] not in loose and rep2.removed == 2
    assert rows[1] in loose  # "what is my balance" ~ "what is my pin" by prompt, but the answers differ
    strict, rep3 = S.near_dedupe(rows, NearDedupeConfig(threshold=0.99))
    assert strict == rows and rep3.removed == 0


def test_near_dedupe_longer_shingles_are_stricter() -> None:
    near = LONG.replace("three weeks", "four weeks")
    rows = [sft(LONG, "card_arrival"), sft(near, "card_arrival")]
    assert S.near_dedupe(rows, NearDedupeConfig(shingle_size=1))[1].removed == 1
    # one changed word touches 3 trigrams: prompt Jaccard 34/40 = 0.85 < 0.9
    assert S.near_dedupe(rows, NearDedupeConfig(shingle_size=3))[1].removed == 0
    assert S.near_dedupe(rows, NearDedupeConfig(shingle_size=3, threshold=0.85))[1].removed == 1


# -- conflicts -------------------------------------------------------------------------------
def test_conflicts_flag_or_drop() -> None:
    rows = [
        sft("Where is my card?", "card_arrival"),
        sft("where is  my card?", "card_delivery_estimate"),  # same prompt up to case/space
        sft("pin?", "pin"),
        Row(kind="preference", prompt=(Message("user", "q"),), chosen="a", rejected="b"),
        Row(kind="preference", prompt=(Message("user", "q"),), chosen="b", rejected="a"),
        Row(kind="preference", prompt=(Message("user", "q"),), chosen="a", rejected="c"),  # consistent
        Row(kind="unpaired", prompt=(Message("user", "u"),), completion="x", label=True),
        Row(kind="unpaired", prompt=(Message("user", "u"),), completion="x", label=False),
        Row(kind="unpaired", prompt=(Message("user", "u"),), completion="y", label=False),  # fine
    ]
    kept, rep = S.conflicts(rows, ConflictsConfig())
    assert kept == rows and rep.flagged == 6 and rep.removed == 0
    assert rep.reasons == {"different_answers": 2, "reversed_preference": 2, "contradicting_labels": 2}
    assert rep.details["groups"] == 3
    assert set(rep.examples[0]["answers"]) == {"card_arrival", "card_delivery_estimate"}
    dropped, rep2 = S.conflicts(rows, ConflictsConfig(drop_conflicts=True))
    assert dropped == [rows[2], rows[5], rows[8]] and rep2.removed == 6


# -- label detection and balancing -----------------------------------------------------------
def test_detect_labels() -> None:
    cfg = LabelBalanceConfig()
    labelled = [sft(f"q{i}", ["a", "b"][i % 2]) for i in range(20)]
    assert S.detect_labels(labelled, cfg) == ["a", "b"] * 10
    free_text = [sft(f"q{i}", f"answer {i}") for i in range(20)]
    assert S.detect_labels(free_text, cfg) is None
    long_answers = [sft(f"q{i}", "x" * 101) for i in range(20)]
    assert S.detect_labels(long_answers, cfg) is None
    assert (
        S.detect_labels(
            labelled + [Row(kind="preference", prompt=(Message("user", "q"),), chosen="a", rejected="b")], cfg
        )
        is None
    )


def _imbalanced() -> list[Row]:
    return [sft(f"big {i}", "big") for i in range(40)] + [sft(f"small {i}", "small") for i in range(2)]


def test_label_balance_oversample_and_undersample() -> None:
    rows = _imbalanced()
    labels = [r.completion or "" for r in rows]
    over, rep = S.label_balance(rows, LabelBalanceConfig(target_ratio=4.0), labels, seed=0)
    counts = Counter(r.completion for r in over)
    assert counts == {"big": 40, "small": 10} and rep.added == 8 and rep.details["ratio_after"] == 4.0
    assert over[:42] == rows  # originals first, copies appended
    assert Counter(r.prompt for r in over[42:]) == {rows[40].prompt: 4, rows[41].prompt: 4}  # spread evenly

    under, rep2 = S.label_balance(
        rows, LabelBalanceConfig(target_ratio=4.0, mode="undersample"), labels, seed=0
    )
    assert Counter(r.completion for r in under) == {"big": 8, "small": 2} and rep2.removed == 32
    assert under == [r for r in rows if r in under]  # order preserved
    again, _ = S.label_balance(rows, LabelBalanceConfig(target_ratio=4.0, mode="undersample"), labels, seed=0)
    other, _ = S.label_balance(rows, LabelBalanceConfig(target_ratio=4.0, mode="undersample"), labels, seed=1)
    assert again == under and other != under

    untouched, rep3 = S.label_balance(rows, LabelBalanceConfig(target_ratio=25.0), labels, seed=0)
    assert untouched == rows and rep3.added == rep3.removed == 0 and rep3.details["ratio_before"] == 20.0
    assert S.label_balance(rows, LabelBalanceConfig(), None, 0)[1].skipped == "not a label-like task"


def test_group_balance_kamiran_calders_weights_make_label_independent_of_group() -> None:
    rows = (
        [sft(f"a{i}", "yes", g="a") for i in range(30)]
        + [sft(f"a{i}n", "no", g="a") for i in range(10)]
        + [sft(f"b{i}", "yes", g="b") for i in range(5)]
        + [sft(f"b{i}n", "no", g="b") for i in range(15)]
        + [sft("no group", "yes")]
    )
    labels = [r.completion or "" for r in rows]
    out, weights, rep = S.group_balance(rows, GroupBalanceConfig(attribute="g"), labels, seed=0)
    assert out == rows and weights is not None
    # n=60, P(a)=40/60, P(yes)=35/60, P(a,yes)=30/60 -> w = (40*35)/(60*30)
    assert weights[0] == pytest.approx(40 * 35 / (60 * 30))
    assert weights[40] == pytest.approx(20 * 35 / (60 * 5))
    assert weights[-1] == 1.0  # rows without the attribute are untouched
    for g in ("a", "b"):
        idx = [i for i, r in enumerate(rows) if r.attributes.get("g") == g]
        yes = sum(weights[i] for i in idx if labels[i] == "yes") / sum(weights[i] for i in idx)
        assert yes == pytest.approx(35 / 60)
    assert sum(weights[:-1]) == pytest.approx(60)
    assert rep.details["groups"] == {"a": 40, "b": 20} and rep.details["rows_without_attribute"] == 1

    _, free_w, _ = S.group_balance(rows, GroupBalanceConfig(attribute="g"), None, seed=0)
    assert (
        free_w is not None
        and free_w[0] == pytest.approx(60 / (2 * 40))
        and free_w[40] == pytest.approx(60 / (2 * 20))
    )

    under, no_w, rep2 = S.group_balance(
        rows, GroupBalanceConfig(attribute="g", mode="undersample"), labels, seed=0
    )
    assert no_w is None and rep2.removed == 20
    assert Counter(r.attributes.get("g") for r in under) == {"a": 20, "b": 20, None: 1}

    assert S.group_balance(rows, GroupBalanceConfig(attribute="locale"), labels, 0)[2].skipped is not None
    assert S.group_balance(rows, GroupBalanceConfig(), labels, 0)[2].skipped == "no attribute configured"


# -- split -----------------------------------------------------------------------------------
def test_split_stratified_with_singletons_and_copies() -> None:
    rows = (
        [sft(f"x{i}", "x") for i in range(50)] + [sft(f"y{i}", "y") for i in range(20)] + [sft("lonely", "z")]
    )
    rows += [rows[0], rows[0], rows[60]]  # oversampled copies
    labels = [r.completion or "" for r in rows]
    idx, rep = S.split(rows, SplitConfig(validation_fraction=0.2), labels, seed=0)
    assert rep.details["stratified"] and rep.details["singleton_classes"] == 1
    assert sorted(idx.train + idx.validation) == list(range(len(rows)))
    val = Counter(labels[i] for i in idx.validation if i < 71)  # distinct rows (copies follow their original)
    assert val["x"] == 10 and val["y"] == 4 and val["z"] == 0
    for copy_of, copies in ((0, (71, 72)), (60, (73,))):
        side = idx.train if copy_of in idx.train else idx.validation
        assert all(c in side for c in copies)
    assert idx.train == sorted(idx.train)
    idx2, _ = S.split(rows, SplitConfig(validation_fraction=0.2), labels, seed=0)
    idx3, _ = S.split(rows, SplitConfig(validation_fraction=0.2), labels, seed=1)
    assert idx2 == idx and idx3 != idx


def test_split_allocates_per_class_when_sklearn_cannot_stratify() -> None:
    # 12 classes, 100 rows, 10 validation rows < 12 classes: sklearn refuses to stratify
    sizes = [30, 20, 10, 8, 6, 6, 5, 5, 4, 3, 2, 1]
    rows = [sft(f"q{c}-{k}", f"c{c}") for c, n in enumerate(sizes) for k in range(n)]
    labels = [r.completion or "" for r in rows]
    idx, rep = S.split(rows, SplitConfig(validation_fraction=0.1), labels, seed=0)
    assert (
        rep.details["stratified"]
        and rep.details["method"] == "largest_remainder"
        and "fallback" in rep.details
    )
    assert len(idx.validation) == 10 and len(idx.train) == 90
    val = Counter(labels[i] for i in idx.validation)
    assert val["c0"] == 3 and val["c1"] == 2 and val["c2"] == 1 and val["c11"] == 0
    train = Counter(labels[i] for i in idx.train)
    assert all(train[f"c{c}"] >= 1 for c in range(12))
    assert S.split(rows, SplitConfig(validation_fraction=0.1), labels, seed=0)[0] == idx
    free, rep2 = S.split(rows, SplitConfig(validation_fraction=0.3), None, seed=0)
    assert (
        len(free.validation) == 30 and not rep2.details["stratified"] and rep2.details["method"] == "random"
    )
    one, _ = S.split(rows[:1], SplitConfig(), labels[:1], seed=0)
    assert one.train == [0] and one.validation == []


# -- config ----------------------------------------------------------------------------------
def test_config_from_dict_validates_and_names_unknown_keys() -> None:
    cfg = CurationConfig.from_dict({"near_dedupe": {"threshold": 0.8}, "seed": 3, "group_balance": False})
    assert cfg.near_dedupe.threshold == 0.8 and cfg.seed == 3 and not cfg.group_balance.enabled
    assert CurationConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="near_dedupe.treshold"):
        CurationConfig.from_dict({"near_dedupe": {"treshold": 0.8}})
    with pytest.raises(ValueError, match="unknown config key.*: dedupe"):
        CurationConfig.from_dict({"dedupe": {}})
    with pytest.raises(ValueError, match=r"near_dedupe.threshold must be a number in \(0.0, 1.0\]"):
        CurationConfig.from_dict({"near_dedupe": {"threshold": 1.5}})
    with pytest.raises(ValueError, match="split.validation_fraction"):
        SplitConfig(validation_fraction=1.0)
    with pytest.raises(ValueError, match="label_balance.mode"):
        LabelBalanceConfig(mode="smote")
    with pytest.raises(ValueError, match="length_filter.max_tokens"):
        LengthFilterConfig(min_tokens=10, max_tokens=5)
    with pytest.raises(ValueError, match="seed"):
        CurationConfig(seed=-1)
    with pytest.raises(ValueError, match="enabled"):
        NormalizeConfig(enabled="yes")  # type: ignore[arg-type]
    fb = CurationConfig.from_dict({"feedback": {"sft_min_rating": 1}})
    assert fb.feedback.sft_min_rating == 1.0 and CurationConfig.from_dict(fb.to_dict()) == fb
    with pytest.raises(ValueError, match=r"feedback.sft_min_rating must be a number in \(0.0, 1.0\]"):
        CurationConfig.from_dict({"feedback": {"sft_min_rating": 0}})


# -- pipeline --------------------------------------------------------------------------------
def test_pipeline_is_deterministic_and_maps_weights_to_train_rows() -> None:
    rows = [sft(f"question number {i}", ["yes", "no"][i % 3 == 0], g=["a", "b"][i % 2]) for i in range(60)]
    cfg = CurationConfig.from_dict({"group_balance": {"attribute": "g"}, "seed": 7})
    a = run_pipeline(rows, cfg)
    b = run_pipeline(list(rows), cfg)
    assert a.train == b.train and a.validation == b.validation and a.content_hash() == b.content_hash()
    assert a.label_like and a.input_count == 60 and len(a.train) + len(a.validation) == 60
    assert [s.name for s in a.steps] == list(STEP_NAMES)
    assert a.weights is not None and sorted(a.weights) == list(range(len(a.train)))
    assert a.validation_weights is not None and len(a.validation_weights) == len(a.validation)
    c = run_pipeline(rows, CurationConfig.from_dict({"group_balance": {"attribute": "g"}, "seed": 8}))
    assert c.content_hash() != a.content_hash()


_DETERMINISM_SCRIPT = """
from adapters.curation import CurationConfig, Message, Row, run_pipeline
rows = [
    Row(kind="sft", prompt=(Message("user", f"how do I do thing {i % 40} {'now' if i % 3 else 'today'}"),),
        completion=f"intent_{i % 7 if i % 11 else 0}", attributes={"seg": "abc"[i % 3]})
    for i in range(150)
]
cfg = CurationConfig.from_dict({"group_balance": {"attribute": "seg"}, "label_balance": {"target_ratio": 1.5}})
print(run_pipeline(rows, cfg).content_hash())
"""


def test_same_input_gives_the_same_snapshot_in_other_processes() -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    hashes = set()
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=str(root))
        proc = subprocess.run(
            [sys.executable, "-c", _DETERMINISM_SCRIPT],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr
        hashes.add(proc.stdout.strip())
    assert len(hashes) == 1 and len(hashes.pop()) == 64
