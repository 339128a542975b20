"""Answer choices: config validation, the token trie that constrains transformers decoding, and the
gateway's request rewrite (the real-vLLM and real-model halves are in the integration tests)."""

from __future__ import annotations

import pytest

from adapters.evaluation.choices import ChoiceTrie, validate_choices
from service.core.gateway import Gateway


def test_validate_choices_accepts_a_list_of_unique_strings() -> None:
    assert validate_choices(["card_arrival", "exchange_rate"]) == ("card_arrival", "exchange_rate")


@pytest.mark.parametrize(("value", "message"), [
    ("card_arrival", "a list of 2"),
    (["only_one"], "a list of 2"),
    (["a", 3], r"answer_choices\[1\] must be a non-empty string"),
    (["a", ""], r"answer_choices\[1\] must be a non-empty string"),
    (["a", " b"], r"answer_choices\[1\] has leading or trailing whitespace"),
    (["a", "b", "a"], r"answer_choices\[2\] repeats 'a'"),
])
def test_validate_choices_names_the_bad_item(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate_choices(value)


def test_trie_allows_only_continuations_of_some_choice_then_stop() -> None:
    stop = 9
    trie = ChoiceTrie([[1, 2, stop], [1, 3, stop], [4, stop], [4, 5, stop]], [stop])
    assert sorted(trie.allowed([])) == [1, 4]
    assert sorted(trie.allowed([1])) == [2, 3]
    assert trie.allowed([1, 2]) == [stop]
    assert sorted(trie.allowed([4])) == [5, stop]  # "4" is complete and also a prefix of "4 5"
    assert trie.allowed([1, 2, stop]) == [stop]  # finished: only padding-compatible stop tokens
    assert trie.allowed([7]) == [stop]  # off the trie (cannot happen under the constraint): stop


def test_gateway_adds_the_deployments_choices_unless_the_request_constrains_itself() -> None:
    gw = Gateway(None, None, None, {"router", "chat"}, {"router": ("card_arrival", "exchange_rate")})  # type: ignore[arg-type]
    body = {"model": "router", "messages": [{"role": "user", "content": "hi"}], "metadata": {"a": "b"}}
    up = gw._upstream("router", body, "router--adp-1", stream=False)
    assert up["structured_outputs"] == {"choice": ["card_arrival", "exchange_rate"]}
    assert up["model"] == "router--adp-1" and "metadata" not in up and up["stream"] is False
    own = {**body, "structured_outputs": {"choice": ["x", "y"]}}
    assert gw._upstream("router", own, "base", stream=True)["structured_outputs"] == {"choice": ["x", "y"]}
    assert "structured_outputs" not in gw._upstream("router", {**body, "response_format": {"type": "json_object"}},
                                                    "base", stream=False)
    assert "structured_outputs" not in gw._upstream("chat", {**body, "model": "chat"}, "base", stream=False)
