"""Child-process hygiene shared by everything tuneloop spawns (vLLM, worker, training runs)."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def parent_death_signal() -> None:
    """`preexec_fn` for children: the kernel SIGKILLs them if their parent dies, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:  # non-Linux: best effort
        pass
