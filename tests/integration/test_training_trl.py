"""DPO and KTO recipes (TRL + peft) and the optuna search, for real on a tiny random Llama."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapters.training.config import Hyperparameters, SearchSpec, TrainingJobSpec
from adapters.training.run import run_spec
from adapters.training.tiny import make_tiny_model

REPO = Path(__file__).resolve().parents[2]
SMOL = REPO / "var" / "models" / "SmolLM2-135M-Instruct"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trl")
    make_tiny_model(SMOL, root / "tiny")
    prompt = lambda i: [{"role": "user", "content": f"question {i}"}]
    rows = {
        "dpo": [{"kind": "preference", "prompt": prompt(i), "chosen": "good answer", "rejected": "bad"}
                for i in range(8)],
        "kto": [{"kind": "unpaired", "prompt": prompt(i), "completion": "good" if i % 3 else "bad",
                 "label": bool(i % 3)} for i in range(8)],
        "sft": [{"kind": "sft", "prompt": prompt(i), "completion": f"label_{i % 2}"} for i in range(16)],
    }
    for name, items in rows.items():
        (root / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in items))
    return root


def spec(root: Path, method: str, out: str, **extra) -> TrainingJobSpec:
    hp = Hyperparameters(n_epochs=1, batch_size=2, max_steps=3, lora_r=4, lora_alpha=8, learning_rate=1e-3)
    return TrainingJobSpec(method=method, base_model_path=str(root / "tiny"), train_path=str(root / f"{method}.jsonl"),
                           validation_path=str(root / f"{method}.jsonl"), output_dir=str(root / out),
                           hyperparameters=extra.pop("hyperparameters", hp), eval_every_steps=2, **extra)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", ["dpo", "kto"])
def test_preference_recipes_train_and_save_a_peft_adapter(root: Path, method: str, precision: str) -> None:
    events: list[dict] = []
    hp = Hyperparameters(n_epochs=1, batch_size=2, max_steps=3, lora_r=4, lora_alpha=8, learning_rate=1e-3,
                         precision=precision)
    out = f"{method}-{precision}"
    result = run_spec(spec(root, method, out, hyperparameters=hp), events.append, lambda: False)
    steps = [e for e in events if e["type"] == "step"]
    assert result.status == "succeeded"
    assert [e["step"] for e in steps] == [1, 2, 3] and steps[-1]["total_steps"] == 3
    assert any(e["type"] == "validation" for e in events)
    assert any(e["type"] == "checkpoint" for e in events)
    adapter = Path(result.adapter_dir)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())  # it moved
    assert all(v.dtype == torch.float32 for v in weights.values())  # bf16 computes, the adapter stays fp32
    saved = json.loads((root / out / "result.json").read_text())
    assert saved["status"] == "succeeded" and saved["method"] == method
    assert saved["metrics"]["precision"] == precision


def _lora_weights(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_training_continues_from_a_parent_adapter(root: Path, method: str) -> None:
    """The child starts from the parent's weights (one step at a negligible lr leaves them almost unchanged,
    where a fresh LoRA has B = 0), saves only its own adapter, and DPO measures rewards against the parent:
    with dropout off, policy and reference agree exactly at the first step."""
    parent_hp = Hyperparameters(n_epochs=1, batch_size=4, max_steps=4, lora_r=4, lora_alpha=8, learning_rate=1e-2,
                                lora_dropout=0.0)
    parent = run_spec(spec(root, "sft", f"parent-{method}", hyperparameters=parent_hp), lambda e: None, lambda: False)
    parent_w = _lora_weights(parent.adapter_dir)
    assert max(v.abs().max() for k, v in parent_w.items() if "lora_B" in k) > 1e-3

    child_hp = parent_hp.replace(max_steps=1, learning_rate=1e-6)
    events: list[dict] = []
    child = run_spec(spec(root, method, f"child-{method}", hyperparameters=child_hp,
                          init_adapter_path=parent.adapter_dir), events.append, lambda: False)
    assert child.status == "succeeded"
    child_w = _lora_weights(child.adapter_dir)
    assert set(child_w) == set(parent_w)  # the same modules, no second ("ref") adapter saved
    for key, value in parent_w.items():
        assert torch.allclose(child_w[key], value, atol=1e-4), key
    assert not (Path(child.adapter_dir) / "ref").exists()
    if method == "dpo":
        first = next(e for e in events if e["type"] == "step")
        assert first["rewards/chosen"] == pytest.approx(0, abs=1e-5)
        assert first["rewards/rejected"] == pytest.approx(0, abs=1e-5)

    fresh = run_spec(spec(root, method, f"fresh-{method}", hyperparameters=child_hp), lambda e: None, lambda: False)
    assert max(v.abs().max() for k, v in _lora_weights(fresh.adapter_dir).items() if "lora_B" in k) < 1e-4


def test_a_parent_fixes_the_lora_shape(root: Path) -> None:
    parent = run_spec(spec(root, "sft", "parent-shape"), lambda e: None, lambda: False)
    with pytest.raises(ValueError, match="search.space.lora_r cannot vary"):
        spec(root, "sft", "x", init_adapter_path=parent.adapter_dir,
             search=SearchSpec(n_trials=2, space={"lora_r": [2, 4]}))


def test_dpo_stop_flag_cancels_after_the_current_step(root: Path) -> None:
    events: list[dict] = []
    hp = Hyperparameters(n_epochs=1, batch_size=2, max_steps=4, lora_r=4, lora_alpha=8)
    # A stop requested before the first step ends takes effect right after that optimizer step.
    result = run_spec(spec(root, "dpo", "dpo-cancel", hyperparameters=hp), events.append, lambda: True)
    assert result.status == "cancelled"
    assert events[-1] == {"type": "cancelled", "step": 1}


def test_search_runs_trials_and_keeps_the_best_adapter(root: Path) -> None:
    events: list[dict] = []
    hp = Hyperparameters(n_epochs=1, batch_size=4, max_steps=4, lora_r=4, lora_alpha=8)
    s = spec(root, "sft", "search", hyperparameters=hp,
             search=SearchSpec(n_trials=2, space={"learning_rate": [1e-4, 1e-2], "lora_r": [2, 4]}))
    result = run_spec(s, events.append, lambda: False)
    trials = [e for e in events if e["type"] == "trial" and e["state"] != "running"]
    assert result.status == "succeeded" and len(trials) == 2
    finished = [t for t in trials if t["state"] == "complete"]
    best = min(finished, key=lambda t: t["value"])
    assert result.metrics["best_trial"] == best["number"]
    assert result.best_val_loss == pytest.approx(best["value"])
    out = root / "search"
    best_dir = out / "trials" / f"trial-{best['number']}" / "adapter"
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (best_dir / "adapter_model.safetensors").read_bytes()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == best["params"]["lora_r"]
    assert all("trial" in e for e in events if e["type"] == "validation")
    # Rerunning the finished search does not train again.
    again: list[dict] = []
    run_spec(s, again.append, lambda: False)
    assert not [e for e in again if e["type"] == "step"]
