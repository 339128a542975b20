"""Row formats: every accepted shape, canonical form, hashing, and field-naming errors."""

from __future__ import annotations

import pickle

import pytest

from adapters.curation.feedback_rows import FeedbackItem, rows_from_feedback
from adapters.curation.rows import Message, Row, RowError, parse_row

CHAT = {
    "messages": [
        {"role": "system", "content": "Classify."},
        {"role": "user", "content": "my card?"},
        {"role": "assistant", "content": "card_arrival"},
    ],
    "attributes": {"segment": "retail"},
}


def test_chat_row_splits_prompt_and_answer() -> None:
    row = parse_row(CHAT)
    assert row.kind == "sft"
    assert row.prompt == (Message("system", "Classify."), Message("user", "my card?"))
    assert row.completion == "card_arrival" and row.answer == "card_arrival"
    assert dict(row.attributes) == {"segment": "retail"}
    assert row.messages()[-1] == {"role": "assistant", "content": "card_arrival"}


def test_prompt_completion_string_prompt_becomes_a_user_message() -> None:
    row = parse_row({"prompt": "hi", "completion": "hello"})
    assert row.kind == "sft" and row.prompt == (Message("user", "hi"),) and row.completion == "hello"


def test_preference_and_unpaired_rows() -> None:
    pref = parse_row({"prompt": [{"role": "user", "content": "q"}], "chosen": "good", "rejected": "bad"})
    assert (pref.kind, pref.chosen, pref.rejected, pref.answers()) == (
        "preference",
        "good",
        "bad",
        ("good", "bad"),
    )
    conv = parse_row({"prompt": "q", "chosen": [{"role": "assistant", "content": "g"}], "rejected": "b"})
    assert conv.chosen == "g"
    unpaired = parse_row({"prompt": "q", "completion": "a", "label": False})
    assert unpaired.kind == "unpaired" and unpaired.label is False


def test_round_trip_and_hash_ignores_attributes() -> None:
    for obj in (
        CHAT,
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "completion": "a", "label": True},
    ):
        row = parse_row(obj)
        assert Row.from_json(row.to_json()) == row
        assert parse_row(row.to_json()).content_hash == row.content_hash
    a = parse_row(CHAT)
    b = a.replace(attributes={"segment": "business"})
    c = a.replace(completion="card_linking")
    assert a.content_hash == b.content_hash != c.content_hash
    assert len(a.content_hash) == 64
    assert pickle.loads(pickle.dumps(a)) == a
    assert len({a, b, a.replace()}) == 2  # hashable; attributes are part of equality


def test_row_is_immune_to_caller_mutating_attributes() -> None:
    attrs = {"k": "v"}
    row = Row(kind="sft", prompt=(Message("user", "q"),), completion="a", attributes=attrs)
    attrs["k"] = "changed"
    assert row.attributes["k"] == "v"


@pytest.mark.parametrize(
    ("obj", "field", "fragment"),
    [
        ([], "$", "JSON object"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "a"}]},
            "messages[1].role",
            "assistant",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
            "messages[1].role",
            "one of",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]},
            "messages[1].content",
            "string",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]},
            "messages[1].content",
            "missing",
        ),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "messages", "prompt"),
        ({"messages": []}, "messages", "empty"),
        ({"messages": "hi"}, "messages", "array"),
        (
            {
                "messages": [
                    {"role": "user", "content": "q", "tool_calls": []},
                    {"role": "assistant", "content": "a"},
                ]
            },
            "messages[0].tool_calls",
            "unsupported",
        ),
        ({"prompt": "q"}, "completion", "missing"),
        ({"prompt": 5, "completion": "a"}, "prompt", "string or an array"),
        ({"prompt": [{"role": "assistant", "content": "x"}], "completion": "a"}, "prompt[0].role", "user"),
        ({"prompt": "q", "chosen": "a"}, "rejected", "missing"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "label": True}, "label", "preference"),
        ({"prompt": "q", "completion": "a", "label": "yes"}, "label", "true or false"),
        ({"prompt": "q", "completion": "a", "extra": 1}, "extra", "unknown key"),
        ({"completion": "a"}, "messages", "missing"),
        ({"prompt": "q", "completion": "a", "attributes": {"k": 1}}, "attributes.k", "string"),
        ({"prompt": "q", "completion": "a", "attributes": {"k": "v" * 65}}, "attributes.k", "64"),
        (
            {"prompt": "q", "completion": "a", "attributes": {f"k{i}": "v" for i in range(17)}},
            "attributes",
            "16",
        ),
        ({"prompt": "q", "completion": "a", "attributes": ["x"]}, "attributes", "object"),
    ],
)
def test_errors_name_the_field(obj: object, field: str, fragment: str) -> None:
    with pytest.raises(RowError) as info:
        parse_row(obj)
    assert info.value.field == field
    assert fragment in info.value.reason
    assert pickle.loads(pickle.dumps(info.value)) == info.value


