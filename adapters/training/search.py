"""Hyperparameter search: an Optuna TPE study with median pruning on validation loss.

Each trial runs the normal recipe into ``output_dir/trials/trial-N``; every validation event is reported
to Optuna and a trial whose loss is worse than the median of earlier trials at the same step is stopped.
The study lives in ``output_dir/search.db`` (SQLite), so rerunning the same spec continues the search
instead of restarting it. The best trial's adapter is copied to ``output_dir/adapter``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adapters.training.common import (
    ADAPTER_DIR,
    CHECKPOINT_DIR,
    Emit,
    RecipeResult,
    ShouldStop,
    copy_adapter,
    discard,
    never_stop,
)
from adapters.training.config import _FLOAT_RANGES, TrainingJobSpec

Recipe = Callable[[TrainingJobSpec, Emit, ShouldStop], RecipeResult]
_LOG_SCALE = {"learning_rate"}
_FORWARDED = {"step", "validation", "checkpoint", "resumed"}


def suggest(trial: Any, space: dict[str, list[Any]]) -> dict[str, Any]:
    """Sample one point of ``space``: [low, high] for float keys, a list of choices otherwise."""
    params: dict[str, Any] = {}
    for key, values in space.items():
        if key in _FLOAT_RANGES:
            params[key] = trial.suggest_float(key, float(values[0]), float(values[1]), log=key in _LOG_SCALE)
        elif all(v is None or isinstance(v, (bool, int, float, str)) for v in values):
            params[key] = trial.suggest_categorical(key, values)
        else:  # e.g. target_modules lists: Optuna only takes primitive choices
            params[key] = json.loads(trial.suggest_categorical(key, [json.dumps(v) for v in values]))
    return params


def run_search(spec: TrainingJobSpec, recipe: Recipe, emit: Emit = discard,
               should_stop: ShouldStop = never_stop) -> RecipeResult:
    import optuna
    from optuna.trial import TrialState

    assert spec.search is not None, "run_search needs spec.search"
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name="search", storage=f"sqlite:///{out / 'search.db'}", load_if_exists=True, direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=spec.hyperparameters.seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0),
    )
    for stale in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):  # killed mid-trial
        study._storage.set_trial_state_values(stale._trial_id, TrialState.FAIL)
    cancelled = False
    trained_tokens = 0

    def objective(trial: Any) -> float:
        nonlocal cancelled, trained_tokens
        params = suggest(trial, spec.search.space)  # type: ignore[union-attr]
        trial_spec = dataclasses.replace(
            spec, hyperparameters=spec.hyperparameters.replace(**params),
            output_dir=str(out / "trials" / f"trial-{trial.number}"), search=None,
        )
        pruned = False

        def trial_emit(event: dict[str, Any]) -> None:
            nonlocal pruned
            if event["type"] in _FORWARDED:
                emit({**event, "trial": trial.number})
            if event["type"] == "validation":
                trial.report(float(event["val_loss"]), int(event["step"]))
                pruned = pruned or trial.should_prune()

        def trial_stop() -> bool:
            return pruned or should_stop()

        emit({"type": "trial", "number": trial.number, "state": "running", "params": params})
        result = recipe(trial_spec, trial_emit, trial_stop)
        trained_tokens += result.trained_tokens
        shutil.rmtree(Path(trial_spec.output_dir) / CHECKPOINT_DIR, ignore_errors=True)
        if result.status == "cancelled" and not pruned:
            cancelled = True
            trial.study.stop()
            raise optuna.TrialPruned("cancelled")
        if pruned:
            emit({"type": "trial", "number": trial.number, "state": "pruned", "params": params,
                  "value": result.best_val_loss})
            raise optuna.TrialPruned()
        value = result.best_val_loss if result.best_val_loss is not None else math.inf
        emit({"type": "trial", "number": trial.number, "state": "complete", "params": params, "value": value,
              "metrics": result.metrics})
        return value

    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    remaining = spec.search.n_trials - len(study.get_trials(deepcopy=False, states=finished))
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, catch=())
    if cancelled:
        emit({"type": "cancelled", "step": None})
        return RecipeResult(status="cancelled")
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise RuntimeError("search finished without a complete trial (all trials pruned or failed)")
    best = min(complete, key=lambda t: t.value)
    copy_adapter(out / "trials" / f"trial-{best.number}" / ADAPTER_DIR, out / ADAPTER_DIR)
    metrics = {
        "best_trial": best.number, "best_params": best.params, "best_val_loss": best.value,
        "n_trials": len(study.trials),
        "trials": [{"number": t.number, "state": t.state.name.lower(), "value": t.value, "params": t.params}
                   for t in study.trials],
    }
    emit({"type": "done", "metrics": metrics, "trained_tokens": trained_tokens})
    return RecipeResult(status="succeeded", metrics=metrics, trained_tokens=trained_tokens,
                        adapter_dir=str(out / ADAPTER_DIR),
                        best_val_loss=best.value)
