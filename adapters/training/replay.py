"""Self-replay against forgetting: the base model's own answers to general prompts, mixed into SFT rows.

An adapter trained only on a narrow task (Banking77's bare intent names) drifts away from the base model
everywhere else; the retention suite sees it as a rise in the NLL of reference answers. The usual cure is
to replay general data. This machine holds no general chat dataset, so the replayed rows are the base
model's own greedy answers to bundled generic prompts (``adapters/data/replay_prompts.jsonl``, written for
this purpose, outside any task domain): training on them anchors the adapter to the base model's behaviour
outside the task at no labelling cost.

With ``replay_objective="kl"`` (sft.py) the replayed answers serve only as the text on which the adapter's
next-token distribution is pulled towards the base model's (KL divergence over the whole vocabulary), which
carries far more of the base model's behaviour per token than its one greedy choice.

``replay_fraction`` is the share of replayed rows in the mixed training set: ``k / (n + k)``. Answers that
hit the token limit are kept as ``finished: false`` rows: they train the continuation but not an end-of-turn
(dropping them would teach shorter answers, itself a kind of forgetting). The rows are written to
``output_dir/replay.jsonl`` and reused on resume, so a resumed run trains on the same data.
"""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path
from typing import Any

from adapters.training.common import Emit, ShouldStop

REPLAY_FILE = "replay.jsonl"
MAX_NEW_TOKENS = 128
MIN_NEW_TOKENS = 16
GENERATE_CHUNK = 32  # prompts per batch, progress event and cancel check


def default_prompts_path() -> Path:
    return Path(str(resources.files("adapters") / "data" / "replay_prompts.jsonl"))


def load_prompts(path: str | Path | None = None) -> list[str]:
    p = Path(path) if path is not None else default_prompts_path()
    prompts = [json.loads(line)["prompt"] for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{p}: no replay prompts")
    return prompts


def replay_count(n_train: int, fraction: float, available: int) -> int:
    """How many rows to replay so that they make up ``fraction`` of the mix (capped by the prompts)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"replay fraction must be in [0, 1), got {fraction}")
    return min(available, round(n_train * fraction / (1 - fraction)))


def replay_rows(base_model_path: str, output_dir: str | Path, n_train: int, fraction: float, max_seq_len: int,
                seed: int, emit: Emit, should_stop: ShouldStop, prompts_path: str | Path | None = None
                ) -> list[dict[str, Any]] | None:
    """The replayed SFT rows (generated once, then read back from ``output_dir``); None when stopped."""
    cached = Path(output_dir) / REPLAY_FILE
    if cached.exists():
        return [json.loads(line) for line in cached.read_text(encoding="utf-8").splitlines() if line.strip()]
    prompts = load_prompts(prompts_path)
    random.Random(seed).shuffle(prompts)
    prompts = prompts[:replay_count(n_train, fraction, len(prompts))]
    if not prompts:
        return []

    from adapters.evaluation.generate import MergedHFGenerator

    generator = MergedHFGenerator(base_model_path, batch_size=GENERATE_CHUNK)
    chats = [[{"role": "user", "content": p}] for p in prompts]
    rows: list[dict[str, Any]] = []
    try:
        longest_prompt = max(len(generator.encoder.prompt_ids(c)) for c in chats)
        limit = min(MAX_NEW_TOKENS, max_seq_len - longest_prompt)
        if limit < MIN_NEW_TOKENS:
            raise ValueError(f"max_seq_len {max_seq_len} leaves {limit} answer tokens for replay; "
                             f"need at least {MIN_NEW_TOKENS} (raise max_seq_len)")
        for start in range(0, len(chats), GENERATE_CHUNK):
            if should_stop():
                return None
            chunk = chats[start:start + GENERATE_CHUNK]
            for chat, answer in zip(chunk, generator.generate(chunk, limit), strict=True):
                if answer:  # the end-of-turn token is part of answer_ids: more than `limit` means cut off
                    finished = len(generator.encoder.answer_ids(chat, answer)) <= limit
                    rows.append({"kind": "sft", "prompt": chat, "completion": answer, "finished": finished,
                                 "source": "replay"})
            emit({"type": "replay", "generated": min(start + GENERATE_CHUNK, len(chats)), "total": len(chats),
                  "rows": len(rows), "unfinished": sum(not r["finished"] for r in rows)})
    finally:
        generator.close()
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(cached)
    return rows
