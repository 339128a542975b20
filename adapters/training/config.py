"""Validated training configuration: hyperparameters, search space and the job spec the worker writes.

The spec is the contract between the worker (which writes it as JSON) and ``run.py`` (which reads it),
so every field is validated here with a message naming the field and its allowed range.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from adapters.cpu import prefers_bf16

Method = Literal["sft", "dpo", "kto"]
METHODS: tuple[str, ...] = ("sft", "dpo", "kto")
SCHEDULERS: tuple[str, ...] = ("linear", "cosine")
REPLAY_OBJECTIVES: tuple[str, ...] = ("answers", "kl")
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")
# What a parent adapter fixes when training continues from it (its weights only fit that shape).
LORA_SHAPE: tuple[str, ...] = ("lora_r", "lora_alpha", "target_modules")


def _check_range(name: str, value: Any, low: float, high: float, *, integer: bool) -> None:
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or (not integer and not math.isfinite(value)):
        raise ValueError(f"{name} must be {kind} in [{low}, {high}], got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value!r}")


@dataclass
class Hyperparameters:
    """Training hyperparameters shared by all methods (the TRL recipes ignore what they cannot use)."""

    n_epochs: int = 3
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] | str = "all-linear"
    max_seq_len: int = 512
    early_stopping_patience: int = 0
    max_steps: int | None = None
    seed: int = 0
    replay_fraction: float = 0.0  # SFT only: share of the base model's own general answers (replay.py)
    replay_objective: str = "kl"  # "kl": match the base model's distributions on them; "answers": its greedy answers
    neftune_noise_alpha: float = 0.0  # NEFTune: uniform noise on input embeddings while training (0 = off)
    # "bf16" keeps the frozen base weights in bfloat16 and computes under bf16 autocast (LoRA weights and optimizer
    # stay fp32, in SFT the logits too; DPO/KTO use Accelerate's autocast); "auto": bf16 where it pays off on this
    # CPU (BF16 units listed and measured faster: adapters.cpu.prefers_bf16), else fp32.
    # fp32 by default: exact and the same on every CPU; bf16 is faster there, at -1.3 accuracy points on average
    # over three paired seeds on Banking77, within seed noise (examples/banking77/README.md)
    precision: str = "fp32"

    def __post_init__(self) -> None:
        _check_range("n_epochs", self.n_epochs, 1, 50, integer=True)
        _check_range("batch_size", self.batch_size, 1, 512, integer=True)
        _check_range("gradient_accumulation_steps", self.gradient_accumulation_steps, 1, 256, integer=True)
        _check_range("learning_rate", self.learning_rate, 1e-6, 1e-2, integer=False)
        if self.lr_scheduler not in SCHEDULERS:
            raise ValueError(f"lr_scheduler must be one of {list(SCHEDULERS)}, got {self.lr_scheduler!r}")
        _check_range("warmup_ratio", self.warmup_ratio, 0, 0.5, integer=False)
        _check_range("weight_decay", self.weight_decay, 0, 1, integer=False)
        _check_range("lora_r", self.lora_r, 1, 256, integer=True)
        _check_range("lora_alpha", self.lora_alpha, 1, 1024, integer=True)
        _check_range("lora_dropout", self.lora_dropout, 0, 0.5, integer=False)
        tm = self.target_modules
        if isinstance(tm, str):
            if tm != "all-linear":
                raise ValueError(f"target_modules must be 'all-linear' or a non-empty list of module names, got {tm!r}")
        elif not (isinstance(tm, (list, tuple)) and tm and all(isinstance(m, str) and m for m in tm)):
            raise ValueError(f"target_modules must be 'all-linear' or a non-empty list of module names, got {tm!r}")
        else:
            self.target_modules = list(tm)
        _check_range("max_seq_len", self.max_seq_len, 16, 8192, integer=True)
        _check_range("early_stopping_patience", self.early_stopping_patience, 0, 100, integer=True)
        if self.max_steps is not None:
            _check_range("max_steps", self.max_steps, 1, 10**9, integer=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        _check_range("replay_fraction", self.replay_fraction, 0, 0.9, integer=False)
        _check_range("neftune_noise_alpha", self.neftune_noise_alpha, 0, 50, integer=False)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.replay_objective not in REPLAY_OBJECTIVES:
            raise ValueError(f"replay_objective must be one of {list(REPLAY_OBJECTIVES)}, "
                             f"got {self.replay_objective!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Hyperparameters:
        """Build from a plain dict, rejecting unknown keys by name (typos must not silently use defaults)."""
        if not isinstance(data, dict):
            raise ValueError(f"hyperparameters must be an object, got {type(data).__name__}")  # noqa: TRY004
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown hyperparameter(s): {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resolved_precision(self) -> str:
        """"fp32" or "bf16": what ``precision`` means on this machine."""
        if self.precision == "auto":
            return "bf16" if prefers_bf16() else "fp32"
        return self.precision

    def replace(self, **changes: Any) -> Hyperparameters:
        """A validated copy with some fields changed (used by the search)."""
        return Hyperparameters.from_dict({**self.to_dict(), **changes})


def auto_hyperparameters(n_train_rows: int, mean_tokens: float, base_model_params: int,
                         method: str = "sft") -> Hyperparameters:
    """Pick defaults from the data size and model size (the rule the service uses when the user gives none).

    | input                        | rule                                                        |
    |------------------------------|-------------------------------------------------------------|
    | rows < 100                   | n_epochs 10 (few rows need more passes)                     |
    | rows < 1,000                 | n_epochs 5                                                  |
    | rows < 10,000                | n_epochs 3                                                  |
    | rows >= 10,000               | n_epochs 2                                                  |
    | mean_tokens                  | batch_size = clamp(2048 // mean_tokens, 4, 32) (≈2k tokens  |
    |                              | per micro-batch keeps CPU GEMMs efficient without swapping) |
    | rows / batch < 20            | batch_size halved until ≥ 20 optimizer steps per epoch      |
    | params < 1e9                 | learning_rate 2e-4 (small models tolerate a high LoRA lr)   |
    | params < 1e10                | learning_rate 1e-4                                          |
    | larger                       | learning_rate 5e-5                                          |
    | always                       | lora_r 16, lora_alpha 32, all-linear, warmup 5%, linear     |
    | max_seq_len                  | next power of two ≥ 2 × mean_tokens, clamped to [64, 2048]  |
    | rows ≥ 200                   | early_stopping_patience 3 (enough validation rows to trust) |
    | method sft                   | replay_fraction 0.24, replay_objective kl, max_seq_len ≥ 128 |
    |                              | (against forgetting: on 770 Banking77 rows the GSM8K NLL    |
    |                              | rise went from +52 % to -2 % for 1 point of accuracy,       |
    |                              | examples/banking77/README.md; prompts need ≤ 72 + 56 tokens) |
    """
    if n_train_rows < 1:
        raise ValueError(f"n_train_rows must be >= 1, got {n_train_rows}")
    if mean_tokens <= 0:
        raise ValueError(f"mean_tokens must be > 0, got {mean_tokens}")
    if n_train_rows < 100:
        epochs = 10
    elif n_train_rows < 1_000:
        epochs = 5
    elif n_train_rows < 10_000:
        epochs = 3
    else:
        epochs = 2
    batch = int(min(32, max(4, 2048 // max(1, int(mean_tokens)))))
    while batch > 1 and n_train_rows / batch < 20:
        batch //= 2
    if base_model_params < 1_000_000_000:
        lr = 2e-4
    elif base_model_params < 10_000_000_000:
        lr = 1e-4
    else:
        lr = 5e-5
    seq = 64
    while seq < 2 * mean_tokens and seq < 2048:
        seq *= 2
    replay = method == "sft"
    return Hyperparameters(
        n_epochs=epochs,
        batch_size=batch,
        learning_rate=lr,
        lora_r=16,
        lora_alpha=32,
        max_seq_len=max(seq, 128) if replay else seq,
        early_stopping_patience=3 if n_train_rows >= 200 else 0,
        replay_fraction=0.24 if replay else 0.0,
    )


def parent_lora_shape(adapter_dir: str | Path) -> dict[str, Any]:
    """The LoRA shape of a saved PEFT adapter: its rank, alpha and target modules (peft stores "all-linear"
    expanded to module names)."""
    path = Path(adapter_dir) / "adapter_config.json"
    if not path.is_file():
        raise ValueError(f"the parent adapter has no adapter_config.json in {adapter_dir}")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    return {"lora_r": int(cfg["r"]), "lora_alpha": int(cfg["lora_alpha"]),
            "target_modules": sorted(cfg["target_modules"])}


def inherit_lora_shape(hyperparameters: dict[str, Any], adapter_dir: str | Path,
                       explicit: Any = ()) -> dict[str, Any]:
    """``hyperparameters`` with the parent adapter's LoRA shape. A field the user set explicitly (named in
    ``explicit``) to another value is an error naming it; ``target_modules: "all-linear"`` always fits."""
    shape = parent_lora_shape(adapter_dir)
    for name in LORA_SHAPE:
        if name not in explicit or hyperparameters.get(name) == "all-linear":
            continue
        given = hyperparameters.get(name)
        if (sorted(given) if isinstance(given, list) else given) != shape[name]:
            raise ValueError(f"{name} must match the parent adapter's ({shape[name]!r}) or be left out, "
                             f"got {given!r}")
    return {**hyperparameters, **shape}


def check_search_keeps_shape(space: dict[str, Any]) -> None:
    """A search continued from a parent adapter may not vary the LoRA shape the parent fixes."""
    fixed = sorted(set(space) & set(LORA_SHAPE))
    if fixed:
        raise ValueError(f"search.space.{fixed[0]} cannot vary: the parent adapter fixes the LoRA shape")


# Search-space keys and how they are sampled: [low, high] ranges or a list of choices.
_FLOAT_RANGES = {"learning_rate", "warmup_ratio", "weight_decay", "lora_dropout"}
_CHOICE_ONLY = {"lora_r", "lora_alpha", "batch_size", "gradient_accumulation_steps", "n_epochs", "lr_scheduler",
                "target_modules"}


@dataclass
class SearchSpec:
    """Hyperparameter search: ``space`` maps a hyperparameter to ``[low, high]`` (floats, sampled
    log-uniform for learning_rate) or to a list of choices (integers/strings)."""

    n_trials: int = 4
    space: dict[str, list[Any]] = field(default_factory=lambda: {"learning_rate": [5e-5, 5e-4]})

    def __post_init__(self) -> None:
        _check_range("search.n_trials", self.n_trials, 1, 200, integer=True)
        if not isinstance(self.space, dict) or not self.space:
            raise ValueError("search.space must be a non-empty object")
        for key, values in self.space.items():
            if key not in _FLOAT_RANGES | _CHOICE_ONLY:
                raise ValueError(f"search.space.{key} is not searchable; allowed: "
                                 f"{', '.join(sorted(_FLOAT_RANGES | _CHOICE_ONLY))}")
            if not isinstance(values, list) or not values:
                raise ValueError(f"search.space.{key} must be a non-empty list")
            if key in _FLOAT_RANGES:
                if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               for v in values) or values[0] >= values[1]:
                    raise ValueError(f"search.space.{key} must be [low, high] with low < high, got {values!r}")
                # Both ends must be valid hyperparameters themselves.
                for v in values:
                    Hyperparameters.from_dict({key: v})
            else:
                for v in values:
                    Hyperparameters.from_dict({key: v})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TrainingJobSpec:
    """Everything one training subprocess needs; written by the worker as JSON."""

    method: str
    base_model_path: str
    train_path: str
    output_dir: str
    validation_path: str | None = None
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    search: SearchSpec | None = None
    eval_every_steps: int | None = None  # None: about 10 evaluations per run
    checkpoint_every_steps: int | None = None  # None: at every evaluation (or every eval-sized interval)
    num_threads: int | None = None  # torch intra-op threads; None: torch's default (all cores)
    # Continued training: start from this PEFT adapter's weights instead of a fresh LoRA (its shape must match)
    init_adapter_path: str | None = None
    # Replayed base-model answers, shared by every job on the same base model (replay.py); None: per job only
    replay_cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        for name in ("base_model_path", "train_path", "output_dir"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty path string")
        for name in ("validation_path", "replay_cache_dir"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a path string or null")
        if isinstance(self.hyperparameters, dict):
            self.hyperparameters = Hyperparameters.from_dict(self.hyperparameters)
        if isinstance(self.search, dict):
            self.search = SearchSpec(**self.search)
        for name in ("eval_every_steps", "checkpoint_every_steps", "num_threads"):
            value = getattr(self, name)
            if value is not None:
                _check_range(name, value, 1, 10**9, integer=True)
        if self.search is not None and not self.validation_path:
            raise ValueError("validation_path is required when search is set (trials are ranked on validation loss)")
        if self.hyperparameters.replay_fraction and self.method != "sft":
            raise ValueError(f"replay_fraction applies to sft only, not {self.method}")
        if self.hyperparameters.early_stopping_patience and not self.validation_path:
            raise ValueError("validation_path is required when early_stopping_patience > 0")
        if self.init_adapter_path is not None:
            if not isinstance(self.init_adapter_path, str) or not self.init_adapter_path:
                raise ValueError("init_adapter_path must be a non-empty path string or null")
            if self.search:
                check_search_keeps_shape(self.search.space)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingJobSpec:
        if not isinstance(data, dict):
            raise ValueError("training job spec must be a JSON object")  # noqa: TRY004
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown spec field(s): {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        data = dict(data)
        data["hyperparameters"] = Hyperparameters.from_dict(data.get("hyperparameters") or {})
        if data.get("search") is not None:
            search = data["search"]
            if not isinstance(search, dict):
                raise ValueError("search must be an object or null")
            unknown_s = sorted(set(search) - {"n_trials", "space"})
            if unknown_s:
                raise ValueError(f"unknown search field(s): {', '.join(unknown_s)}")
            data["search"] = SearchSpec(**search)
        try:
            return cls(**data)
        except TypeError as exc:  # missing required fields
            raise ValueError(f"invalid training job spec: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> TrainingJobSpec:
        return cls.from_dict(json.loads(text))

    @classmethod
    def load(cls, path: str | Path) -> TrainingJobSpec:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))
