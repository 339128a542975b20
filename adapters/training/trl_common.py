"""Glue shared by the TRL recipes (DPO, KTO): datasets, CPU-friendly arguments, the event/stop callback,
and resuming from the Trainer's own checkpoints (``output_dir/checkpoints/checkpoint-N``)."""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from adapters.training.common import (
    ADAPTER_DIR,
    Emit,
    RecipeResult,
    ShouldStop,
    atomic_dir,
    checkpoint_root,
    load_base_model,
    lora_config,
    lora_model,
)
from adapters.training.config import TrainingJobSpec

# The Trainer defaults a TRL config changes that are wrong for a CPU box (bf16 is set from ``precision``).
CPU_ARGS: dict[str, Any] = {
    "fp16": False, "use_cpu": True, "gradient_checkpointing": False, "report_to": "none",
    "disable_tqdm": True, "dataloader_num_workers": 0, "logging_steps": 1, "save_only_model": False,
    "include_num_input_tokens_seen": True,
}


def messages(prompt: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]


def assistant(text: Any) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": str(text)}]


def shuffled(rows: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def policy(spec: TrainingJobSpec) -> tuple[Any, Any]:
    """(model, peft_config) for a TRL trainer: the base model and the LoRA config TRL applies to it, or, when
    training continues from a parent adapter, the parent as a trainable PEFT model. TRL then copies it into a
    frozen "ref" adapter, so the reference policy of the DPO/KTO loss is the parent, not the base model."""
    hp = spec.hyperparameters
    base = load_base_model(spec.base_model_path, hp.resolved_precision())
    if spec.init_adapter_path is None:
        return base, lora_config(hp)
    return lora_model(base, hp, spec.init_adapter_path), None


def common_args(spec: TrainingJobSpec, n_train: int, batch_size: int, has_eval: bool) -> dict[str, Any]:
    """TrainingArguments shared by DPO and KTO, derived from our Hyperparameters."""
    hp = spec.hyperparameters
    steps_per_epoch = math.ceil(math.ceil(n_train / batch_size) / hp.gradient_accumulation_steps)
    total = hp.n_epochs * steps_per_epoch
    if hp.max_steps:
        total = min(total, hp.max_steps)
    eval_every = spec.eval_every_steps or max(1, total // 10)
    save_every = spec.checkpoint_every_steps or eval_every
    if has_eval and save_every % eval_every:
        save_every = eval_every  # load_best_model_at_end needs saves on evaluation steps
    args: dict[str, Any] = dict(CPU_ARGS)
    args.update(
        bf16=hp.resolved_precision() == "bf16",  # Accelerate's CPU autocast; LoRA weights and AdamW stay fp32
        output_dir=str(checkpoint_root(spec.output_dir)), per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=batch_size, gradient_accumulation_steps=hp.gradient_accumulation_steps,
        learning_rate=hp.learning_rate, lr_scheduler_type=hp.lr_scheduler,
        warmup_steps=float(hp.warmup_ratio) if hp.warmup_ratio else 0, weight_decay=hp.weight_decay,
        num_train_epochs=hp.n_epochs, max_steps=total,
        neftune_noise_alpha=hp.neftune_noise_alpha or None, seed=hp.seed, data_seed=hp.seed,
        max_length=hp.max_seq_len, save_strategy="steps", save_steps=save_every, save_total_limit=2,
    )
    if has_eval:
        args.update(eval_strategy="steps", eval_steps=eval_every, load_best_model_at_end=True,
                    metric_for_best_model="eval_loss", greater_is_better=False)
    return args


class EventCallback(TrainerCallback):
    """Turns Trainer hooks into our events and honours ``should_stop`` after every optimizer step."""

    def __init__(self, emit: Emit, should_stop: ShouldStop) -> None:
        self.emit = emit
        self.should_stop = should_stop
        self.cancelled = False
        self.started = time.monotonic()
        self.start_step = 0
        self.start_tokens = 0
        self.last_loss: float | None = None
        self.last_val: float | None = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.started = time.monotonic()
        self.start_step = state.global_step
        self.start_tokens = int(state.num_input_tokens_seen or 0)
        if state.global_step:
            self.emit({"type": "resumed", "step": state.global_step})

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.should_stop() and state.global_step < state.max_steps:
            self.cancelled = True
            control.should_training_stop = True
            control.should_save = True  # keep the progress so far (a rerun resumes)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        logs = logs or {}
        elapsed = max(time.monotonic() - self.started, 1e-9)
        if "loss" in logs:
            self.last_loss = float(logs["loss"])
            done = max(state.global_step - self.start_step, 1)
            tokens = int(state.num_input_tokens_seen or 0) - self.start_tokens
            self.emit({
                "type": "step", "step": state.global_step, "total_steps": state.max_steps,
                "loss": self.last_loss, "learning_rate": float(logs.get("learning_rate", 0.0)),
                "tokens_per_second": tokens / elapsed,
                "eta_seconds": elapsed / done * (state.max_steps - state.global_step),
                "epoch": float(state.epoch or 0.0),
                **{k: float(v) for k, v in logs.items() if k.startswith("rewards/")},
            })
        if "eval_loss" in logs:
            self.last_val = float(logs["eval_loss"])
            self.emit({"type": "validation", "step": state.global_step, "val_loss": self.last_val})

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        self.emit({"type": "checkpoint", "step": state.global_step, "path": str(path)})


def last_trainer_checkpoint(spec: TrainingJobSpec) -> str | None:
    from transformers.trainer_utils import get_last_checkpoint

    root = checkpoint_root(spec.output_dir)
    return get_last_checkpoint(str(root)) if root.is_dir() else None


def finish(trainer: Any, spec: TrainingJobSpec, callback: EventCallback) -> RecipeResult:
    """Save the (best, if validated) adapter and build the result; mirrors SFTRecipe's outcome."""
    state = trainer.state
    if callback.cancelled:
        callback.emit({"type": "cancelled", "step": state.global_step})
        return RecipeResult(status="cancelled", metrics={"steps": state.global_step},
                            trained_tokens=int(state.num_input_tokens_seen or 0))
    out = Path(spec.output_dir) / ADAPTER_DIR
    # only "default": a run continued from a parent also holds TRL's frozen "ref" copy of it
    atomic_dir(out, lambda tmp: trainer.model.save_pretrained(tmp, selected_adapters=["default"]))
    history = [{"step": h["step"], "val_loss": h["eval_loss"]} for h in state.log_history if "eval_loss" in h]
    best = min((h["val_loss"] for h in history), default=None)
    metrics: dict[str, Any] = {
        "train_loss": callback.last_loss, "steps": state.global_step, "total_steps": state.max_steps,
        "precision": spec.hyperparameters.resolved_precision(), "epochs": float(state.epoch or 0.0), "best_val_loss": best, "val_history": history,
        "runtime_seconds": time.monotonic() - callback.started,
    }
    tokens = int(state.num_input_tokens_seen or 0)
    callback.emit({"type": "done", "metrics": metrics, "trained_tokens": tokens})
    return RecipeResult(status="succeeded", metrics=metrics, trained_tokens=tokens, adapter_dir=str(out),
                        best_val_loss=best)