def test_feedback_rows_corrections_ratings_and_pairs() -> None:
    prompt = [{"role": "user", "content": "where is my card?"}]
    items = [
        FeedbackItem(
            "c1", prompt, "no idea", rating=0.0, correction="card_arrival", attributes={"segment": "a"}
        ),
        FeedbackItem("c2", prompt, "card_arrival", rating=1.0, attributes={"segment": "b"}),
        FeedbackItem("c3", prompt, "card_arrival", rating=0.8),  # same output as c2: no pair with c2
        FeedbackItem("c4", [Message("user", "other")], "x", rating=None, correction=None),
    ]
    rows = rows_from_feedback(items)
    kinds = [r.kind for r in rows]
    # c1: its correction (sft), its rated answer, the correction as a desirable answer; c2, c3: rated answers;
    # one preference row: c1's correction over its answer, the same pair c2 over c1 gives, kept once
    assert kinds == ["sft", "unpaired", "unpaired", "unpaired", "unpaired", "preference"]
    sft = rows[0]
    assert sft.completion == "card_arrival" and dict(sft.attributes) == {"segment": "a"}
    assert [(r.completion, r.label) for r in rows[1:5]] == [("no idea", False), ("card_arrival", True),
                                                            ("card_arrival", True), ("card_arrival", True)]
    (pref,) = rows[5:]
    assert (pref.chosen, pref.rejected) == ("card_arrival", "no idea")
    assert dict(pref.attributes) == {"segment": "a"}  # the correction's item (c1) comes first
    assert all(r.prompt == (Message("user", "where is my card?"),) for r in rows)


def test_a_correction_is_a_preference_pair_even_without_ratings() -> None:
    """Live traffic rarely rates two answers to one prompt; a correction alone must give DPO and KTO rows."""
    items = [
        FeedbackItem("c1", [{"role": "user", "content": "q1"}], "wrong", correction="right"),
        FeedbackItem("c2", [{"role": "user", "content": "q2"}], "same", correction=" same "),  # no disagreement
        FeedbackItem("c3", [{"role": "user", "content": "q3"}], "", correction="right"),  # nothing to reject
        FeedbackItem("c4", [{"role": "user", "content": "q1"}], "other", rating=0.0, correction="right"),
    ]
    rows = rows_from_feedback(items, max_pairs_per_prompt=1)
    prefs = [(r.prompt[0].content, r.chosen, r.rejected) for r in rows if r.kind == "preference"]
    assert prefs == [("q1", "right", "wrong")]  # capped at one pair for q1
    assert len(rows_from_feedback(items)) - len(rows) == 1  # the cap was what dropped c4's pair
    desirable = [(r.prompt[0].content, r.completion) for r in rows if r.kind == "unpaired" and r.label]
    assert desirable == [("q1", "right"), ("q3", "right"), ("q1", "right")]


def test_feedback_invalid_prompt_raises_or_is_skipped() -> None:
    bad = FeedbackItem("bad1", [{"role": "tool", "content": "x"}], "y", rating=1.0)
    good = FeedbackItem("ok", [{"role": "user", "content": "q"}], "y", rating=1.0)
    with pytest.raises(RowError) as info:
        rows_from_feedback([bad, good])
    assert info.value.field.startswith("feedback[bad1].prompt_messages[0].role")
    assert [r.kind for r in rows_from_feedback([bad, good], skip_invalid=True)] == ["unpaired"]
    with pytest.raises(ValueError, match="rating"):
        FeedbackItem("x", [], "y", rating=1.5)


def test_well_rated_answers_become_sft_rows_only_when_asked() -> None:
    prompt = [{"role": "user", "content": "where is my card?"}]
    items = [
        FeedbackItem("c1", prompt, "card_arrival", rating=1.0, attributes={"segment": "a"}),
        FeedbackItem("c2", prompt, "card_delivery_estimate", rating=0.6),
        FeedbackItem("c3", prompt, "lost_or_stolen_card", rating=0.0, correction="card_arrival"),
        FeedbackItem("c4", prompt, "   ", rating=1.0),  # an empty answer teaches nothing
    ]
    assert [r.kind for r in rows_from_feedback(items)].count("sft") == 1  # the correction only
    rows = rows_from_feedback(items, sft_min_rating=0.8)
    sft = [r for r in rows if r.kind == "sft"]
    # c1 by its rating (its attributes kept), c3 by its correction (a corrected answer is never taught)
    assert [(r.completion, dict(r.attributes)) for r in sft] == [("card_arrival", {"segment": "a"}),
                                                                  ("card_arrival", {})]
    assert [r.completion for r in rows_from_feedback(items, sft_min_rating=0.5) if r.kind == "sft"] == [
        "card_arrival", "card_delivery_estimate", "card_arrival"]
