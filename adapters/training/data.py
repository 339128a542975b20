"""Reading canonical JSONL rows and turning SFT rows into masked token sequences.

Masking rule (see DESIGN.md, the pad == ``<|im_end|>`` trap): labels are derived from *positions*,
never from token ids. Prompt positions get -100; every answer position, including the closing
end-of-turn token, carries loss. Nothing is ever masked because its id equals the pad id.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100
REQUIRED_FIELDS = {"sft": ("prompt", "completion"), "preference": ("prompt", "chosen", "rejected"),
                   "unpaired": ("prompt", "completion", "label")}
METHOD_KIND = {"sft": "sft", "dpo": "preference", "kto": "unpaired"}


def read_rows(path: str | Path, method: str) -> list[dict[str, Any]]:
    """Read the rows a method can use; errors name the file and line. Rows of other kinds are skipped
    (a snapshot may mix kinds), but a file without any usable row is an error."""
    kind = METHOD_KIND[method]
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: a row must be a JSON object")  # noqa: TRY004
            if row.get("kind", kind) != kind:
                continue
            for name in REQUIRED_FIELDS[kind]:
                if name not in row:
                    raise ValueError(f"{path}:{lineno}: {kind} row lacks field {name!r}")
            if not isinstance(row["prompt"], list) or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in row["prompt"]
            ):
                raise ValueError(f"{path}:{lineno}: prompt must be a list of {{role, content}} messages")
            weight = row.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                raise ValueError(f"{path}:{lineno}: weight must be a number >= 0, got {weight!r}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no {kind!r} rows (method {method!r} needs them)")
    return rows


@dataclass(frozen=True)
class Example:
    """One tokenised SFT example; ``prompt_len`` positions are masked, the rest carry loss.

    A ``distill`` example's answer positions are matched to the base model's whole next-token distribution
    (KL divergence) instead of its one answer token: replay rows anchored to the base model (replay.py).
    """

    input_ids: list[int]
    prompt_len: int
    weight: float = 1.0
    distill: bool = False

    @property
    def labels(self) -> list[int]:
        return [IGNORE_INDEX] * self.prompt_len + self.input_ids[self.prompt_len:]


def _messages(prompt: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]


def encode_sft(tokenizer: Any, prompt: list[dict[str, Any]], completion: str, max_seq_len: int,
               weight: float = 1.0, finished: bool = True) -> Example:
    """Tokenise prompt + answer exactly as they will be seen at inference time.

    The prompt is rendered with the generation prompt (what vLLM sends); the answer is the rest of the
    fully rendered conversation, cut right after the first end-of-turn token (SmolLM2's template adds a
    newline after ``<|im_end|>`` that the model never has to generate). If the template emits no
    end-of-turn token, the tokenizer's EOS is appended so the model still learns to stop.
    Too-long examples lose prompt tokens from the left first, so the answer survives. An answer that is
    not ``finished`` (cut at a token limit) gets no end-of-turn token: the model must not learn to stop there.
    """
    msgs = _messages(prompt)
    prompt_text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(
        msgs + [{"role": "assistant", "content": completion}], tokenize=False, add_generation_prompt=False
    )
    if not full_text.startswith(prompt_text):
        # Templates that rewrite earlier turns: fall back to the plain answer text.
        answer_text = completion
    else:
        answer_text = full_text[len(prompt_text):]
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None:
        if eos in answer_ids:
            answer_ids = answer_ids[: answer_ids.index(eos) + int(finished)]
        elif finished:
            answer_ids = answer_ids + [eos]
    if len(answer_ids) >= max_seq_len:
        answer_ids = answer_ids[: max_seq_len - 1]
    room = max_seq_len - len(answer_ids)
    if len(prompt_ids) > room:
        prompt_ids = prompt_ids[len(prompt_ids) - room:]
    return Example(input_ids=list(prompt_ids) + list(answer_ids), prompt_len=len(prompt_ids), weight=float(weight))


def encode_rows(tokenizer: Any, rows: list[dict[str, Any]], max_seq_len: int) -> list[Example]:
    return [encode_sft(tokenizer, r["prompt"], str(r["completion"]), max_seq_len, float(r.get("weight", 1.0)),
                       bool(r.get("finished", True))) for r in rows]


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int,
                  bucket_factor: int = 32) -> list[list[int]]:
    """Length-bucketed batch order for one epoch, a pure function of (seed, epoch).

    Why bucketing: on CPU every pad token costs as much as a real one. Shuffling, sorting inside
    windows of ``bucket_factor`` batches and shuffling the batches keeps padding near zero while the
    order stays random. Being a pure function makes resuming exact: a checkpoint only stores
    (epoch, batch index).
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * bucket_factor
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return batches
