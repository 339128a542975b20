"""The SFT recipe on the real SmolLM2-135M-Instruct with ~40 Banking77 rows: validation loss falls."""

import csv
import json
import random
from pathlib import Path

import pytest
import torch

from adapters.training.config import Hyperparameters, TrainingJobSpec
from adapters.training.sft import train_sft

REPO = Path(__file__).resolve().parents[2]
SMOL = REPO / "var" / "models" / "SmolLM2-135M-Instruct"
BANKING = REPO.parent / "shared" / "datasets" / "banking77" / "train.csv"
pytestmark = pytest.mark.slow


def test_validation_loss_falls_on_banking77(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    with open(BANKING, newline="", encoding="utf-8") as fh:
        data = list(csv.DictReader(fh))
    random.Random(0).shuffle(data)
    rows = [{"kind": "sft", "prompt": [{"role": "user", "content": r["text"]}], "completion": r["category"]}
            for r in data[:48]]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:40]))
    (tmp_path / "val.jsonl").write_text("\n".join(json.dumps(r) for r in rows[40:]))
    spec = TrainingJobSpec(
        method="sft", base_model_path=str(SMOL), train_path=str(tmp_path / "train.jsonl"),
        validation_path=str(tmp_path / "val.jsonl"), output_dir=str(tmp_path / "out"), eval_every_steps=2,
        hyperparameters=Hyperparameters(n_epochs=1, batch_size=8, learning_rate=1e-3, lora_r=8, lora_alpha=16,
                                        target_modules=["q_proj", "v_proj", "o_proj"], warmup_ratio=0.0),
    )
    events: list[dict] = []
    result = train_sft(spec, emit=events.append)
    vals = [e["val_loss"] for e in events if e["type"] == "validation"]
    assert result.status == "succeeded" and len(vals) == 3  # steps 2, 4 and the last (5)
    assert vals[-1] < 0.92 * vals[0]  # measured: 4.73 -> 4.17 nats per answer token
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()
