"""The shared prompt prefix that batched evaluation prefills once (adapters/evaluation/generate.py)."""

from adapters.evaluation.generate import _common_prefix_len


def test_common_prefix_stops_at_first_difference() -> None:
    assert _common_prefix_len([[1, 2, 3, 9], [1, 2, 4, 9], [1, 2, 3]], keep=1) == 2


def test_common_prefix_leaves_keep_tokens_of_the_shortest() -> None:
    assert _common_prefix_len([[1, 2, 3], [1, 2, 3, 4, 5]], keep=1) == 2
    assert _common_prefix_len([[1, 2, 3], [1, 2, 3, 4, 5]], keep=3) == 0


def test_no_common_prefix() -> None:
    assert _common_prefix_len([[5, 1], [6, 1]], keep=1) == 0
    assert _common_prefix_len([], keep=1) == 0
