"""The SFT recipe on the real SmolLM2-135M-Instruct with Banking77 rows: validation loss falls; replay mixes
the base model's own answers in."""

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters.training.config import Hyperparameters, TrainingJobSpec
from adapters.training.replay import REPLAY_FILE, load_prompts, replay_rows
from adapters.training.sft import train_sft

REPO = Path(__file__).resolve().parents[2]
SMOL = REPO / "var" / "models" / "SmolLM2-135M-Instruct"
BANKING = REPO.parent / "shared" / "datasets" / "banking77" / "train.csv"
pytestmark = pytest.mark.slow


def _banking_rows(n: int, seed: int = 1) -> list[dict]:
    with open(BANKING, newline="", encoding="utf-8") as fh:
        data = list(csv.DictReader(fh))
    random.Random(seed).shuffle(data)
    return [{"kind": "sft", "prompt": [{"role": "user", "content": r["text"]}], "completion": r["category"]}
            for r in data[:n]]


def test_validation_loss_falls_on_banking77_in_fp32_and_bf16(tmp_path: Path) -> None:
    """Both precisions learn, and bf16 (frozen base in bfloat16, bf16 autocast) tracks the fp32 run closely while
    the adapter it saves stays fp32, so serving and merging get exactly the weights it trained."""
    torch.set_num_threads(2)
    rows = _banking_rows(48, seed=0)
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:40]))
    (tmp_path / "val.jsonl").write_text("\n".join(json.dumps(r) for r in rows[40:]))
    curves = {}
    for precision in ("fp32", "bf16"):
        spec = TrainingJobSpec(
            method="sft", base_model_path=str(SMOL), train_path=str(tmp_path / "train.jsonl"),
            validation_path=str(tmp_path / "val.jsonl"), output_dir=str(tmp_path / precision), eval_every_steps=2,
            hyperparameters=Hyperparameters(n_epochs=1, batch_size=8, learning_rate=1e-3, lora_r=8, lora_alpha=16,
                                            target_modules=["q_proj", "v_proj", "o_proj"], warmup_ratio=0.0,
                                            precision=precision),
        )
        events: list[dict] = []
        result = train_sft(spec, emit=events.append)
        vals = [e["val_loss"] for e in events if e["type"] == "validation"]
        assert result.status == "succeeded" and len(vals) == 3  # steps 2, 4 and the last (5)
        assert result.metrics["precision"] == precision
        assert vals[-1] < 0.92 * vals[0]  # measured (fp32): 4.73 -> 4.17 nats per answer token
        weights = load_file(str(tmp_path / precision / "adapter" / "adapter_model.safetensors"))
        assert weights and all(w.dtype == torch.float32 for w in weights.values())
        curves[precision] = vals
    assert curves["bf16"] == pytest.approx(curves["fp32"], rel=0.03)


@pytest.mark.parametrize("objective", ["answers", "kl"])
def test_replay_mixes_the_base_models_own_answers_in(tmp_path: Path, objective: str) -> None:
    torch.set_num_threads(2)
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in _banking_rows(24)))
    spec = TrainingJobSpec(
        method="sft", base_model_path=str(SMOL), train_path=str(tmp_path / "train.jsonl"),
        output_dir=str(tmp_path / "out"),
        hyperparameters=Hyperparameters(n_epochs=1, batch_size=8, max_steps=1, max_seq_len=256, lora_r=4,
                                        lora_alpha=8, target_modules=["q_proj"], replay_fraction=0.25,
                                        replay_objective=objective),
    )
    events: list[dict] = []
    result = train_sft(spec, emit=events.append)

    cached = tmp_path / "out" / REPLAY_FILE
    replayed = [json.loads(line) for line in cached.read_text().splitlines()]
    progress = [e for e in events if e["type"] == "replay"]
    assert progress[-1]["total"] == 8 == len(replayed)  # 24 task rows, a quarter of the mix: 8 prompts
    assert progress[-1]["unfinished"] == sum(not r["finished"] for r in replayed)
    assert result.status == "succeeded"
    assert (result.metrics["train_rows"], result.metrics["replay_rows"]) == (24 + len(replayed), len(replayed))
    bundled = set(load_prompts())
    for row in replayed:
        assert row["prompt"][0]["content"] in bundled and row["completion"].strip()
    # A resumed run trains on the same rows: they are read back, not generated again (nor cancelled).
    again = replay_rows(str(SMOL), tmp_path / "out", 24, 0.25, 256, 0, events.append, lambda: True)
    assert again == replayed


def test_replayed_answers_are_generated_once_per_base_model(tmp_path: Path) -> None:
    """With a cache directory a later job reads the base model's answers back; one that needs more prompts
    generates only the missing ones, and one that is being cancelled still gets rows that need no generating."""
    torch.set_num_threads(2)
    cache = tmp_path / "cache"

    def run(job: str, n_train: int, stop: bool) -> tuple[list[dict] | None, list[dict]]:
        events: list[dict] = []
        rows = replay_rows(str(SMOL), tmp_path / job, n_train, 0.25, 128, 0, events.append, lambda: stop,
                           cache_dir=cache)
        return rows, events

    first, events = run("job-1", 6, stop=False)  # 6 task rows: 2 prompts
    assert events[-1]["cached"] == 0 and events[-1]["total"] == 2 and first
    assert len(list(cache.glob("*.jsonl"))) == 1
    again, events = run("job-2", 6, stop=True)
    assert again == first and len(events) == 1 and events[0]["cached"] == 2 and "rows" in events[0]  # no generating
    more, events = run("job-3", 12, stop=False)  # 4 prompts: the same shuffle, so the first 2 are the cached ones
    generated = [e for e in events if "rows" not in e]
    assert events[-1]["cached"] == 2 and generated == [{"type": "replay", "generated": 4, "total": 4}]
    assert more[:len(first)] == first and len(next(cache.glob("*.jsonl")).read_text().splitlines()) == 4


def test_a_cancel_during_replay_generation_trains_nothing(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in _banking_rows(8)))
    spec = TrainingJobSpec(method="sft", base_model_path=str(SMOL), train_path=str(tmp_path / "train.jsonl"),
                           output_dir=str(tmp_path / "out"), hyperparameters=Hyperparameters(replay_fraction=0.5))
    result = train_sft(spec, should_stop=lambda: True)
    assert result.status == "cancelled" and not (tmp_path / "out" / REPLAY_FILE).exists()
    assert not (tmp_path / "out" / "adapter").exists()
