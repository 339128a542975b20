"""LoRA time per decoder step inside vLLM's CPU LoRA layer, one adapter vs mixed adapters, side by side.

Run: .venv/bin/python benchmarks/lora_ops.py [--rank 8] [--tokens 5,40]

A step whose tokens use different adapters (an A/B experiment, a swap while the old adapter's requests
finish, base requests beside LoRA ones) cannot take the one-adapter fast path of `service/vllm/cpu_lora.py`.
This times `PunicaWrapperCPU.add_lora_linear` for SmolLM2-135M's LoRA layers (q/k/v, o, gate/up, down; one
decoder layer, times 30 layers) on one thread, with random weights in 4 slots:

- tuneloop: the plugin's path (one adapter: two matmuls per slice; mixed: the used slots side by side + a mask);
- vLLM's path with tuneloop's ops: what a mixed step ran before the masked path;
- vLLM's path with vLLM's ops (`TUNELOOP_VLLM_CPU_LORA=vllm`).

Every path's output is checked against the tuneloop one, so the ratios compare equal work.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.vllm import cpu_lora

SLOTS = 4
LAYERS = [(576, (576, 192, 192)), (576, (576,)), (576, (1536, 1536)), (1536, (576,))]  # in, output slices
OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def wrapper(fast: bool, tokens: int, indices: torch.Tensor) -> Any:
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    cls = type("Wrapper", (PunicaWrapperCPU,), {})
    if fast:
        cpu_lora._install_linear_fast_path(cls)
    w = cls(max_num_batched_tokens=512, max_batches=8, device="cpu")
    w._token_lora_indices[:tokens] = indices
    w.indices_len = [tokens] * 4
    w.is_prefill = False
    cpu_lora.plan_step(w, indices)
    return w


def use_ops(source: Any) -> None:
    """Point vLLM's CPU LoRA layer at these bgmv ops (tuneloop's or vLLM's own)."""
    from vllm.lora.punica_wrapper import punica_cpu

    for name in OPS:
        setattr(punica_cpu, name, getattr(source, name))


def step_ms(w: Any, data: list[tuple[torch.Tensor, ...]], repeats: int) -> tuple[float, list[torch.Tensor]]:
    outs = [y.clone() for y, *_ in data]
    for out, (_, x, a, b, widths) in zip(outs, data, strict=True):
        w.add_lora_linear(out, x, a, b, 1.0, widths)
    for _ in range(10):
        for y, x, a, b, widths in data:
            w.add_lora_linear(y.clone(), x, a, b, 1.0, widths)
    scratch = [y.clone() for y, *_ in data]  # the inputs stay as they are for the next path
    t0 = time.perf_counter()
    for _ in range(repeats):
        for y, (_, x, a, b, widths) in zip(scratch, data, strict=True):
            w.add_lora_linear(y, x, a, b, 1.0, widths)
    return (time.perf_counter() - t0) / repeats * 30 * 1e3, outs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--tokens", default="5,40", help="tokens per step (5 decoding requests; a short prefill)")
    ap.add_argument("--repeats", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from vllm.lora.ops.torch_ops import lora_ops as vllm_ops

    vllm_own = type("VllmOps", (), {n: staticmethod(getattr(vllm_ops, n)) for n in OPS})
    g = torch.Generator().manual_seed(0)
    print(f"LoRA ms per decoder step (30 layers, rank {args.rank}, one thread)")
    print(f"{'tokens':>6} {'batch':>12} {'tuneloop':>9} {'vLLM path + tuneloop ops':>25} {'vLLM path + vLLM ops':>21}")
    for tokens in (int(t) for t in args.tokens.split(",")):
        data = [(torch.randn(tokens, sum(widths), generator=g), torch.randn(tokens, width_in, generator=g),
                 tuple(torch.randn(SLOTS, 1, args.rank, width_in, generator=g) * 0.1 for _ in widths),
                 tuple(torch.randn(SLOTS, 1, w, args.rank, generator=g) * 0.1 for w in widths), widths)
                for width_in, widths in LAYERS]
        for batch, indices in (("one adapter", torch.full((tokens,), 1)),
                               ("two adapters", torch.tensor([1, 2] * (tokens // 2) + [1] * (tokens % 2)))):
            use_ops(cpu_lora)
            ours, expected = step_ms(wrapper(True, tokens, indices), data, args.repeats)
            theirs, got = step_ms(wrapper(False, tokens, indices), data, args.repeats)
            use_ops(vllm_own)
            vllm, got_vllm = step_ms(wrapper(False, tokens, indices), data, args.repeats)
            use_ops(cpu_lora)
            for e, a, b in zip(expected, got, got_vllm, strict=True):
                torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-4)
                torch.testing.assert_close(b, e, rtol=1e-4, atol=1e-4)
            print(f"{tokens:>6} {batch:>12} {ours:>9.1f} {theirs:>16.1f} ({theirs / ours:.1f}x) "
                  f"{vllm:>12.1f} ({vllm / ours:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
