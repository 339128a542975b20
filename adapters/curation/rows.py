"""Training-row formats: the one canonical `Row` every curation step and trainer reads.

Uploads arrive in several common shapes (OpenAI chat fine-tuning, prompt/completion, TRL preference
and unpaired/KTO rows). Parsing them once into a frozen `Row` means the rest of the pipeline never
branches on the input shape, and `content_hash` gives snapshots a stable content address.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

RowKind = Literal["sft", "preference", "unpaired"]
ROLES = ("system", "user", "assistant")
MAX_ATTRIBUTES = 16
MAX_ATTRIBUTE_CHARS = 64
# Optional per-message keys of the OpenAI chat format that carry no content we train on.
_IGNORED_MESSAGE_KEYS = frozenset({"name", "weight"})
_TOP_LEVEL_KEYS = frozenset({"messages", "prompt", "completion", "chosen", "rejected", "label", "attributes"})


class RowError(ValueError):
    """A row that cannot be used, with the JSON path of the offending field (e.g. ``messages[2].role``)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason

    def __eq__(self, other: object) -> bool:  # value semantics, so parsed streams can be compared
        if not isinstance(other, RowError):
            return NotImplemented
        return (self.field, self.reason) == (other.field, other.reason)

    def __hash__(self) -> int:
        return hash((self.field, self.reason))

    def __reduce__(self) -> tuple[Any, ...]:  # keep field/reason through pickling (worker processes)
        return (RowError, (self.field, self.reason))

    def to_json(self) -> dict[str, str]:
        return {"field": self.field, "reason": self.reason}


