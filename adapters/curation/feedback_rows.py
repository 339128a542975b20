"""Turn user feedback on logged completions into training rows.

A correction is the answer that should have been given (→ SFT row, a desirable unpaired/KTO row, and a
preference/DPO row over the answer it corrects); a rating says whether the given answer was good (→ unpaired/KTO
row, and optionally an SFT row when it is high enough); two differently rated completions of the same prompt say
which answer is better (→ preference/DPO row). Corrections are what live traffic yields most: each user asks
their own question, so two rated answers to one prompt are rare, while every correction is a ready pair.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .rows import Message, Row, RowError, parse_attributes, parse_prompt


@dataclass(frozen=True)
class FeedbackItem:
    """One completion with its feedback. ``prompt_messages`` are OpenAI-style dicts or `Message`s."""

    completion_id: str
    prompt_messages: Sequence[Mapping[str, Any] | Message]
    output: str
    rating: float | None = None
    correction: str | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rating is not None and (
            isinstance(self.rating, bool)
            or not isinstance(self.rating, (int, float))
            or not 0 <= self.rating <= 1
        ):
            raise ValueError(f"rating must be a number in [0, 1] or None, got {self.rating!r}")


def _prompt(item: FeedbackItem) -> tuple[Message, ...]:
    raw = [m.to_json() if isinstance(m, Message) else dict(m) for m in item.prompt_messages]
    try:
        return parse_prompt(raw, "prompt_messages")
    except RowError as exc:
        raise RowError(f"feedback[{item.completion_id}].{exc.field}", exc.reason) from None


def rows_from_feedback(
    items: Iterable[FeedbackItem],
    *,
    max_pairs_per_prompt: int = 10,
    sft_min_rating: float | None = None,
    skip_invalid: bool = False,
) -> list[Row]:
    """Rows in a deterministic order: per item (input order) its sft row, the unpaired row of its rating,
    the unpaired row of its correction; then preference rows per prompt (prompts in first-seen order;
    correction pairs, then rating pairs, each in input order).

    The sft row is the correction or, without one, the given answer if it was rated at least
    ``sft_min_rating`` (None: ratings never make sft rows).

    A correction that differs from the given answer is a desirable unpaired row and a preference row
    (chosen = the correction, rejected = the answer). Every pair of rated completions of one prompt with
    different ratings and different outputs becomes a preference row (higher rating = chosen, carrying the
    chosen completion's attributes). At most ``max_pairs_per_prompt`` distinct pairs per prompt. Invalid
    prompts raise `RowError`, or are skipped with ``skip_invalid``.
    """
    rows: list[Row] = []
    rated: dict[str, list[tuple[FeedbackItem, tuple[Message, ...], dict[str, str]]]] = {}
    pairs: dict[str, list[tuple[tuple[Message, ...], str, str, dict[str, str]]]] = {}
    for item in items:
        try:
            prompt = _prompt(item)
            attrs = parse_attributes(dict(item.attributes), f"feedback[{item.completion_id}].attributes")
        except RowError:
            if skip_invalid:
                continue
            raise
        if item.correction is not None and item.correction.strip():
            rows.append(Row(kind="sft", prompt=prompt, completion=item.correction, attributes=attrs))
        elif (sft_min_rating is not None and item.rating is not None and item.rating >= sft_min_rating
              and item.output.strip()):
            rows.append(Row(kind="sft", prompt=prompt, completion=item.output, attributes=attrs))
        if item.rating is not None:
            rows.append(Row(kind="unpaired", prompt=prompt, completion=item.output, label=item.rating >= 0.5,
                            attributes=attrs))
        key = json.dumps([m.to_json() for m in prompt], sort_keys=True, ensure_ascii=False)
        prompt_pairs = pairs.setdefault(key, [])  # prompts in first-seen order
        correction = (item.correction or "").strip()
        if correction and correction != item.output.strip():
            rows.append(Row(kind="unpaired", prompt=prompt, completion=item.correction, label=True, attributes=attrs))
            if item.output.strip():
                prompt_pairs.append((prompt, item.correction, item.output, attrs))
        if item.rating is not None:
            rated.setdefault(key, []).append((item, prompt, attrs))
    for key, group in rated.items():
        for a in range(len(group)):
            for b in range(a + 1, len(group)):
                (ia, prompt, aa), (ib, _, ab) = group[a], group[b]
                if ia.rating == ib.rating or ia.output == ib.output:
                    continue
                hi, lo, attrs = (ia, ib, aa) if (ia.rating or 0) > (ib.rating or 0) else (ib, ia, ab)
                pairs[key].append((prompt, hi.output, lo.output, attrs))
    for group in pairs.values():
        seen: set[tuple[str, str]] = set()
        for prompt, chosen, rejected, attrs in group:
            if len(seen) >= max_pairs_per_prompt or (chosen, rejected) in seen:
                continue
            seen.add((chosen, rejected))
            rows.append(Row(kind="preference", prompt=prompt, chosen=chosen, rejected=rejected, attributes=attrs))
    return rows
