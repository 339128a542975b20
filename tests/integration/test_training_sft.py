"""The real SFT recipe on a tiny random Llama (real SmolLM2 tokenizer): learning, early stopping,
and the subprocess contract (events on stdout, resume after SIGKILL, SIGTERM cancel, errors)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters.training.common import list_checkpoints
from adapters.training.config import Hyperparameters, TrainingJobSpec
from adapters.training.sft import train_sft
from adapters.training.tiny import make_tiny_model

REPO = Path(__file__).resolve().parents[2]
SMOL = REPO / "var" / "models" / "SmolLM2-135M-Instruct"
pytestmark = pytest.mark.slow


def write_rows(path: Path, n: int, offset: int = 0) -> Path:
    rows = [{"kind": "sft", "prompt": [{"role": "user", "content": f"question number {i}"}],
             "completion": f"label_{i % 3}", "attributes": {"segment": "a"}} for i in range(offset, offset + n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sft")
    make_tiny_model(SMOL, root / "tiny")
    write_rows(root / "train.jsonl", 24)
    write_rows(root / "val.jsonl", 6, offset=100)
    return root


def spec_for(root: Path, out: str, **hp) -> TrainingJobSpec:
    params = {"n_epochs": 3, "batch_size": 4, "learning_rate": 5e-3, "lora_r": 8, "lora_alpha": 128,
              "lora_dropout": 0.0, "warmup_ratio": 0.0, **hp}
    return TrainingJobSpec(method="sft", base_model_path=str(root / "tiny"), train_path=str(root / "train.jsonl"),
                           validation_path=str(root / "val.jsonl"), output_dir=str(root / out),
                           hyperparameters=Hyperparameters(**params), eval_every_steps=3, num_threads=1)


def start(spec: TrainingJobSpec, root: Path) -> subprocess.Popen:
    path = Path(spec.output_dir).with_suffix(".json")
    path.write_text(spec.to_json())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "adapters.training.run", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


def test_loss_falls_and_best_adapter_is_saved(workdir: Path) -> None:
    torch.set_num_threads(1)
    events: list[dict] = []
    result = train_sft(spec_for(workdir, "learn", n_epochs=4), emit=events.append)
    steps = [e for e in events if e["type"] == "step"]
    vals = [e["val_loss"] for e in events if e["type"] == "validation"]
    assert result.status == "succeeded" and len(steps) == 24 and steps[-1]["total_steps"] == 24
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.4  # nats; a random tiny model starts near ln(49152)
    assert vals[-1] < vals[0]
    assert result.best_val_loss == min(vals)
    assert events[-1]["type"] == "done" and events[-1]["trained_tokens"] > 0
    adapter = Path(result.adapter_dir)
    assert json.loads((adapter / "adapter_config.json").read_text())["lora_alpha"] == 128
    assert any("lora_B" in k for k in load_file(str(adapter / "adapter_model.safetensors")))
    assert len(list_checkpoints(workdir / "learn")) <= 3  # last 2 + best


def test_early_stopping_keeps_the_best_adapter(workdir: Path) -> None:
    torch.set_num_threads(1)
    events: list[dict] = []
    # A huge learning rate overshoots after a few steps, so validation loss stops improving.
    spec = spec_for(workdir, "early", n_epochs=10, learning_rate=1e-2, early_stopping_patience=1)
    result = train_sft(spec, emit=events.append)
    vals = [(e["step"], e["val_loss"]) for e in events if e["type"] == "validation"]
    best_step, best = min(vals, key=lambda sv: sv[1])
    assert result.metrics["stopped_early"] is True and result.metrics["steps"] < 60
    assert result.metrics["best_step"] == best_step and vals[-1][1] > best
    saved = load_file(str(workdir / "early" / "adapter" / "adapter_model.safetensors"))
    ckpt = load_file(str(workdir / "early" / "checkpoints" / f"step-{best_step}" / "adapter" /
                         "adapter_model.safetensors"))
    assert all(torch.equal(saved[k], ckpt[k]) for k in saved)


def test_resume_after_sigkill_continues_from_the_checkpoint(workdir: Path) -> None:
    spec = spec_for(workdir, "resume", lora_dropout=0.1)
    proc = start(spec, workdir)
    for line in proc.stdout:
        if json.loads(line)["type"] == "checkpoint":
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    saved = list_checkpoints(spec.output_dir)
    assert saved, "no checkpoint survived the kill"
    resume_step = saved[-1][0]
    proc = start(spec, workdir)
    events = [json.loads(line) for line in proc.stdout]
    assert proc.wait() == 0
    assert events[0] == {"type": "resumed", "step": resume_step, "path": str(saved[-1][1])}
    steps = [e["step"] for e in events if e["type"] == "step"]
    assert steps[0] == resume_step + 1 and steps[-1] == 18
    result = json.loads((Path(spec.output_dir) / "result.json").read_text())
    assert result["status"] == "succeeded" and result["metrics"]["steps"] == 18
    # Same outcome as a run that was never interrupted (data order and RNG state are restored).
    torch.set_num_threads(1)
    ref = train_sft(spec_for(workdir, "resume-ref", lora_dropout=0.1))
    a = load_file(str(Path(spec.output_dir) / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(Path(ref.adapter_dir) / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert result["best_val_loss"] == pytest.approx(ref.best_val_loss, rel=1e-4)


def test_sigterm_cancels_within_one_step(workdir: Path) -> None:
    spec = spec_for(workdir, "cancel", n_epochs=20)
    proc = start(spec, workdir)
    signalled_at = None
    events = []
    for line in proc.stdout:
        event = json.loads(line)
        events.append(event)
        if event["type"] == "step" and signalled_at is None:
            signalled_at = event["step"]
            proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 3
    assert events[-1]["type"] == "cancelled"
    assert signalled_at <= events[-1]["step"] <= signalled_at + 1
    assert max(e["step"] for e in events if e["type"] == "step") <= signalled_at + 1
    assert list_checkpoints(spec.output_dir)[-1][0] == events[-1]["step"]  # progress kept for a rerun


def test_errors_exit_1_with_an_error_event(workdir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "spec.json"
    bad.write_text(json.dumps({"method": "sft", "base_model_path": str(workdir / "tiny"),
                               "train_path": str(workdir / "train.jsonl"), "output_dir": str(tmp_path / "o"),
                               "hyperparameters": {"lora_r": 0}}))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "adapters.training.run", str(bad)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1
    events = [json.loads(line) for line in done.stdout.splitlines()]
    assert events[-1]["type"] == "error" and "lora_r" in events[-1]["message"]
