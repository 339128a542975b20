"""Answer choices: decoding constrained to a closed set of answers (an intent router's labels).

A deployment whose answers must be one of N strings names them (`config.answer_choices`). The gateway then
asks vLLM for structured output (`{"structured_outputs": {"choice": [...]}}`, grammar-constrained by its
xgrammar/guidance backend), and evaluation constrains its own generation the same way, so the numbers an
evaluation reports are the numbers users get. For the transformers backend that is a token trie fed to
``generate(prefix_allowed_tokens_fn=...)``: each choice is tokenised exactly as the assistant turn is in
training (the chat template's answer tokens, end-of-turn included), which is the spelling a fine-tuned
adapter prefers; vLLM's grammar admits every spelling of the string, so the two agree on what greedy picks
whenever the model follows its training spelling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MAX_CHOICES = 2000
MAX_CHOICE_CHARS = 256


def validate_choices(value: Any) -> tuple[str, ...]:
    """The choices as a tuple, or ValueError naming what is wrong (a list of 2+ unique non-empty strings)."""
    if not isinstance(value, list) or not (2 <= len(value) <= MAX_CHOICES):
        raise ValueError(f"answer_choices must be a list of 2 to {MAX_CHOICES} strings")
    seen: set[str] = set()
    for i, c in enumerate(value):
        if not isinstance(c, str) or not c.strip() or len(c) > MAX_CHOICE_CHARS:
            raise ValueError(f"answer_choices[{i}] must be a non-empty string of at most {MAX_CHOICE_CHARS} characters")
        if c != c.strip():
            raise ValueError(f"answer_choices[{i}] has leading or trailing whitespace ({c!r}); answers are stripped")
        if c in seen:
            raise ValueError(f"answer_choices[{i}] repeats {c!r}")
        seen.add(c)
    return tuple(value)


class ChoiceTrie:
    """Allowed next tokens after a generated prefix, over the token sequences of the choices."""

    def __init__(self, sequences: Sequence[Sequence[int]], stop_ids: Sequence[int]) -> None:
        if not sequences:
            raise ValueError("no choices")
        self.root: dict[int, dict[Any, Any]] = {}
        for seq in sequences:
            node = self.root
            for tok in seq:
                node = node.setdefault(int(tok), {})
        self.stop_ids = [int(t) for t in stop_ids]

    def allowed(self, prefix: Sequence[int]) -> list[int]:
        """Tokens that keep ``prefix`` on a path to a complete choice; only stop tokens once one is complete."""
        node = self.root
        for tok in prefix:
            child = node.get(int(tok))
            if child is None:  # finished (a stop token was produced; the rest is padding) or off-trie
                return self.stop_ids
            node = child
        return list(node) or self.stop_ids
