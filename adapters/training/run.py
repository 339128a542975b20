"""Subprocess entry point: ``python -m adapters.training.run SPEC_JSON_PATH``.

Protocol with the worker: one JSON event per line on STDOUT (flushed each time); everything else
(library logs, progress bars, stray prints) is redirected to STDERR so it cannot corrupt the stream.
Exit codes: 0 succeeded, 1 error (after an ``error`` event), 3 cancelled (SIGTERM: the recipe stops
after its current optimizer step, saves a checkpoint and emits ``cancelled``). Rerunning the same spec
resumes from the latest checkpoint. Results: ``output_dir/adapter/`` (PEFT) and ``output_dir/result.json``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

EXIT_OK, EXIT_ERROR, EXIT_CANCELLED = 0, 1, 3


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def make_emitter(stream: TextIO) -> Callable[[dict[str, Any]], None]:
    lock = threading.Lock()

    def emit(event: dict[str, Any]) -> None:
        line = json.dumps(_json_safe(event), default=str, allow_nan=False)
        with lock:
            stream.write(line + "\n")
            stream.flush()

    return emit


def _recipe(method: str) -> Any:
    if method == "sft":
        from adapters.training.sft import train_sft

        return train_sft
    if method == "dpo":
        from adapters.training.dpo import train_dpo

        return train_dpo
    from adapters.training.kto import train_kto

    return train_kto


def run_spec(spec: Any, emit: Callable[[dict[str, Any]], None], should_stop: Callable[[], bool]) -> Any:
    """Run a spec in-process (what ``main`` does after parsing); returns a RecipeResult."""
    import torch

    from adapters.training.common import write_result

    if spec.num_threads:
        torch.set_num_threads(spec.num_threads)
    for name in ("base_model_path", "train_path", "validation_path"):
        value = getattr(spec, name)
        if value and not Path(value).exists():
            raise FileNotFoundError(f"{name} does not exist: {value}")
    Path(spec.output_dir).mkdir(parents=True, exist_ok=True)
    recipe = _recipe(spec.method)
    if spec.search is not None:
        from adapters.training.search import run_search

        result = run_search(spec, recipe, emit, should_stop)
    else:
        result = recipe(spec, emit, should_stop)
    write_result(spec.output_dir, _json_safe({**result.to_dict(), "method": spec.method,
                                              "hyperparameters": spec.hyperparameters.to_dict()}))
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    events = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # library prints (Trainer log dicts, tqdm) now land on stderr
    sys.stdout = sys.stderr
    emit = make_emitter(events)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    if len(argv) != 1:
        emit({"type": "error", "message": "usage: python -m adapters.training.run SPEC_JSON_PATH"})
        return EXIT_ERROR
    try:
        from adapters.training.config import TrainingJobSpec

        spec = TrainingJobSpec.load(argv[0])
        result = run_spec(spec, emit, stop.is_set)
    except Exception as exc:  # noqa: BLE001 - the worker needs a message, the log gets the trace
        traceback.print_exc(file=sys.stderr)
        emit({"type": "error", "message": f"{type(exc).__name__}: {exc}"})
        return EXIT_ERROR
    return EXIT_CANCELLED if result.status == "cancelled" else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
