"""DPO recipe: TRL ``DPOTrainer`` with a peft LoRA config, on preference rows (prompt, chosen, rejected).

With ``peft_config`` TRL uses the base model with the adapter disabled as the reference model, so no
second copy of the weights is loaded; continued from a parent adapter, the parent is the reference
(``trl_common.policy``). ``precision`` bf16 runs under Accelerate's CPU autocast.
"""

from __future__ import annotations

from typing import Any

from adapters.training.common import (
    Emit,
    RecipeResult,
    ShouldStop,
    discard,
    load_tokenizer,
    never_stop,
    seed_everything,
)
from adapters.training.config import TrainingJobSpec
from adapters.training.data import read_rows
from adapters.training.trl_common import (
    EventCallback,
    assistant,
    common_args,
    finish,
    last_trainer_checkpoint,
    messages,
    policy,
    shuffled,
)

DPO_BETA = 0.1


def preference_dataset(rows: list[dict[str, Any]]) -> Any:
    """Conversational preference format TRL understands: prompt messages, one-message chosen/rejected."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": messages(r["prompt"]), "chosen": assistant(r["chosen"]),
                               "rejected": assistant(r["rejected"])} for r in rows])


def train_dpo(spec: TrainingJobSpec, emit: Emit = discard, should_stop: ShouldStop = never_stop) -> RecipeResult:
    from transformers import EarlyStoppingCallback
    from trl import DPOConfig, DPOTrainer

    hp = spec.hyperparameters
    seed_everything(hp.seed)
    train_rows = shuffled(read_rows(spec.train_path, "dpo"), hp.seed)
    val_rows = read_rows(spec.validation_path, "dpo") if spec.validation_path else []
    args = DPOConfig(**common_args(spec, len(train_rows), hp.batch_size, bool(val_rows)), beta=DPO_BETA)
    callback = EventCallback(emit, should_stop)
    callbacks: list[Any] = [callback]
    if val_rows and hp.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=hp.early_stopping_patience))
    model, peft_config = policy(spec)
    trainer = DPOTrainer(
        model=model, args=args,
        train_dataset=preference_dataset(train_rows),
        eval_dataset=preference_dataset(val_rows) if val_rows else None,
        processing_class=load_tokenizer(spec.base_model_path), peft_config=peft_config, callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=last_trainer_checkpoint(spec))
    return finish(trainer, spec, callback)
