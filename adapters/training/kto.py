"""KTO recipe: TRL ``KTOTrainer`` with a peft LoRA config, on unpaired rows (prompt, completion, label).

KTO estimates its KL term from mismatched completions inside a batch, so the micro-batch must hold at
least 2 rows and TRL samples sequentially: rows are shuffled once here (seeded) instead.
Desirable/undesirable losses are re-weighted so that the rarer label counts as much as the common one
(the KTO paper's recommendation for unbalanced feedback).
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

KTO_BETA = 0.1


def unpaired_dataset(rows: list[dict[str, Any]]) -> Any:
    from datasets import Dataset

    return Dataset.from_list([{"prompt": messages(r["prompt"]), "completion": assistant(r["completion"]),
                               "label": bool(r["label"])} for r in rows])


def label_weights(rows: list[dict[str, Any]]) -> tuple[float, float]:
    """(desirable_weight, undesirable_weight) that balance the two labels; within TRL's advised range."""
    n_pos = sum(1 for r in rows if r["label"])
    n_neg = len(rows) - n_pos
    if n_pos == 0 or n_neg == 0:
        return 1.0, 1.0
    if n_pos >= n_neg:
        return 1.0, min(n_pos / n_neg, 4 / 3 * 4)
    return min(n_neg / n_pos, 4 / 3 * 4), 1.0


def train_kto(spec: TrainingJobSpec, emit: Emit = discard, should_stop: ShouldStop = never_stop) -> RecipeResult:
    from transformers import EarlyStoppingCallback
    from trl import KTOConfig, KTOTrainer

    hp = spec.hyperparameters
    seed_everything(hp.seed)
    train_rows = shuffled(read_rows(spec.train_path, "kto"), hp.seed)
    val_rows = read_rows(spec.validation_path, "kto") if spec.validation_path else []
    batch = max(2, hp.batch_size)
    desirable, undesirable = label_weights(train_rows)
    args = KTOConfig(**common_args(spec, len(train_rows), batch, bool(val_rows)), beta=KTO_BETA,
                     desirable_weight=desirable, undesirable_weight=undesirable)
    callback = EventCallback(emit, should_stop)
    callbacks: list[Any] = [callback]
    if val_rows and hp.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=hp.early_stopping_patience))
    model, peft_config = policy(spec)
    trainer = KTOTrainer(
        model=model, args=args,
        train_dataset=unpaired_dataset(train_rows),
        eval_dataset=unpaired_dataset(val_rows) if val_rows else None,
        processing_class=load_tokenizer(spec.base_model_path), peft_config=peft_config, callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=last_trainer_checkpoint(spec))
    return finish(trainer, spec, callback)