@dataclass(frozen=True)
class Message:
    """One chat message; only the three roles a chat template renders for training."""

    role: Literal["system", "user", "assistant"]
    content: str

    def to_json(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Row:
    """A curated training row.

    ``prompt`` is always canonical chat messages (a string prompt becomes one user message), so a
    chat template can render every row the same way. Exactly the fields of ``kind`` are set:
    sft → ``completion``; preference → ``chosen``/``rejected``; unpaired → ``completion`` + ``label``.
    """

    kind: RowKind
    prompt: tuple[Message, ...]
    completion: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    label: bool | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Copy so a caller mutating its dict cannot change a frozen row (and its hash) later.
        object.__setattr__(self, "attributes", dict(self.attributes))

    def __hash__(self) -> int:
        return hash((self.content_hash, tuple(sorted(self.attributes.items()))))

    # -- views -------------------------------------------------------------------------------
    def answers(self) -> tuple[str, ...]:
        """The answer texts of the row (one for sft/unpaired, chosen+rejected for preference)."""
        if self.kind == "preference":
            return (self.chosen or "", self.rejected or "")
        return (self.completion or "",)

    @property
    def answer(self) -> str:
        """The answer the model should give: completion, or chosen for preference rows."""
        return self.chosen or "" if self.kind == "preference" else self.completion or ""

    def prompt_text(self) -> str:
        """All prompt message contents joined by newlines (for similarity and length checks)."""
        return "\n".join(m.content for m in self.prompt)

    def messages(self) -> list[dict[str, str]]:
        """The full conversation (prompt + answer) as OpenAI-style dicts, e.g. for a chat template."""
        return [m.to_json() for m in self.prompt] + [{"role": "assistant", "content": self.answer}]

    # -- serialisation -----------------------------------------------------------------------
    def to_json(self, *, with_attributes: bool = True) -> dict[str, Any]:
        """Canonical JSON; `parse_row(row.to_json()) == row` (kind is implied by the keys)."""
        out: dict[str, Any] = {"prompt": [m.to_json() for m in self.prompt]}
        if self.kind == "preference":
            out["chosen"] = self.chosen
            out["rejected"] = self.rejected
        else:
            out["completion"] = self.completion
            if self.kind == "unpaired":
                out["label"] = self.label
        if with_attributes and self.attributes:
            out["attributes"] = dict(sorted(self.attributes.items()))
        return out

    @classmethod
    def from_json(cls, d: Any) -> Row:
        return parse_row(d)

    @property
    def content_hash(self) -> str:
        """sha256 of the canonical JSON without attributes: equal content ⇒ equal hash."""
        cached = self.__dict__.get("_content_hash")
        if cached is None:
            canonical = json.dumps(
                self.to_json(with_attributes=False), sort_keys=True, ensure_ascii=False, separators=(",", ":")
            )
            cached = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
            object.__setattr__(self, "_content_hash", cached)
        return cached

    def replace(self, **changes: Any) -> Row:
        """A copy with some fields changed (the content hash is recomputed)."""
        return dataclasses.replace(self, **changes)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _parse_message(obj: Any, path: str) -> Message:
    if not isinstance(obj, dict):
        raise RowError(path, f"expected a message object, got {_type_name(obj)}")
    unknown = sorted(set(obj) - {"role", "content"} - _IGNORED_MESSAGE_KEYS)
    if unknown:
        raise RowError(
            f"{path}.{unknown[0]}", "unsupported message key (allowed: role, content, name, weight)"
        )
    if "role" not in obj:
        raise RowError(f"{path}.role", "missing")
    role = obj["role"]
    if role not in ROLES:
        raise RowError(f"{path}.role", f"must be one of {', '.join(ROLES)}, got {json.dumps(role)[:40]}")
    if "content" not in obj:
        raise RowError(f"{path}.content", "missing")
    content = obj["content"]
    if isinstance(content, list):  # OpenAI content parts: only text parts carry training text
        texts = []
        for i, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise RowError(
                    f"{path}.content[{i}]", 'only {"type": "text", "text": str} parts are supported'
                )
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise RowError(f"{path}.content", f"expected a string, got {_type_name(content)}")
    return Message(role=role, content=content)


def _parse_messages(value: Any, path: str) -> tuple[Message, ...]:
    if not isinstance(value, list):
        raise RowError(path, f"expected an array of messages, got {_type_name(value)}")
    if not value:
        raise RowError(path, "must not be empty")
    return tuple(_parse_message(m, f"{path}[{i}]") for i, m in enumerate(value))


def _check_prompt(prompt: tuple[Message, ...], path: str) -> None:
    # The answer follows the prompt, so the prompt must end with the user's turn.
    if prompt[-1].role != "user":
        raise RowError(f"{path}[{len(prompt) - 1}].role", "the prompt's last message must be a user message")


def parse_prompt(value: Any, path: str = "prompt") -> tuple[Message, ...]:
    if isinstance(value, str):
        return (Message(role="user", content=value),)
    if isinstance(value, list):
        prompt = _parse_messages(value, path)
        _check_prompt(prompt, path)
        return prompt
    raise RowError(path, f"expected a string or an array of messages, got {_type_name(value)}")


def _parse_answer(value: Any, path: str) -> str:
    """An answer is a string, or (TRL conversational style) a list holding one assistant message."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        msgs = _parse_messages(value, path)
        if len(msgs) != 1 or msgs[0].role != "assistant":
            raise RowError(path, "a message-list answer must be exactly one assistant message")
        return msgs[0].content
    raise RowError(path, f"expected a string, got {_type_name(value)}")


def parse_attributes(value: Any, path: str = "attributes") -> dict[str, str]:
    """Bounded str→str labels (they become Prometheus/report group labels, so keep them small)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RowError(path, f"expected an object of strings, got {_type_name(value)}")
    if len(value) > MAX_ATTRIBUTES:
        raise RowError(path, f"at most {MAX_ATTRIBUTES} keys allowed, got {len(value)}")
    out: dict[str, str] = {}
    for key, val in value.items():
        if not key or len(key) > MAX_ATTRIBUTE_CHARS:
            raise RowError(
                f"{path}.{key[:MAX_ATTRIBUTE_CHARS]}", f"key must be 1..{MAX_ATTRIBUTE_CHARS} characters"
            )
        if not isinstance(val, str):
            raise RowError(f"{path}.{key}", f"expected a string, got {_type_name(val)}")
        if len(val) > MAX_ATTRIBUTE_CHARS:
            raise RowError(f"{path}.{key}", f"value must be at most {MAX_ATTRIBUTE_CHARS} characters")
        out[key] = val
    return out


def parse_row(obj: Any) -> Row:
    """Parse one uploaded JSON object into a `Row`; raises `RowError` naming the bad field."""
    if not isinstance(obj, dict):
        raise RowError("$", f"expected a JSON object, got {_type_name(obj)}")
    unknown = sorted(set(obj) - _TOP_LEVEL_KEYS)
    if unknown:
        raise RowError(unknown[0], "unknown key (allowed: " + ", ".join(sorted(_TOP_LEVEL_KEYS)) + ")")
    attributes = parse_attributes(obj.get("attributes"))
    label = obj.get("label")
    if "label" in obj and not isinstance(label, bool):
        raise RowError("label", f"expected true or false, got {_type_name(label)}")

    if "messages" in obj:
        extra = sorted({"prompt", "completion", "chosen", "rejected"} & set(obj))
        if extra:
            raise RowError(extra[0], "not allowed together with messages")
        msgs = _parse_messages(obj["messages"], "messages")
        if msgs[-1].role != "assistant":
            raise RowError(
                f"messages[{len(msgs) - 1}].role", "the last message must be the assistant's answer"
            )
        if len(msgs) < 2:
            raise RowError("messages", "need a prompt before the assistant's answer")
        prompt = msgs[:-1]
        _check_prompt(prompt, "messages")
        kind: RowKind = "unpaired" if label is not None else "sft"
        return Row(kind=kind, prompt=prompt, completion=msgs[-1].content, label=label, attributes=attributes)

    if "prompt" not in obj:
        raise RowError(
            "messages", "missing: a row needs messages, or prompt with completion or chosen/rejected"
        )
    prompt = parse_prompt(obj["prompt"])
    if "chosen" in obj or "rejected" in obj:
        for name in ("chosen", "rejected"):
            if name not in obj:
                raise RowError(name, "missing (preference rows need chosen and rejected)")
        if "completion" in obj:
            raise RowError("completion", "not allowed in a preference row (chosen/rejected)")
        if label is not None:
            raise RowError("label", "not allowed in a preference row (chosen/rejected)")
        return Row(
            kind="preference",
            prompt=prompt,
            chosen=_parse_answer(obj["chosen"], "chosen"),
            rejected=_parse_answer(obj["rejected"], "rejected"),
            attributes=attributes,
        )
    if "completion" not in obj:
        raise RowError("completion", "missing (or give chosen and rejected for a preference row)")
    completion = _parse_answer(obj["completion"], "completion")
    kind = "unpaired" if label is not None else "sft"
    return Row(kind=kind, prompt=prompt, completion=completion, label=label, attributes=attributes)
