"""Pieces every recipe shares: the event callback protocol, checkpoint directories, RNG state, LoRA config.

Event protocol (dicts passed to ``emit``; ``run.py`` writes each as one JSON line):
``step`` {step, total_steps, loss, learning_rate, tokens_per_second, eta_seconds, epoch},
``validation`` {step, val_loss}, ``checkpoint`` {step, path}, ``trial`` {...}, ``cancelled`` {step},
``done`` {metrics, trained_tokens}, ``error`` {message}.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

Emit = Callable[[dict[str, Any]], None]
ShouldStop = Callable[[], bool]

ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"
RESULT_FILE = "result.json"
_STEP_RE = re.compile(r"^step-(\d+)$")


def never_stop() -> bool:
    return False


def discard(_event: dict[str, Any]) -> None:
    return None


@dataclass
class RecipeResult:
    """What a recipe returns; ``status`` is "succeeded" or "cancelled"."""

    status: str
    metrics: dict[str, Any] = field(default_factory=dict)
    trained_tokens: int = 0
    adapter_dir: str | None = None
    best_val_loss: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "metrics": self.metrics, "trained_tokens": self.trained_tokens,
                "adapter_dir": self.adapter_dir, "best_val_loss": self.best_val_loss}


def lora_config(hp: Any) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=hp.lora_r, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
                      target_modules=hp.target_modules, bias="none", task_type="CAUSAL_LM")


def lora_model(base: Any, hp: Any, init_adapter_path: str | None = None) -> Any:
    """The trainable PEFT model: a fresh LoRA from ``hp``, or (continued training) the adapter saved at
    ``init_adapter_path`` with trainable weights and this run's dropout. Either way the adapter is "default"."""
    from peft import PeftConfig, PeftModel, get_peft_model

    if init_adapter_path is None:
        return get_peft_model(base, lora_config(hp))
    config = PeftConfig.from_pretrained(init_adapter_path)
    config.lora_dropout = hp.lora_dropout
    return PeftModel.from_pretrained(base, init_adapter_path, is_trainable=True, config=config)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINT_DIR


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (temporary dirs of an interrupted save are ignored)."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_RE.match(child.name)
        if m and child.is_dir() and (child / "state.pt").exists():
            found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def atomic_dir(final: Path, write: Callable[[Path], None]) -> Path:
    """Write a directory under a temporary name, then rename it into place, so a kill mid-save
    never leaves a half-written checkpoint that looks complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    write(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def prune_checkpoints(output_dir: str | Path, keep_last: int, keep_steps: set[int]) -> None:
    """Keep the newest ``keep_last`` checkpoints plus the steps in ``keep_steps`` (the best one)."""
    found = list_checkpoints(output_dir)
    newest = {s for s, _ in found[-keep_last:]}
    for step, path in found:
        if step not in newest and step not in keep_steps:
            shutil.rmtree(path, ignore_errors=True)
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(".tmp-"):
                shutil.rmtree(child, ignore_errors=True)


def copy_adapter(src: str | Path, dest: str | Path) -> None:
    """Replace ``dest`` with the PEFT files of ``src`` (atomically)."""
    src = Path(src)

    def write(tmp: Path) -> None:
        for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
            if (src / name).exists():
                shutil.copy2(src / name, tmp / name)

    atomic_dir(Path(dest), write)


def write_result(output_dir: str | Path, result: dict[str, Any]) -> Path:
    path = Path(output_dir) / RESULT_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=True, default=str), encoding="utf-8")
    os.replace(tmp, path)
    return path


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(path: str, precision: str = "fp32") -> Any:
    """sdpa attention; fp32 weights, or bf16 ones (half the memory, no per-step casts under bf16 autocast) for
    ``precision="bf16"``. On CPUs without BF16 units fp32 is faster and exact (DESIGN.md)."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    model.get_output_embeddings().float()  # the logits stay fp32 (fp32_logits)
    return model


def fp32_logits(lm_head: Any, hidden: torch.Tensor) -> torch.Tensor:
    """Logits computed in fp32 even under bf16 autocast: rounded to bf16 they are 0.125 apart near 20, noise as
    large as the late-training loss itself. The LM head runs only on answer positions, so this costs little."""
    with torch.autocast("cpu", enabled=False):
        return lm_head(hidden.float())


def compute_precision(precision: str) -> Any:
    """The autocast context for a resolved precision: bf16 matmuls (LoRA included), or nothing for fp32."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
