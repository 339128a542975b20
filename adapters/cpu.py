"""What this CPU can do fast, read from /proc/cpuinfo: the one place serving and training ask."""

from __future__ import annotations

from pathlib import Path

BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def has_bf16_units(cpuinfo: str | None = None) -> bool:
    """True on CPUs with BF16 units (AVX512-BF16 or AMX). Without them bf16 math is emulated and ~3x slower
    than fp32 (benchmarks/README.md); with them it is the faster choice for serving and for training."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags = {flag for line in cpuinfo.splitlines() if line.startswith("flags") for flag in line.split()}
    return bool(flags & BF16_FLAGS)
