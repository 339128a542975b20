"""What can a second round learn from users' ratings? Continued training on round 1's adapter, measured.

Round 1 is forgetting_sweep.py's baseline: SFT on 770 corrections (10 per intent). Then the round-1 adapter
answers ``--traffic`` new train.csv queries (none of them a correction: the traffic of round 2), and each
answer is rated the way run.py's simulated users rate it: 1 if it is the true intent, else 0. With the
corrections capped at 10 per intent, the ratings are all round 2 adds. Each round-2 variant continues from
round 1 (``init_adapter_path``, what a job's ``parent_adapter_id`` does) on the same rows:

* ``kto``: KTO on the rated answers (right = desirable, wrong = undesirable) plus the corrections as desirable;
  the reference policy is round 1 itself, so the loss moves the model away from its own wrong answers;
* ``sft``: SFT on the corrections plus the answers rated 1 (run.py's ``sft_min_rating`` rows), for comparison;
* ``sft-corrections``: SFT on the corrections alone, the control: what more training on round 1's data gives.

Every model is scored on the same test rows by the evaluation's batched generation.

    .venv/bin/python examples/banking77/second_round.py --precision auto --out var/second-round.json
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from adapters.evaluation.generate import MergedHFGenerator
from adapters.training.config import Hyperparameters, TrainingJobSpec
from adapters.training.run import run_spec
from examples.banking77.forgetting_sweep import BASE, DATA, MODEL, per_intent, rows, write_jsonl


def answers(adapter: str | None, prompts: list[list[dict[str, str]]], model: Path) -> list[str]:
    gen = MergedHFGenerator(str(model), adapter, batch_size=32)
    try:
        return [a.strip() for a in gen.generate(prompts, max_new_tokens=24)]
    finally:
        gen.close()


def accuracy(adapter: str | None, test: list[dict[str, Any]], model: Path) -> float:
    got = answers(adapter, [r["prompt"] for r in test], model)
    return sum(a.casefold() == r["completion"].casefold() for a, r in zip(got, test, strict=True)) / len(test)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--traffic", type=int, default=1000, help="round-2 queries answered and rated")
    ap.add_argument("--test-rows", type=int, default=300)
    ap.add_argument("--variants", default="kto,sft", help="comma list of kto, sft, sft-corrections")
    ap.add_argument("--round2-epochs", type=int, default=2)
    ap.add_argument("--kto-lr", type=float, default=1e-4)
    ap.add_argument("--sft-lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="fp32")
    ap.add_argument("--round1-adapter", default=None, help="reuse a round-1 adapter directory instead of training")
    ap.add_argument("--model", type=Path, default=MODEL)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="second-round-"))
    all_train = rows(DATA / "train.csv")
    corrections, val = per_intent(all_train, 10, args.seed)
    used = {r["prompt"][0]["content"] for r in corrections + val}
    traffic = random.Random(args.seed + 1).sample([r for r in all_train if r["prompt"][0]["content"] not in used],
                                                  args.traffic)
    test = random.Random(args.seed).sample(rows(DATA / "test.csv"), args.test_rows)
    val_path = write_jsonl(work / "val.jsonl", val)
    result: dict[str, Any] = {"work_dir": str(work), "precision": args.precision, "traffic": args.traffic}

    def save() -> None:
        print(json.dumps(result), flush=True)
        if args.out:
            args.out.write_text(json.dumps(result, indent=2))

    hp1 = Hyperparameters.from_dict({**BASE, "seed": args.seed, "precision": args.precision})
    round1 = args.round1_adapter
    if round1 is None:
        t0 = time.monotonic()
        r1 = run_spec(TrainingJobSpec(method="sft", base_model_path=str(args.model),
                                      train_path=write_jsonl(work / "round1.jsonl", corrections),
                                      validation_path=val_path, output_dir=str(work / "round1"), hyperparameters=hp1),
                      lambda e: None, lambda: False)
        round1 = r1.adapter_dir
        result["round1_train_seconds"] = time.monotonic() - t0
    result["round1_accuracy"] = accuracy(round1, test, args.model)
    save()

    said = answers(round1, [r["prompt"] for r in traffic], args.model)
    rated = [{**r, "answer": a, "rating": int(a.casefold() == r["completion"].casefold())}
             for r, a in zip(traffic, said, strict=True)]
    result["traffic_accuracy"] = sum(r["rating"] for r in rated) / len(rated)
    save()

    for variant in args.variants.split(","):
        if variant == "kto":
            items = [{"kind": "unpaired", "prompt": r["prompt"], "completion": r["answer"], "label": bool(r["rating"])}
                     for r in rated]
            items += [{"kind": "unpaired", "prompt": r["prompt"], "completion": r["completion"], "label": True}
                      for r in corrections]
            val_items = [{"kind": "unpaired", "prompt": r["prompt"], "completion": r["completion"], "label": True}
                         for r in val]
            lr = args.kto_lr
        else:
            accepted = [{"prompt": r["prompt"], "completion": r["answer"]} for r in rated if r["rating"]]
            items = (accepted if variant == "sft" else []) + corrections
            val_items, lr = val, args.sft_lr
        random.Random(args.seed).shuffle(items)
        hp2 = hp1.replace(n_epochs=args.round2_epochs, learning_rate=lr)
        spec = TrainingJobSpec(method="kto" if variant == "kto" else "sft", base_model_path=str(args.model),
                               train_path=write_jsonl(work / f"{variant}.jsonl", items),
                               validation_path=write_jsonl(work / f"{variant}-val.jsonl", val_items),
                               output_dir=str(work / variant), hyperparameters=hp2, init_adapter_path=round1)
        t0 = time.monotonic()
        trained = run_spec(spec, lambda e: None, lambda: False)
        result[variant] = {"rows": len(items), "learning_rate": lr, "epochs": args.round2_epochs,
                           "train_seconds": time.monotonic() - t0, "steps": trained.metrics.get("steps"),
                           "accuracy": accuracy(trained.adapter_dir, test, args.model)}
        save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
