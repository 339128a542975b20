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

The answers depend only on the base model, the prompt and the token limit, so with a ``cache_dir`` they are
generated once per base model: every later job (the next round of feedback, every search trial) reads them
back instead of spending minutes of CPU on the same greedy decoding (``<cache_dir>/<model hash>-<limit>.jsonl``).
"""

from __future__ import annotations

import json
import os
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
                seed: int, emit: Emit, should_stop: ShouldStop, prompts_path: str | Path | None = None,
                cache_dir: str | Path | None = None) -> list[dict[str, Any]] | None:
    """The replayed SFT rows (generated once, then read back from ``output_dir``); None when stopped."""
    saved = Path(output_dir) / REPLAY_FILE
    if saved.exists():
        return _read_jsonl(saved)
    prompts = load_prompts(prompts_path)
    random.Random(seed).shuffle(prompts)
    prompts = prompts[:replay_count(n_train, fraction, len(prompts))]
    if not prompts:
        return []

    from adapters.evaluation.generate import ChatEncoder

    encoder = ChatEncoder.from_path(base_model_path)
    longest_prompt = max(len(encoder.prompt_ids([{"role": "user", "content": p}])) for p in prompts)
    limit = min(MAX_NEW_TOKENS, max_seq_len - longest_prompt)
    if limit < MIN_NEW_TOKENS:
        raise ValueError(f"max_seq_len {max_seq_len} leaves {limit} answer tokens for replay; "
                         f"need at least {MIN_NEW_TOKENS} (raise max_seq_len)")
    cache = _answer_cache_path(cache_dir, base_model_path, limit) if cache_dir is not None else None
    answers = {a["prompt"]: a for a in _read_jsonl(cache)} if cache is not None and cache.exists() else {}
    cached = sum(p in answers for p in prompts)
    todo = [p for p in prompts if p not in answers]
    if todo:
        new = _generate(base_model_path, todo, limit, cached, len(prompts), emit, should_stop)
        answers.update({a["prompt"]: a for a in new})
        if cache is not None:  # what was generated is kept even if the run is cancelled now
            _write_jsonl(cache, list(answers.values()))
        if len(new) < len(todo):
            return None
    rows = [{"kind": "sft", "prompt": [{"role": "user", "content": p}], "completion": answers[p]["completion"],
             "finished": answers[p]["finished"], "source": "replay"} for p in prompts if answers[p]["completion"]]
    emit({"type": "replay", "generated": len(prompts), "total": len(prompts), "cached": cached, "rows": len(rows),
          "unfinished": sum(not r["finished"] for r in rows)})
    _write_jsonl(saved, rows)
    return rows


def _generate(base_model_path: str, prompts: list[str], limit: int, done: int, total: int, emit: Emit,
              should_stop: ShouldStop) -> list[dict[str, Any]]:
    """The base model's greedy answers, in chunks with a progress event each; stops early when asked."""
    from adapters.evaluation.generate import MergedHFGenerator

    generator = MergedHFGenerator(base_model_path, batch_size=GENERATE_CHUNK)
    answers: list[dict[str, Any]] = []
    try:
        for start in range(0, len(prompts), GENERATE_CHUNK):
            if should_stop():
                break
            chats = [[{"role": "user", "content": p}] for p in prompts[start:start + GENERATE_CHUNK]]
            for chat, answer in zip(chats, generator.generate(chats, limit), strict=True):
                # the end-of-turn token is part of answer_ids: more than `limit` means the answer was cut off
                finished = bool(answer) and len(generator.encoder.answer_ids(chat, answer)) <= limit
                answers.append({"prompt": chat[0]["content"], "completion": answer, "finished": finished})
            emit({"type": "replay", "generated": done + len(answers), "total": total})
    finally:
        generator.close()
    return answers


def _answer_cache_path(cache_dir: str | Path, base_model_path: str, limit: int) -> Path:
    from adapters.base_model import model_hash

    return Path(cache_dir) / f"{model_hash(Path(base_model_path))[:16]}-{limit}.jsonl"


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    """Atomically: a reader (a resumed run, another job) sees the old file or the new one, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
