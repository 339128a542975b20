"""The whole tuneloop loop on Banking77, through the public HTTP API only.

Mode ``full`` (default): upload train.csv as chat rows and test.csv as the evaluation dataset, snapshot,
train a LoRA adapter (SFT, explicit hyperparameters), follow the job, wait for the automatic evaluation,
promote the adapter, then measure exact-match accuracy on test.csv through the gateway for the base
model and for the adapter.

Mode ``feedback``: simulate users (queries from train.csv, so test.csv stays held out) whose wrong
answers get corrected through ``POST /v1/feedback``; train from that feedback only; evaluate, promote,
measure as above. ``--round 2`` sends new traffic to the adapter round 1 promoted and trains again from
all feedback, where the answers users rated 1 now count as SFT rows too.

    TUNELOOP_ADMIN_KEY=... .venv/bin/python examples/banking77/run.py --limit-train 2000 --limit-test 300

Results (accuracies, times, hyperparameters) are merged into ``--out`` under the mode's key.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

from common import (
    DATA_DIR,
    DEFAULT_URL,
    REPO_ROOT,
    Api,
    ApiError,
    Query,
    accuracy,
    classify,
    default_api_key,
    eval_summary_lines,
    read_rows,
    sample,
    say,
    served_counts,
    step,
    to_chat,
)
from tqdm import tqdm

BASE_DEPLOYMENT = "banking77-base"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=("full", "feedback"), default="full")
    p.add_argument("--url", default=DEFAULT_URL, help="tuneloop service URL")
    p.add_argument("--api-key", default=None, help="admin key (default: env TUNELOOP_ADMIN_KEY)")
    p.add_argument("--deployment", default=None,
                   help="deployment to adapt (default: banking77, or banking77-feedback in feedback mode)")
    p.add_argument("--base-deployment", default=BASE_DEPLOYMENT,
                   help="a deployment that stays on the base model: base accuracy is measured through it, "
                        "and it holds the evaluation dataset")
    p.add_argument("--train-csv", type=Path, default=DATA_DIR / "train.csv")
    p.add_argument("--test-csv", type=Path, default=DATA_DIR / "test.csv")
    p.add_argument("--limit-train", type=int, default=None, help="seeded sample of train.csv (default: all rows)")
    p.add_argument("--limit-test", type=int, default=None, help="seeded sample of test.csv (default: all rows)")
    p.add_argument("--seed", type=int, default=0)
    h = p.add_argument_group("hyperparameters (SmolLM2-135M on CPU)")
    h.add_argument("--epochs", type=int, default=None, help="default 1 (full) / 8 (feedback: few rows) / 2 (--continue)")
    h.add_argument("--batch-size", type=int, default=16)
    h.add_argument("--grad-accum", type=int, default=1)
    h.add_argument("--lr", type=float, default=None,
                   help="default 1e-3 (full) / 2e-3 (feedback) / 2e-4 (--continue: small steps from the served adapter)")
    h.add_argument("--warmup-ratio", type=float, default=0.03)
    h.add_argument("--lora-r", type=int, default=16)
    h.add_argument("--lora-alpha", type=int, default=32)
    h.add_argument("--lora-dropout", type=float, default=0.05)
    h.add_argument("--target-modules", default="all-linear",
                   help="'all-linear' or a comma list, e.g. q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    h.add_argument("--max-seq-len", type=int, default=96,
                   help="96 keeps 99.6%% of rows whole with SmolLM2's template (64 cuts ~8%% of prompts)")
    h.add_argument("--max-steps", type=int, default=None, help="cap optimizer steps (quick runs)")
    h.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                   help="bf16 trains about 2x faster on CPUs with BF16 units (auto: bf16 where the CPU has them)")
    h.add_argument("--replay-fraction", type=float, default=None,
                   help="share of the base model's own answers to general prompts mixed in against forgetting "
                        "(adapters/training/replay.py); default 0 (full) / 0.24 (feedback); raises max_seq_len to "
                        "128 (prompts are <= 72 tokens; longer answers are cut and trained without an end of turn)")
    h.add_argument("--replay-objective", choices=("answers", "kl"), default="kl",
                   help="train on the replayed greedy answers, or match the base model's distributions on them (KL)")
    h.add_argument("--validation-fraction", type=float, default=0.02)
    e = p.add_argument_group("evaluation and measurement")
    e.add_argument("--eval-max-rows", type=int, default=300, help="rows of the automatic evaluation")
    e.add_argument("--retention-rows", type=int, default=50)
    e.add_argument("--concurrency", type=int, default=16, help="requests in flight through the gateway")
    e.add_argument("--max-tokens", type=int, default=32,
                   help="must cover the longest intent name: balance_not_updated_after_cheque_or_cash_deposit is 17 "
                        "tokens + end of turn")
    e.add_argument("--eval-timeout", type=float, default=7200.0, help="seconds to wait for the evaluation")
    e.add_argument("--skip-base", action="store_true", help="don't measure the base model")
    e.add_argument("--skip-measure", action="store_true",
                   help="don't measure the promoted adapter through the gateway (the evaluation's rows only)")
    e.add_argument("--answer-choices", action="store_true",
                   help="constrain both deployments' answers to the 77 intent names (config.answer_choices: "
                        "structured outputs in the gateway, the same constraint in evaluation)")
    e.add_argument("--force", action="store_true", help="promote even if the evaluation rejected the adapter")
    e.add_argument("--adapter-id", default=None, help="skip training: evaluate/promote/measure this adapter")
    f = p.add_argument_group("feedback mode")
    f.add_argument("--sim-queries", type=int, default=2000, help="simulated user queries (from train.csv)")
    f.add_argument("--users", type=int, default=200, help="distinct simulated user ids")
    f.add_argument("--max-corrections-per-intent", type=int, default=10,
                   help="over all rounds: corrections the deployment already has count towards it")
    f.add_argument("--round", type=int, default=1,
                   help="1: traffic to the base model; N > 1: new traffic (another sample of train.csv) to what "
                        "the deployment serves now, i.e. the adapter the previous round promoted")
    f.add_argument("--sft-min-rating", type=float, default=1.0,
                   help="answers rated at least this become SFT rows too (curation feedback.sft_min_rating); "
                        "0 turns it off")
    f.add_argument("--method", choices=("sft", "kto", "dpo"), default="sft",
                   help="training method of the feedback job: kto learns from the rated answers (and corrections "
                        "as desirable answers), dpo from each correction over the answer it corrects")
    f.add_argument("--continue", dest="continue_training", action="store_true",
                   help="round > 1: continue training from the adapter the deployment serves (parent_adapter_id) "
                        "instead of a fresh LoRA; its LoRA shape is kept")
    p.add_argument("--out", type=Path, default=REPO_ROOT / "var" / "banking77-results.json")
    args = p.parse_args(argv)
    if args.deployment is None:
        args.deployment = "banking77" if args.mode == "full" else "banking77-feedback"
    if args.epochs is None:
        args.epochs = 1 if args.mode == "full" else 2 if args.continue_training else 8
    if args.lr is None:
        args.lr = 1e-3 if args.mode == "full" else 2e-4 if args.continue_training else 2e-3
    if args.replay_fraction is None:
        args.replay_fraction = 0.0 if args.mode == "full" or args.method != "sft" else 0.24
    if args.replay_fraction and args.method != "sft":
        p.error("--replay-fraction applies to --method sft only")
    if args.continue_training and (args.mode != "feedback" or args.round < 2):
        p.error("--continue needs --mode feedback and --round 2 or later (an adapter to continue from)")
    if not 0 <= args.sft_min_rating <= 1:
        p.error("--sft-min-rating must be in [0, 1]")
    for name in ("limit_train", "limit_test", "max_steps", "round"):
        v = getattr(args, name)
        if v is not None and v < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    args.api_key = default_api_key(args.api_key)
    if not args.api_key:
        p.error("give --api-key or set TUNELOOP_ADMIN_KEY")
    return args


def hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    tm: Any = args.target_modules
    if tm != "all-linear":
        tm = [m.strip() for m in tm.split(",") if m.strip()]
    hp: dict[str, Any] = {"n_epochs": args.epochs, "batch_size": args.batch_size,
                          "gradient_accumulation_steps": args.grad_accum, "learning_rate": args.lr,
                          "warmup_ratio": args.warmup_ratio, "lora_r": args.lora_r, "lora_alpha": args.lora_alpha,
                          "lora_dropout": args.lora_dropout, "target_modules": tm, "max_seq_len": args.max_seq_len,
                          "early_stopping_patience": 0, "seed": args.seed, "precision": args.precision}
    if args.max_steps:
        hp["max_steps"] = args.max_steps
    if args.replay_fraction:
        hp["replay_fraction"] = args.replay_fraction
        hp["replay_objective"] = args.replay_objective
        hp["max_seq_len"] = max(args.max_seq_len, 128)
    return hp


def curation(args: argparse.Namespace) -> dict[str, Any]:
    # Banking77 is mildly imbalanced on purpose (it mirrors real traffic): keep it; hold out a small split.
    cfg: dict[str, Any] = {"split": {"validation_fraction": args.validation_fraction},
                           "label_balance": {"enabled": False}, "seed": args.seed}
    if args.mode == "feedback" and args.sft_min_rating > 0:
        cfg["feedback"] = {"sft_min_rating": args.sft_min_rating}
    return cfg


def tag(limit: int | None, seed: int) -> str:
    return "all" if limit is None else f"{limit}-s{seed}"


# --- steps ----------------------------------------------------------------------------------------------
def ensure_rows(api: Api, deployment: str, name: str, rows: list[tuple[str, str]]) -> dict[str, Any]:
    ds = api.ensure_dataset(deployment, name)
    have = ds.get("records", 0)
    if have >= len(rows):
        say(f"   dataset {name} ({ds['id']}) already holds {have} records: not uploading again")
        return ds
    res = api.upload(ds["id"], [to_chat(t, c) for t, c in rows], desc=f"upload {name}")
    say(f"   {ds['id']}: accepted {res['accepted']}, duplicates {res['duplicates']}, rejected {res['rejected']}")
    return api.get(f"/v1/datasets/{ds['id']}")


def setup(api: Api, args: argparse.Namespace, test_rows: list[tuple[str, str]]) -> dict[str, Any]:
    step("1. deployments and the evaluation dataset")
    # The intent names from the whole train.csv (not the sample): what an application would configure.
    choices = sorted({c for _, c in read_rows(args.train_csv)}) if args.answer_choices else None
    _, created = api.ensure_deployment(args.base_deployment)
    say(f"   {'created' if created else 'reusing'} deployment {args.base_deployment} (stays on the base model)")
    api.patch(f"/v1/deployments/{args.base_deployment}", {"config": {"answer_choices": choices}})
    # The evaluation dataset exists before the deployment that names it (so its config is whole at creation;
    # datasets belong to a deployment), so it lives under the base deployment.
    eval_ds = ensure_rows(api, args.base_deployment, f"banking77-test-{tag(args.limit_test, args.seed)}", test_rows)
    config = {"eval_dataset_id": eval_ds["id"], "eval_max_rows": args.eval_max_rows,
              # eval_max_rows caps the snapshot's validation rows; eval_dataset_max_rows caps the dataset.
              "eval_dataset_max_rows": args.eval_max_rows, "retention_rows": args.retention_rows}
    if choices:
        config["answer_choices"] = choices
    dep, created = api.ensure_deployment(args.deployment, config)
    if created:
        shown = {**config, "answer_choices": f"<{len(choices)} intent names>"} if choices else config
        say(f"   created deployment {args.deployment} with config {json.dumps(shown)}")
    else:
        say(f"   deployment {args.deployment} exists (409): continuing with its config {json.dumps(dep['config'])}")
        if dep["config"].get("eval_dataset_id") != eval_ds["id"]:
            say("   note: its eval_dataset_id differs from this run's test sample; use --deployment NAME for a "
                "fresh deployment if that matters")
        api.patch(f"/v1/deployments/{args.deployment}", {"config": {"answer_choices": choices}})
    say(f"   answers constrained to {len(choices)} intent names" if choices else "   answers unconstrained")
    dep = api.get(f"/v1/deployments/{args.deployment}")  # with what serves it now
    say(f"   serving now: {dep.get('serving')}, production adapter: {dep.get('production_adapter_id')}")
    return {"deployment": dep, "eval_dataset": eval_ds, "config": dep["config"] if not created else config}


def measure(api: Api, args: argparse.Namespace, deployment: str, test_rows: list[tuple[str, str]],
            label: str) -> dict[str, Any]:
    queries = [Query(t, c, user=f"eval-{i % 50}", metadata={"source": "banking77-test"})
               for i, (t, c) in enumerate(test_rows)]
    start = time.monotonic()
    preds = classify(api.url, api.api_key, deployment, queries, args.concurrency, args.max_tokens,
                     desc=f"{label} via {deployment}")
    seconds = time.monotonic() - start
    acc = accuracy(preds)
    errors = sum(1 for p in preds if p.error)
    served = served_counts(preds)
    say(f"   {label}: exact-match accuracy {acc:.4f} on {len(preds)} test rows "
        f"({seconds:.0f} s, {len(preds) / seconds:.2f} req/s, served by {served}, errors {errors})")
    wrong = [p for p in preds if not p.correct][:3]
    for p in wrong:
        say(f"     e.g. {p.query.text[:60]!r} -> {p.output[:40]!r} (expected {p.query.expected})")
    return {"accuracy": acc, "rows": len(preds), "errors": errors, "seconds": round(seconds, 1),
            "requests_per_second": round(len(preds) / seconds, 3), "served_by": served,
            "sample_errors": [p.error for p in preds if p.error][:3]}


def train(api: Api, args: argparse.Namespace, body: dict[str, Any]) -> dict[str, Any]:
    job = api.post("/v1/fine_tuning/jobs", body)
    say(f"   job {job['id']} {job['status']} on snapshot {job['snapshot_id']}")
    say(f"   hyperparameters {json.dumps(job['hyperparameters'])}")
    say(f"   watch it: GET {api.url}/v1/fine_tuning/jobs/{job['id']}/events?stream=true "
        f"(or `tuneloop jobs watch {job['id']}`)")
    wall = time.monotonic()
    job = api.follow_job(job["id"])
    wall = time.monotonic() - wall
    secs = (job["finished_at"] - job["started_at"]) if job.get("started_at") and job.get("finished_at") else None
    say(f"   job {job['status']} in {secs if secs is not None else '?'} s (server), {wall:.0f} s (wall, incl. queue); "
        f"trained tokens {job.get('trained_tokens')}, metrics {json.dumps(job.get('metrics'))}")
    if job["status"] != "succeeded":
        raise RuntimeError(f"training job {job['id']} {job['status']}: {job.get('error')}")
    return {**job_record(job), "wall_seconds": round(wall, 1)}


def job_record(job: dict[str, Any]) -> dict[str, Any]:
    secs = (job["finished_at"] - job["started_at"]) if job.get("started_at") and job.get("finished_at") else None
    return {"id": job["id"], "status": job["status"], "seconds": secs, "trained_tokens": job.get("trained_tokens"),
            "metrics": job.get("metrics"), "hyperparameters": job["hyperparameters"],
            "adapter_id": job["adapter_id"], "snapshot_id": job["snapshot_id"]}


def evaluate_and_promote(api: Api, args: argparse.Namespace, adapter_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    step("evaluation (queued automatically after training)")
    try:
        ev = api.wait_evaluation(adapter_id, timeout=args.eval_timeout)
    except TimeoutError as exc:
        # An adapter without a finished evaluation is still a `candidate`, which promotion accepts.
        say(f"   warning: {exc}; continuing without it")
        evaluation: dict[str, Any] = {"status": "missing", "error": str(exc)}
    else:
        for line in eval_summary_lines(ev):
            say("   " + line)
        say(f"   report: {api.url}/v1/evaluations/{ev['id']}/report (Accept: text/html for the plots)")
        summary = ev.get("summary") or {}
        evaluation = {"id": ev["id"], "status": ev["status"], "reasons": ev.get("reasons"),
                      "task": summary.get("task"), "retention": summary.get("retention"), "rows": summary.get("rows")}
    step(f"promote {adapter_id} on {args.deployment}" + (" (force)" if args.force else ""))
    body: dict[str, Any] = {"adapter_id": adapter_id, "reason": f"examples/banking77/run.py --mode {args.mode}"}
    if args.force:
        body["force"] = True
    try:
        event = api.post(f"/v1/deployments/{args.deployment}/promote", body)
    except ApiError as exc:
        say(f"   promotion refused: {exc}")
        say("   (rerun with --adapter-id ID --force to serve it anyway)")
        return evaluation, {"promoted": False, "error": str(exc)}
    dep = api.get(f"/v1/deployments/{args.deployment}")
    say(f"   promoted: {json.dumps(event)}")
    say(f"   {args.deployment} now served by {dep.get('serving')}")
    return evaluation, {"promoted": True, "event": event, "serving": dep.get("serving")}


def simulate_feedback(api: Api, args: argparse.Namespace, train_rows: list[tuple[str, str]]) -> dict[str, Any]:
    """Users send train-style queries; wrong answers get the true intent as a correction (capped per intent)."""
    rng = random.Random(args.seed + args.round - 1)
    rows = sample(train_rows, args.sim_queries, args.seed + args.round)
    rng.shuffle(rows)
    segments = ("retail", "business")
    queries = []
    for t, c in rows:
        u = rng.randrange(args.users)
        queries.append(Query(t, c, user=f"user-{u}", metadata={"segment": segments[u % 2], "channel": "app"}))
    step(f"2. simulated traffic: {len(queries)} queries from train.csv through {args.deployment}")
    start = time.monotonic()
    preds = classify(api.url, api.api_key, args.deployment, queries, args.concurrency, args.max_tokens,
                     desc="simulated users")
    traffic_seconds = time.monotonic() - start
    say(f"   accuracy on simulated traffic {accuracy(preds):.4f} ({traffic_seconds:.0f} s, served by "
        f"{served_counts(preds)})")
    step("3. feedback: ratings for every answer, corrections for wrong ones")
    per_intent = corrections_given(api, args.deployment)  # earlier rounds' corrections count towards the cap
    before = sum(per_intent.values())
    items: list[dict[str, Any]] = []
    for p in preds:
        if p.completion_id is None:
            continue
        item: dict[str, Any] = {"completion_id": p.completion_id, "rating": 1.0 if p.correct else 0.0,
                                "id": f"sim-{p.completion_id}"}
        intent = p.query.expected
        if not p.correct and per_intent.get(intent, 0) < args.max_corrections_per_intent:
            item["correction"] = intent
            per_intent[intent] = per_intent.get(intent, 0) + 1
        items.append(item)
    for i in tqdm(range(0, len(items), 500), desc="POST /v1/feedback", unit="batch"):
        api.post("/v1/feedback", items[i:i + 500])
    corrections = sum(per_intent.values()) - before
    positive = sum(1 for x in items if x["rating"] == 1.0)
    say(f"   {len(items)} feedback items: {corrections} new corrections ({before} from earlier rounds), "
        f"{len(per_intent)} intents corrected in all, {positive} positive ratings")
    return {"round": args.round, "queries": len(queries), "accuracy": accuracy(preds),
            "seconds": round(traffic_seconds, 1), "feedback_items": len(items), "corrections": corrections,
            "earlier_corrections": before, "positive_ratings": positive, "intents_corrected": len(per_intent)}


def corrections_given(api: Api, deployment: str) -> dict[str, int]:
    """Corrections per intent the deployment's feedback already holds (`GET /v1/feedback`, all pages)."""
    counts: dict[str, int] = {}
    cursor = None
    while True:
        page = api.get("/v1/feedback", params={"deployment": deployment, "limit": 1000,
                                               **({"cursor": cursor} if cursor else {})})
        for f in page["data"]:
            if f.get("correction"):
                counts[f["correction"]] = counts.get(f["correction"], 0) + 1
        cursor = page.get("next_cursor")
        if not cursor:
            return counts


