"""Validated curation options, one small dataclass per step.

The config is part of a snapshot's identity (same rows + same config ⇒ same snapshot), so it is
strict: unknown keys are rejected by name instead of being silently ignored, and every value is
range-checked when the object is built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, get_type_hints


def _check_bool(obj: Any, name: str) -> None:
    if not isinstance(getattr(obj, name), bool):
        raise ValueError(  # noqa: TRY004 - config errors are ValueErrors naming the field (project rule)
            f"{obj.PREFIX}.{name} must be true or false, got {getattr(obj, name)!r}"
        )


def _check_int(obj: Any, name: str, lo: int, hi: int | None = None) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{obj.PREFIX}.{name} must be an integer {rng}, got {value!r}")


def _check_float(
    obj: Any, name: str, lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False
) -> None:
    value = getattr(obj, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{obj.PREFIX}.{name} must be a number in {rng}, got {value!r}")
    object.__setattr__(obj, name, float(value))


def _check_choice(obj: Any, name: str, choices: tuple[str, ...]) -> None:
    if getattr(obj, name) not in choices:
        raise ValueError(
            f"{obj.PREFIX}.{name} must be one of {', '.join(choices)}, got {getattr(obj, name)!r}"
        )


@dataclass(frozen=True)
class NormalizeConfig:
    """Unicode NFC, drop control characters, collapse whitespace runs, strip."""

    PREFIX: ClassVar[str] = "normalize"
    enabled: bool = True
    strip_control: bool = True
    collapse_whitespace: bool = True
    # Keep line breaks (collapsing 3+ to a blank line): answers with lists or code need them.
    keep_newlines: bool = True

    def __post_init__(self) -> None:
        for name in ("enabled", "strip_control", "collapse_whitespace", "keep_newlines"):
            _check_bool(self, name)


@dataclass(frozen=True)
class LengthFilterConfig:
    """Drop empty rows and rows whose prompt + longest answer is outside [min_tokens, max_tokens]."""

    PREFIX: ClassVar[str] = "length_filter"
    enabled: bool = True
    min_tokens: int = 1
    max_tokens: int = 4096

    def __post_init__(self) -> None:
        _check_bool(self, "enabled")
        _check_int(self, "min_tokens", 0)
        _check_int(self, "max_tokens", 1)
        if self.max_tokens < self.min_tokens:
            raise ValueError(
                f"length_filter.max_tokens ({self.max_tokens}) must be >= min_tokens ({self.min_tokens})"
            )


@dataclass(frozen=True)
class ExactDedupeConfig:
    PREFIX: ClassVar[str] = "exact_dedupe"
    enabled: bool = True

    def __post_init__(self) -> None:
        _check_bool(self, "enabled")


@dataclass(frozen=True)
class NearDedupeConfig:
    """MinHash LSH over word shingles; a row is a near-duplicate of an earlier kept row when both its
    prompt and its answer have Jaccard similarity >= threshold (so same-prompt/different-answer rows
    are left to the conflicts step instead of silently disappearing)."""

    PREFIX: ClassVar[str] = "near_dedupe"
    enabled: bool = True
    threshold: float = 0.9
    num_perm: int = 128
    shingle_size: int = 1

    def __post_init__(self) -> None:
        _check_bool(self, "enabled")
        _check_float(self, "threshold", 0.0, 1.0, lo_open=True)
        _check_int(self, "num_perm", 16, 1024)
        _check_int(self, "shingle_size", 1, 8)


@dataclass(frozen=True)
class ConflictsConfig:
    """Same prompt (case/whitespace-insensitive) with contradicting answers."""

    PREFIX: ClassVar[str] = "conflicts"
    enabled: bool = True
    drop_conflicts: bool = False

    def __post_init__(self) -> None:
        _check_bool(self, "enabled")
        _check_bool(self, "drop_conflicts")


@dataclass(frozen=True)
class LabelBalanceConfig:
    """For label-like SFT data: resample so that max/min class size <= target_ratio.

    Oversampling is the default because it never discards collected data; duplicated rows are kept
    on the same side of the split, so they cannot leak into validation.
    """

    PREFIX: ClassVar[str] = "label_balance"
    enabled: bool = True
    target_ratio: float = 10.0
    mode: str = "oversample"
    # Label-like detection: distinct answers <= max_distinct_fraction * rows and <= max_distinct,
    # and every answer at most max_label_chars long.
    max_distinct_fraction: float = 0.2
    max_distinct: int = 1000
    max_label_chars: int = 100

    def __post_init__(self) -> None:
        _check_bool(self, "enabled")
        _check_float(self, "target_ratio", 1.0, 1e6)
        _check_choice(self, "mode", ("oversample", "undersample"))
        _check_float(self, "max_distinct_fraction", 0.0, 1.0, lo_open=True)
        _check_int(self, "max_distinct", 1)
        _check_int(self, "max_label_chars", 1)


@dataclass(frozen=True)
class GroupBalanceConfig:
    """Balance by one attribute: Kamiran–Calders reweighing or undersampling to the smallest group."""

    PREFIX: ClassVar[str] = "group_balance"
    enabled: bool = True
    attribute: str | None = None
    mode: str = "reweigh"

    def __post_init__(self) -> None:
        _check_bool(self, "enabled")
        if self.attribute is not None and (
            not isinstance(self.attribute, str) or not 0 < len(self.attribute) <= 64
        ):
            raise ValueError(
                f"group_balance.attribute must be null or a 1..64 character string, got {self.attribute!r}"
            )
        _check_choice(self, "mode", ("reweigh", "undersample"))


@dataclass(frozen=True)
class SplitConfig:
    """Train/validation split, stratified by answer for label-like data."""

    PREFIX: ClassVar[str] = "split"
    enabled: bool = True
    validation_fraction: float = 0.1
    stratify: bool = True

    def __post_init__(self) -> None:
        _check_bool(self, "enabled")
        _check_float(self, "validation_fraction", 0.0, 1.0, hi_open=True)
        _check_bool(self, "stratify")


@dataclass(frozen=True)
class FeedbackRowsConfig:
    """How feedback becomes rows (before the steps; adapters/curation/feedback_rows.py): a correction is an SFT
    row, a desirable unpaired (KTO) row and a preference row over the answer it corrects, a rating an unpaired
    row, two differently rated answers to one prompt a preference row. With `sft_min_rating` set, an answer
    rated at least that high (and not corrected) is an SFT row too: what users accepted teaches as well as
    what they corrected, and it is most of the feedback once an adapter is mostly right."""

    PREFIX: ClassVar[str] = "feedback"
    sft_min_rating: float | None = None
    max_pairs_per_prompt: int = 10

    def __post_init__(self) -> None:
        if self.sft_min_rating is not None:
            _check_float(self, "sft_min_rating", 0.0, 1.0, lo_open=True)
        _check_int(self, "max_pairs_per_prompt", 0, 1000)


STEP_NAMES = (
    "normalize",
    "length_filter",
    "exact_dedupe",
    "near_dedupe",
    "conflicts",
    "label_balance",
    "group_balance",
    "split",
)
SECTION_NAMES = (*STEP_NAMES, "feedback")  # the object-valued keys of a `CurationConfig`


@dataclass(frozen=True)
class CurationConfig:
    """All step options; `seed` drives every random choice (balancing, split) for reproducibility."""

    PREFIX: ClassVar[str] = "config"
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    length_filter: LengthFilterConfig = field(default_factory=LengthFilterConfig)
    exact_dedupe: ExactDedupeConfig = field(default_factory=ExactDedupeConfig)
    near_dedupe: NearDedupeConfig = field(default_factory=NearDedupeConfig)
    conflicts: ConflictsConfig = field(default_factory=ConflictsConfig)
    label_balance: LabelBalanceConfig = field(default_factory=LabelBalanceConfig)
    group_balance: GroupBalanceConfig = field(default_factory=GroupBalanceConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    feedback: FeedbackRowsConfig = field(default_factory=FeedbackRowsConfig)
    seed: int = 0
    max_examples: int = 5

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for name in SECTION_NAMES:
            if not isinstance(getattr(self, name), hints[name]):
                raise ValueError(f"{name} must be a {hints[name].__name__}")  # noqa: TRY004
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if (
            isinstance(self.max_examples, bool)
            or not isinstance(self.max_examples, int)
            or not 0 <= self.max_examples <= 100
        ):
            raise ValueError(f"max_examples must be an integer in [0, 100], got {self.max_examples!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> CurationConfig:
        """Build from JSON-like data; unknown keys are rejected by their dotted name."""
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"config must be an object, got {type(data).__name__}")  # noqa: TRY004
        hints = get_type_hints(cls)
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ValueError(f"unknown config key(s): {', '.join(unknown)} (allowed: {', '.join(allowed)})")
        kwargs: dict[str, Any] = {}
        for name, value in data.items():
            if name in SECTION_NAMES:
                step_cls = hints[name]
                if isinstance(value, bool):  # shorthand: {"near_dedupe": false}
                    value = {"enabled": value}
                if not isinstance(value, dict):
                    raise ValueError(f"{name} must be an object, got {type(value).__name__}")
                step_allowed = [f.name for f in fields(step_cls)]
                bad = sorted(set(value) - set(step_allowed))
                if bad:
                    raise ValueError(
                        f"unknown config key(s): {', '.join(f'{name}.{k}' for k in bad)} "
                        f"(allowed: {', '.join(step_allowed)})"
                    )
                kwargs[name] = step_cls(**value)
            else:
                kwargs[name] = value
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
