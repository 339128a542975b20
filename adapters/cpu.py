"""What this CPU can do fast: the one place serving and training ask whether bf16 pays off here.

The flags in /proc/cpuinfo are necessary but not sufficient. An Intel Xeon (family 6, model 207) whose hypervisor
hides AMX lists `avx512_bf16`, yet there torch's bf16 matmul ran at half fp32's speed and vLLM's LoRA throughput
fell from 5.9 to 4.4 req/s in bf16 (benchmarks/README.md). So bf16 is chosen only when the units are listed *and*
a bf16 matmul measured on this machine is clearly faster than fp32.
"""

from __future__ import annotations

import functools
import logging
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger("tuneloop.cpu")
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
MIN_BF16_SPEEDUP = 1.2  # measured margins were 0.5x (units hidden), 2.2x (AVX512-BF16) and 7.7x (AMX)


def has_bf16_units(cpuinfo: str | None = None) -> bool:
    """True where /proc/cpuinfo lists BF16 units (AVX512-BF16 or AMX). Without them bf16 math is emulated and ~3x
    slower than fp32 (benchmarks/README.md), so nothing is measured."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split()}
    return bool(flags & BF16_FLAGS)


def matmul_bf16_speedup(rows: int = 512, hidden: int = 576, inner: int = 1536, repeats: int = 5) -> float:
    """fp32 time / bf16 time of one-thread matmuls at SmolLM2's MLP shape (imports torch; about a second).

    The best of `repeats` timings per dtype, so a neighbour's burst on a shared VM does not decide it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = {}
        for dtype in (torch.float32, torch.bfloat16):
            a, b = torch.randn(rows, hidden, dtype=dtype), torch.randn(hidden, inner, dtype=dtype)
            for _ in range(3):
                a @ b
            timings = []
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in range(4):
                    a @ b
                timings.append(time.perf_counter() - start)
            best[dtype] = min(timings)
        return best[torch.float32] / best[torch.bfloat16]
    finally:
        torch.set_num_threads(threads)


@functools.cache
def measured_bf16_speedup() -> float:
    """`matmul_bf16_speedup` in a child process, once per process: the API process never imports torch.
    If the check itself fails, 0.0 (so fp32, which is right on every CPU) and a warning saying why."""
    try:
        out = subprocess.run([sys.executable, "-c", "from adapters.cpu import matmul_bf16_speedup as m; print(m())"],
                             capture_output=True, text=True, timeout=120, check=True,
                             cwd=Path(__file__).resolve().parent.parent)
        speedup = float(out.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError, subprocess.SubprocessError) as exc:
        log.warning("bf16 speed check failed, using fp32: %s", getattr(exc, "stderr", None) or exc)
        return 0.0
    log.info("bf16 matmul measured %.3fx fp32's speed on this CPU (bf16 from %sx)", speedup, MIN_BF16_SPEEDUP)
    return speedup


def prefers_bf16(cpuinfo: str | None = None, speedup: float | None = None) -> bool:
    """bf16 where the CPU lists BF16 units and bf16 measured at least `MIN_BF16_SPEEDUP` x faster than fp32 here.
    `speedup` is for tests; by default it is measured (only when the units are listed)."""
    if not has_bf16_units(cpuinfo):
        return False
    return (measured_bf16_speedup() if speedup is None else speedup) >= MIN_BF16_SPEEDUP
