"""Turn canonical dataset rows into evaluation examples (chat prompt, reference answer, attributes).

Only rows that carry a reference answer can be scored: ``kind == "sft"`` (or no kind) rows with a
``completion``. Other kinds (DPO pairs, KTO ratings) are skipped and counted, never guessed at.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Message = dict[str, str]


@dataclass(frozen=True)
class EvalExample:
    prompt: list[Message]
    answer: str
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt_text(self) -> str:
        """The last user turn: what a reader of the report needs to see."""
        for m in reversed(self.prompt):
            if m.get("role") == "user":
                return str(m.get("content", ""))
        return str(self.prompt[-1].get("content", "")) if self.prompt else ""


def to_examples(rows: Iterable[Mapping[str, Any]]) -> tuple[list[EvalExample], int]:
    """Parse rows; returns (examples, number of skipped rows). Raises ValueError on a malformed SFT row."""
    out: list[EvalExample] = []
    skipped = 0
    for i, row in enumerate(rows):
        if row.get("kind", "sft") != "sft":
            skipped += 1
            continue
        prompt = row.get("prompt")
        if isinstance(prompt, str):
            messages = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list) and prompt and all(isinstance(m, Mapping) for m in prompt):
            messages = [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]
        else:
            raise ValueError(f"row {i}: field 'prompt' must be a string or a non-empty list of messages")
        completion = row.get("completion")
        if isinstance(completion, list):  # conversational completion: the assistant turn(s)
            completion = "".join(str(m.get("content", "")) for m in completion if isinstance(m, Mapping))
        if not isinstance(completion, str):
            raise ValueError(f"row {i}: field 'completion' must be a string")  # noqa: TRY004 (validation error)
        attrs = row.get("attributes") or {}
        if not isinstance(attrs, Mapping):
            raise ValueError(f"row {i}: field 'attributes' must be an object")  # noqa: TRY004 (validation error)
        out.append(EvalExample(messages, completion, dict(attrs)))
    return out, skipped