def write_results(path: Path, mode: str, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        existing = json.loads(path.read_text()) if path.exists() else {}
        if not isinstance(existing, dict):
            existing = {}
    except ValueError:
        existing = {}
    existing[mode] = results
    path.write_text(json.dumps(existing, indent=2, default=str) + "\n")
    say(f"\nresults written to {path} (key {mode!r})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    api = Api(args.url, args.api_key)
    t0 = time.monotonic()
    results: dict[str, Any] = {"mode": args.mode, "url": args.url, "deployment": args.deployment,
                               "limits": {"train": args.limit_train, "test": args.limit_test, "seed": args.seed},
                               "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    try:
        if not api.healthy():
            say(f"no tuneloop service answers at {args.url}/health; start one with `make run`")
            return 1
        api.wait_ready()
        train_rows = sample(read_rows(args.train_csv), args.limit_train, args.seed)
        test_rows = sample(read_rows(args.test_csv), args.limit_test, args.seed)
        say(f"train.csv: {len(train_rows)} rows, test.csv: {len(test_rows)} rows (seed {args.seed})")
        ctx = setup(api, args, test_rows)
        results["deployment_config"] = ctx["config"]
        results["eval_dataset_id"] = ctx["eval_dataset"]["id"]

        if not args.skip_base:
            step(f"base accuracy on test.csv through the gateway ({args.base_deployment})")
            results["base"] = measure(api, args, args.base_deployment, test_rows, "base")

        hp = hyperparameters(args)
        results["hyperparameters_requested"] = hp
        if args.adapter_id:
            adapter = api.get(f"/v1/adapters/{args.adapter_id}")
            say(f"\nusing adapter {adapter['id']} v{adapter['version']} ({adapter['status']}), no training")
            results["adapter_id"] = adapter["id"]
            if adapter.get("job_id"):
                results["job"] = job_record(api.get(f"/v1/fine_tuning/jobs/{adapter['job_id']}"))
        elif args.mode == "full":
            step("2. training data: train.csv as chat rows (user = query, assistant = intent)")
            train_ds = ensure_rows(api, args.deployment, f"banking77-train-{tag(args.limit_train, args.seed)}",
                                   train_rows)
            step("3. snapshot (curation)")
            snap = api.snapshot(train_ds["id"], {"curation": curation(args)})
            say(f"   snapshot {snap['id']}: counts {json.dumps(snap['counts'])}")
            say(f"   data-quality report: {api.url}/v1/snapshots/{snap['id']}/report")
            results["snapshot"] = {"id": snap["id"], "counts": snap["counts"], "curation": curation(args)}
            step("4. training job (SFT, LoRA)")
            results["job"] = train(api, args, {"deployment": args.deployment, "snapshot_id": snap["id"],
                                               "method": {"type": "sft", "hyperparameters": hp},
                                               "suffix": "banking77", "seed": args.seed})
            results["adapter_id"] = results["job"]["adapter_id"]
        else:
            results["feedback"] = simulate_feedback(api, args, train_rows)
            step(f"4. training job from feedback only ({args.method})")
            body = {"deployment": args.deployment, "include_feedback": True, "datasets": [],
                    "curation": curation(args), "method": {"type": args.method, "hyperparameters": hp},
                    "suffix": f"feedback-r{args.round}", "seed": args.seed}
            if args.continue_training:
                parent = api.get(f"/v1/deployments/{args.deployment}")["production_adapter_id"]
                if parent is None:
                    raise RuntimeError(f"--continue: {args.deployment} serves the base model, no adapter to continue")
                say(f"   continuing from the production adapter {parent}")
                body["parent_adapter_id"] = parent
            results["job"] = train(api, args, body)
            results["adapter_id"] = results["job"]["adapter_id"]

        results["evaluation"], results["promotion"] = evaluate_and_promote(api, args, results["adapter_id"])
        if results["promotion"]["promoted"] and not args.skip_measure:
            step(f"adapter accuracy on test.csv through the gateway ({args.deployment})")
            results["adapter"] = measure(api, args, args.deployment, test_rows, "adapter")
        results["total_seconds"] = round(time.monotonic() - t0, 1)
        step("summary")
        base_acc = (results.get("base") or {}).get("accuracy")
        ad_acc = (results.get("adapter") or {}).get("accuracy")
        say(f"   base accuracy     {base_acc if base_acc is None else f'{base_acc:.4f}'}")
        say(f"   adapter accuracy  {ad_acc if ad_acc is None else f'{ad_acc:.4f}'}")
        if results.get("job"):
            say(f"   training          {results['job']['seconds']} s, {results['job']['trained_tokens']} tokens")
        say(f"   total             {results['total_seconds']} s")
        return 0 if results["promotion"]["promoted"] else 2
    except (ApiError, RuntimeError, TimeoutError) as exc:
        results["error"] = str(exc)
        say(f"\nfailed: {exc}")
        return 1
    finally:
        key = args.mode if args.round == 1 else f"{args.mode}-round{args.round}"
        key += "" if args.method == "sft" else f"-{args.method}"
        key += "-continued" if args.continue_training else ""
        write_results(args.out, key + ("-choices" if args.answer_choices else ""), results)
        api.close()


if __name__ == "__main__":
    sys.exit(main())
