"""The service's SFT recipe: a plain torch loop over a PEFT LoRA model, built for CPU throughput.

Why a hand-written loop rather than ``transformers.Trainer`` (measured in benchmarks/training_throughput.py):

* length-bucketed batches (``data.epoch_batches``) so almost no compute goes to pad tokens;
* the LM head (hidden × 49k vocabulary for SmolLM2) runs only on answer positions, not on every token;
* shared-prefix batches: rows of one batch usually start with the same system prompt, so that prefix
  runs once (batch 1) and the rest of each row attends to its key/value cache. Gradients flow through
  the cache, so the loss and its gradient equal the unshared computation (tested); only LoRA dropout
  masks are shared across rows for the prefix tokens.

Loss: weighted token mean over answer tokens, ``sum_i w_i * sum_t nll_it / sum_i w_i * n_i``, normalised
over the whole accumulation window, so gradient accumulation is exact and row ``weight`` is honoured.
With ``neftune_noise_alpha`` > 0 (NEFTune, Jain et al. 2023, as in TRL) the input embeddings get uniform noise
of magnitude alpha / sqrt(L * d) in training steps only, L the batch's padded row length.

With ``replay_objective="kl"`` a replayed row's token term is KL(base || adapter) over the whole vocabulary
instead of the NLL of the base model's greedy token; the base distribution comes from a no-grad pass of the
same rows with the adapter disabled.

Precision (``Hyperparameters.precision``, fp32 by default): ``bf16`` loads the frozen base weights in bfloat16
and runs every step under bf16 autocast; the LoRA weights, their gradients, AdamW, the LM head and its logits
stay fp32, and so does the saved adapter. ``auto`` means bf16 only on CPUs with BF16 units: without them bf16 is
emulated and slower.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from adapters.training.common import (
    ADAPTER_DIR,
    Emit,
    RecipeResult,
    ShouldStop,
    atomic_dir,
    checkpoint_root,
    compute_precision,
    discard,
    fp32_logits,
    latest_checkpoint,
    load_base_model,
    load_tokenizer,
    lora_model,
    never_stop,
    prune_checkpoints,
    rng_state,
    seed_everything,
    set_rng_state,
)
from adapters.training.config import TrainingJobSpec
from adapters.training.data import IGNORE_INDEX, Example, encode_rows, epoch_batches, read_rows
from adapters.training.replay import replay_rows

MIN_SHARED_PREFIX = 4  # below this the extra forward call costs more than it saves
KEEP_LAST_CHECKPOINTS = 2


def collate(examples: list[Example], pad_id: int, share_prefix: bool = True) -> dict[str, torch.Tensor | int]:
    """Right-pad a batch and find the prefix all rows share (bounded so that every answer-predicting
    position lies after it)."""
    length = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, e.prompt_len:n] = torch.tensor(e.input_ids[e.prompt_len:])  # by position, never by id
        mask[i, :n] = 1
    prefix = 0
    if share_prefix and len(examples) > 1:
        limit = min(e.prompt_len for e in examples) - 1
        first = examples[0].input_ids
        while prefix < limit and all(e.input_ids[prefix] == first[prefix] for e in examples[1:]):
            prefix += 1
        if prefix < MIN_SHARED_PREFIX:
            prefix = 0
    weights = torch.tensor([e.weight for e in examples], dtype=torch.float32)
    distill = torch.tensor([e.distill for e in examples], dtype=torch.bool)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "weights": weights, "prefix_len": prefix,
            "distill": distill}


def loss_terms(model: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (sum of weighted answer-token NLL, sum of weights over answer tokens) for one batch."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    lm_head = base.get_output_embeddings()
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    n_rows, length = ids.shape
    prefix = int(batch["prefix_len"])
    if prefix > 0:
        shared = decoder(input_ids=ids[:1, :prefix], use_cache=True)
        cache = shared.past_key_values
        cache.batch_repeat_interleave(n_rows)
        positions = torch.arange(prefix, length).unsqueeze(0).expand(n_rows, -1)
        hidden = decoder(input_ids=ids[:, prefix:], attention_mask=mask, position_ids=positions,
                         past_key_values=cache, use_cache=True).last_hidden_state
    else:
        hidden = decoder(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    # hidden[:, j] sits at position prefix + j and predicts the token at prefix + j + 1.
    targets = labels[:, prefix + 1:]
    hidden = hidden[:, :-1]
    selected = targets != IGNORE_INDEX
    logits = fp32_logits(lm_head, hidden[selected])
    token_loss = F.cross_entropy(logits, targets[selected], reduction="none")
    distill = batch.get("distill")
    if distill is not None and bool(distill.any()):
        row_of_token = torch.arange(n_rows).unsqueeze(1).expand_as(targets)[selected]
        distilled = distill[row_of_token]
        log_q = F.log_softmax(logits[distilled], dim=-1)
        log_p = base_log_probs(model, ids[distill], mask[distill], labels[distill])
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
        token_loss = token_loss.masked_scatter(distilled, kl)  # KL(base || adapter) replaces their NLL
    token_w = batch["weights"].unsqueeze(1).expand_as(targets)[selected]
    return (token_loss * token_w).sum(), token_w.sum()


class EmbeddingNoise:
    """NEFTune as a forward hook on the input embeddings. It acts only while the model trains with gradients
    on, so validation and the no-grad base-model pass of KL replay see clean embeddings. ``length`` is set per
    batch to the full padded row length, so a shared prefix (embedded in its own call) gets the same scale."""

    def __init__(self, model: Any, alpha: float) -> None:
        self.alpha = alpha
        self.length = 1
        self.handle = model.get_input_embeddings().register_forward_hook(self)

    def __call__(self, module: Any, _inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if not (module.training and torch.is_grad_enabled()):
            return output
        magnitude = self.alpha / math.sqrt(self.length * output.size(-1))
        return output + torch.empty_like(output).uniform_(-magnitude, magnitude)


@torch.no_grad()
def base_log_probs(model: Any, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The base model's next-token log-probabilities at the answer positions of these rows (row-major order,
    as ``loss_terms`` selects them): the LoRA layers are bypassed with peft's ``disable_adapter``."""
    base = model.get_base_model()
    with model.disable_adapter():
        hidden = base.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        selected = labels[:, 1:] != IGNORE_INDEX
        return F.log_softmax(fp32_logits(base.get_output_embeddings(), hidden[:, :-1][selected]), dim=-1)


