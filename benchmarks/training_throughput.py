"""SFT throughput: our recipe (adapters/training/sft.py) against a plain ``transformers.Trainer`` + PEFT
baseline, on the same Banking77 subset, in one run.

Baseline = what people write first: full conversation tokenised, ``DataCollatorForLanguageModeling``
(pads to the longest row of a random batch, labels = input ids with pad masked -> loss on every token,
and, since SmolLM2's pad is ``<|im_end|>``, no loss on the end of turn). Same LoRA (r, alpha, targets),
learning rate, batch size, epochs and fp32 for both; on CPUs with BF16 units our recipe runs a second time in
bf16 (its ``auto`` precision there). Prints examples/s of each, the ratios, and greedy exact-match accuracy of
each adapter on held-out rows (batched ``generate``, fp32).

    python benchmarks/training_throughput.py --rows 400 --val-rows 64
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from adapters.cpu import has_bf16_units
from adapters.training.common import load_base_model, load_tokenizer, lora_config
from adapters.training.config import Hyperparameters, TrainingJobSpec
from adapters.training.sft import train_sft

DEFAULT_MODEL = REPO / "var" / "models" / "SmolLM2-135M-Instruct"
DEFAULT_DATA = REPO.parent / "shared" / "datasets" / "banking77" / "train.csv"


def banking_rows(path: Path, n_train: int, n_val: int, seed: int) -> tuple[list[dict], list[dict]]:
    with open(path, newline="", encoding="utf-8") as fh:
        data = list(csv.DictReader(fh))
    random.Random(seed).shuffle(data)
    rows = [{"kind": "sft", "prompt": [{"role": "user", "content": r["text"]}], "completion": r["category"]}
            for r in data[: n_train + n_val]]
    return rows[:n_train], rows[n_train:]


def baseline_train(model_dir: str, rows: list[dict], hp: Hyperparameters, out: Path) -> tuple[object, float]:
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tok = load_tokenizer(model_dir)
    texts = [tok.apply_chat_template(r["prompt"] + [{"role": "assistant", "content": r["completion"]}],
                                     tokenize=False) for r in rows]
    ds = Dataset.from_dict({"text": texts}).map(
        lambda b: tok(b["text"], truncation=True, max_length=hp.max_seq_len), batched=True, remove_columns=["text"])
    model = get_peft_model(load_base_model(model_dir), lora_config(hp))
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=hp.batch_size, num_train_epochs=hp.n_epochs,
        learning_rate=hp.learning_rate, lr_scheduler_type=hp.lr_scheduler, warmup_steps=hp.warmup_ratio,
        weight_decay=hp.weight_decay, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
        logging_steps=10, disable_tqdm=True, seed=hp.seed,
    )
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    started = time.monotonic()
    trainer.train()
    return model, time.monotonic() - started


@torch.no_grad()
def exact_match(model: object, tok: object, rows: list[dict], batch_size: int = 32) -> float:
    """Greedy batched generation on the merged model; the answer must equal the label exactly."""
    model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    model.eval()
    tok.padding_side = "left"
    hits = 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        prompts = [tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in chunk]
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = model.generate(**enc, max_new_tokens=16, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        for r, seq in zip(chunk, out[:, enc["input_ids"].shape[1]:]):
            hits += tok.decode(seq, skip_special_tokens=True).strip() == r["completion"]
    return hits / max(1, len(rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--val-rows", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--learning-rate", type=float, default=5e-4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precisions", default=None,
                    help="comma list of our recipe's precisions (default: fp32, and bf16 too on CPUs with BF16 units)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train, val = banking_rows(Path(args.data), args.rows, args.val_rows, args.seed)
    hp = Hyperparameters(n_epochs=args.epochs, batch_size=args.batch_size, lora_r=args.lora_r,
                         lora_alpha=2 * args.lora_r, learning_rate=args.learning_rate, lora_dropout=0.05,
                         warmup_ratio=0.05, max_seq_len=256, seed=args.seed)
    precisions = args.precisions.split(",") if args.precisions else ["fp32", "bf16"] if has_bf16_units() else ["fp32"]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "train.jsonl").write_text("\n".join(json.dumps(r) for r in train))
        ours = {}
        for precision in precisions:
            spec = TrainingJobSpec(method="sft", base_model_path=args.model, train_path=str(tmp / "train.jsonl"),
                                   output_dir=str(tmp / f"ours-{precision}"),
                                   hyperparameters=hp.replace(precision=precision))
            ours[precision] = train_sft(spec)
            seconds = ours[precision].metrics["runtime_seconds"]
            print(f"ours {precision}: {len(train) * args.epochs / seconds:6.2f} examples/s ({seconds:.1f} s)",
                  flush=True)
        base_model, base_s = baseline_train(args.model, train, hp, tmp / "baseline")
        print(f"baseline fp32: {len(train) * args.epochs / base_s:6.2f} examples/s ({base_s:.1f} s)", flush=True)
        tok = load_tokenizer(args.model)
        accuracy = {"baseline": exact_match(base_model, tok, val)}
        from peft import PeftModel

        for precision, result in ours.items():
            model = PeftModel.from_pretrained(load_base_model(args.model), result.adapter_dir)  # evaluated in fp32
            accuracy[precision] = exact_match(model, tok, val)
    for precision, result in ours.items():
        print(f"ratio (ours {precision} / baseline examples per second): "
              f"{base_s / result.metrics['runtime_seconds']:.2f}x")
    if {"fp32", "bf16"} <= ours.keys():
        print(f"ratio (ours bf16 / ours fp32): "
              f"{ours['fp32'].metrics['runtime_seconds'] / ours['bf16'].metrics['runtime_seconds']:.2f}x")
    print(f"exact-match on {len(val)} held-out rows: " + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items()))


if __name__ == "__main__":
    main()
