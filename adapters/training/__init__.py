"""LoRA training: validated configs, one recipe per method, optuna search, and the subprocess entry point.

Heavy imports (torch, transformers, trl) happen inside the modules that need them, so importing the
config from the service stays cheap.
"""

from adapters.training.config import (
    Hyperparameters,
    SearchSpec,
    TrainingJobSpec,
    auto_hyperparameters,
)

__all__ = ["Hyperparameters", "SearchSpec", "TrainingJobSpec", "auto_hyperparameters"]