@torch.no_grad()
def evaluate(model: Any, examples: list[Example], batch_size: int, pad_id: int) -> float:
    """Unweighted mean NLL per answer token over the validation set."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    total, count = 0.0, 0.0
    for start in range(0, len(order), batch_size):
        chunk = [examples[i] for i in order[start:start + batch_size]]
        chunk = [Example(e.input_ids, e.prompt_len, 1.0) for e in chunk]
        s, n = loss_terms(model, collate(chunk, pad_id))
        total += float(s)
        count += float(n)
    if was_training:
        model.train()
    return total / max(count, 1e-9)


class SFTRecipe:
    """One SFT run (resumable). ``run()`` returns a RecipeResult; events go to ``emit``."""

    def __init__(self, spec: TrainingJobSpec, emit: Emit = discard, should_stop: ShouldStop = never_stop,
                 share_prefix: bool = True) -> None:
        self.spec = spec
        self.hp = spec.hyperparameters
        self.emit = emit
        self.should_stop = should_stop
        self.share_prefix = share_prefix
        self.output_dir = Path(spec.output_dir)

    # --- setup -------------------------------------------------------------------------------------
    def _setup(self) -> bool:
        """Load data and model; False when a cancel arrived while replay rows were generated."""
        from transformers import get_scheduler

        hp = self.hp
        seed_everything(hp.seed)
        self.tokenizer = load_tokenizer(self.spec.base_model_path)
        self.pad_id = int(self.tokenizer.pad_token_id)
        rows = read_rows(self.spec.train_path, "sft")
        self.n_task_rows = len(rows)
        self.train = encode_rows(self.tokenizer, rows, hp.max_seq_len)
        if hp.replay_fraction:
            replayed = replay_rows(self.spec.base_model_path, self.output_dir, len(rows), hp.replay_fraction,
                                   hp.max_seq_len, hp.seed, self.emit, self.should_stop,
                                   cache_dir=self.spec.replay_cache_dir)
            if replayed is None:
                return False
            distill = hp.replay_objective == "kl"
            self.train += [replace(e, distill=distill) for e in encode_rows(self.tokenizer, replayed, hp.max_seq_len)]
        self.val = (encode_rows(self.tokenizer, read_rows(self.spec.validation_path, "sft"), hp.max_seq_len)
                    if self.spec.validation_path else [])
        self.lengths = [len(e.input_ids) for e in self.train]
        n_batches = math.ceil(len(self.train) / hp.batch_size)
        self.steps_per_epoch = math.ceil(n_batches / hp.gradient_accumulation_steps)
        total = hp.n_epochs * self.steps_per_epoch
        self.total_steps = min(total, hp.max_steps) if hp.max_steps else total
        self.eval_every = self.spec.eval_every_steps or max(1, self.total_steps // 10)
        self.ckpt_every = self.spec.checkpoint_every_steps or self.eval_every

        self.precision = hp.resolved_precision()
        base = load_base_model(self.spec.base_model_path, self.precision)
        self.model = lora_model(base, hp, self.spec.init_adapter_path)
        self.model.train()
        self.noise = EmbeddingNoise(self.model, hp.neftune_noise_alpha) if hp.neftune_noise_alpha else None
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        self.scheduler = get_scheduler(hp.lr_scheduler, self.optimizer,
                                       num_warmup_steps=math.ceil(hp.warmup_ratio * self.total_steps),
                                       num_training_steps=self.total_steps)
        # Progress state (everything a checkpoint must restore).
        self.step = 0
        self.epoch = 0
        self.batch_pos = 0
        self.trained_tokens = 0
        self.best_val: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.last_loss: float | None = None
        self.history: list[dict[str, float]] = []
        return True

    # --- checkpoints -------------------------------------------------------------------------------
    def _save_checkpoint(self) -> Path:
        state = {
            "step": self.step, "epoch": self.epoch, "batch_pos": self.batch_pos,
            "trained_tokens": self.trained_tokens, "best_val": self.best_val, "best_step": self.best_step,
            "bad_evals": self.bad_evals, "last_loss": self.last_loss, "history": self.history,
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(), "hyperparameters": self.hp.to_dict(),
        }

        def write(tmp: Path) -> None:
            self.model.save_pretrained(tmp / ADAPTER_DIR)
            torch.save(state, tmp / "state.pt")

        path = atomic_dir(checkpoint_root(self.output_dir) / f"step-{self.step}", write)
        keep = {self.best_step} if self.best_step is not None else set()
        prune_checkpoints(self.output_dir, KEEP_LAST_CHECKPOINTS, keep)
        self.emit({"type": "checkpoint", "step": self.step, "path": str(path)})
        return path

    def _resume(self, path: Path) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = torch.load(path / "state.pt", weights_only=False)
        set_peft_model_state_dict(self.model, load_file(str(path / ADAPTER_DIR / "adapter_model.safetensors")))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        for key in ("step", "epoch", "batch_pos", "trained_tokens", "best_val", "best_step", "bad_evals",
                    "last_loss", "history"):
            setattr(self, key, state[key])
        self.emit({"type": "resumed", "step": self.step, "path": str(path)})

    def _save_adapter(self) -> None:
        atomic_dir(self.output_dir / ADAPTER_DIR, lambda tmp: self.model.save_pretrained(tmp))

    # --- loop --------------------------------------------------------------------------------------
    def _batches(self, epoch: int) -> list[list[int]]:
        if getattr(self, "_order_epoch", None) != epoch:
            self._order = epoch_batches(self.lengths, self.hp.batch_size, self.hp.seed, epoch)
            self._order_epoch = epoch
        return self._order

    def _next_window(self) -> list[list[int]]:
        """Micro-batches of the next optimizer step; advances (epoch, batch_pos)."""
        batches = self._batches(self.epoch)
        if self.batch_pos >= len(batches):
            self.epoch += 1
            self.batch_pos = 0
            batches = self._batches(self.epoch)
        window = batches[self.batch_pos:self.batch_pos + self.hp.gradient_accumulation_steps]
        self.batch_pos += len(window)
        return window

    def _train_step(self, window: list[list[int]]) -> tuple[float, int]:
        examples = [[self.train[i] for i in mb] for mb in window]
        denom = sum(e.weight * (len(e.input_ids) - e.prompt_len) for mb in examples for e in mb)
        denom = max(denom, 1e-9)
        total = 0.0
        tokens = 0
        for mb in examples:
            batch = collate(mb, self.pad_id, self.share_prefix)
            if self.noise is not None:
                self.noise.length = batch["input_ids"].shape[1]
            s, _ = loss_terms(self.model, batch)
            loss = s / denom
            loss.backward()
            total += loss.item()
            tokens += sum(len(e.input_ids) for e in mb)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, tokens

    def _validate(self) -> bool:
        """Evaluate, keep the best adapter, and say whether early stopping should end the run."""
        val_loss = evaluate(self.model, self.val, self.hp.batch_size, self.pad_id)
        self.history.append({"step": self.step, "val_loss": val_loss})
        self.emit({"type": "validation", "step": self.step, "val_loss": val_loss})
        improved = self.best_val is None or val_loss < self.best_val
        if improved:
            self.best_val, self.best_step, self.bad_evals = val_loss, self.step, 0
            self._save_adapter()
        else:
            self.bad_evals += 1
        if (improved or self.step % self.ckpt_every == 0) and self.step < self.total_steps:
            self._save_checkpoint()
        patience = self.hp.early_stopping_patience
        return bool(patience and self.bad_evals >= patience)

    def run(self) -> RecipeResult:
        if not self._setup():
            self.emit({"type": "cancelled", "step": 0})
            return RecipeResult(status="cancelled", metrics={}, trained_tokens=0, adapter_dir=None)
        ckpt = latest_checkpoint(self.output_dir)
        if ckpt is not None:
            self._resume(ckpt)
        started = time.monotonic()
        run_tokens = 0
        run_steps = 0
        status = "succeeded"
        stopped_early = False
        while self.step < self.total_steps:
            window = self._next_window()
            with compute_precision(self.precision):
                t_loss, t_tokens = self._train_step(window)
            self.step += 1
            run_steps += 1
            run_tokens += t_tokens
            self.trained_tokens += t_tokens
            self.last_loss = t_loss
            elapsed = max(time.monotonic() - started, 1e-9)
            self.emit({
                "type": "step", "step": self.step, "total_steps": self.total_steps, "loss": t_loss,
                "learning_rate": self.scheduler.get_last_lr()[0], "tokens_per_second": run_tokens / elapsed,
                "eta_seconds": elapsed / run_steps * (self.total_steps - self.step),
                "epoch": self.epoch + self.batch_pos / max(1, math.ceil(len(self.train) / self.hp.batch_size)),
            })
            is_last = self.step == self.total_steps
            if self.val and (self.step % self.eval_every == 0 or is_last):
                with compute_precision(self.precision):
                    early_stop = self._validate()
                if early_stop:
                    stopped_early = True
                    break
            elif self.step % self.ckpt_every == 0 and not is_last:
                self._save_checkpoint()
            if self.should_stop() and not is_last:
                self._save_checkpoint()
                status = "cancelled"
                self.emit({"type": "cancelled", "step": self.step})
                break
        if status == "succeeded" and not self.val:
            self._save_adapter()
        elapsed = time.monotonic() - started
        metrics: dict[str, Any] = {
            "train_loss": self.last_loss, "steps": self.step, "total_steps": self.total_steps,
            "epochs": self.step / self.steps_per_epoch, "train_rows": len(self.train),
            "replay_rows": len(self.train) - self.n_task_rows,
            "validation_rows": len(self.val), "best_val_loss": self.best_val, "best_step": self.best_step,
            "stopped_early": stopped_early, "runtime_seconds": elapsed, "precision": self.precision,
            "tokens_per_second": run_tokens / max(elapsed, 1e-9), "val_history": self.history,
        }
        result = RecipeResult(status=status, metrics=metrics, trained_tokens=self.trained_tokens,
                              adapter_dir=str(self.output_dir / ADAPTER_DIR) if status == "succeeded" else None,
                              best_val_loss=self.best_val)
        if status == "succeeded":
            self.emit({"type": "done", "metrics": metrics, "trained_tokens": self.trained_tokens})
        return result


def train_sft(spec: TrainingJobSpec, emit: Emit = discard, should_stop: ShouldStop = never_stop) -> RecipeResult:
    """Run (or resume) SFT for ``spec``; the adapter ends up in ``spec.output_dir/adapter``."""
    return SFTRecipe(spec, emit, should_stop).run()
