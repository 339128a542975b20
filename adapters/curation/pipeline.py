"""Run the curation steps in their fixed order and collect the result a snapshot is made from."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from . import steps as S
from .config import CurationConfig
from .rows import Row
from .steps import CountTokens, StepReport

_APPROX_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def approx_token_count(text: str) -> int:
    """Words + punctuation marks: a tokenizer-free stand-in (the service passes the model's tokenizer)."""
    return len(_APPROX_TOKEN_RE.findall(text))


@dataclass
class CurationResult:
    """Curated rows. ``weights`` (group reweighing) is keyed by index into ``train``;
    ``validation_weights`` likewise into ``validation``. Both are None when no reweighing ran."""

    train: list[Row]
    validation: list[Row]
    weights: dict[int, float] | None
    steps: list[StepReport]
    input_count: int
    label_like: bool = False
    validation_weights: dict[int, float] | None = None
    config: CurationConfig = field(default_factory=CurationConfig)

    def step(self, name: str) -> StepReport:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    def content_hash(self) -> str:
        """sha256 over the ordered train/validation row hashes, attributes, weights and config:
        a content address for the snapshot made from this result."""
        h = hashlib.sha256()
        for split_name, rows, weights in (
            ("train", self.train, self.weights),
            ("validation", self.validation, self.validation_weights),
        ):
            for i, row in enumerate(rows):
                w = None if weights is None else round(weights[i], 12)
                line = [split_name, row.content_hash, sorted(row.attributes.items()), w]
                h.update(json.dumps(line, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
                h.update(b"\n")
        h.update(json.dumps(self.config.to_dict(), sort_keys=True).encode("utf-8"))
        return h.hexdigest()


def run_pipeline(
    rows: Iterable[Row],
    config: CurationConfig | None = None,
    count_tokens: CountTokens | None = None,
    on_step: Callable[[StepReport, int], None] | None = None,
) -> CurationResult:
    """normalize → length_filter → exact_dedupe → near_dedupe → conflicts → label_balance →
    group_balance → split. Same input order + config ⇒ same output (order included).

    ``on_step(report, rows_left)`` is called after each step: the worker turns it into progress
    events, and it may raise to cancel the run between steps."""
    cfg = config or CurationConfig()
    count = count_tokens or approx_token_count
    k = cfg.max_examples
    data = list(rows)
    input_count = len(data)
    reports: list[StepReport] = []

    def record(rep: StepReport, rows_left: int) -> None:
        reports.append(rep)
        if on_step is not None:
            on_step(rep, rows_left)

    data, rep = S.normalize(data, cfg.normalize, max_examples=k)
    record(rep, len(data))
    data, rep = S.length_filter(data, cfg.length_filter, count, max_examples=k)
    record(rep, len(data))
    data, rep = S.exact_dedupe(data, cfg.exact_dedupe, max_examples=k)
    record(rep, len(data))
    data, rep = S.near_dedupe(data, cfg.near_dedupe, max_examples=k)
    record(rep, len(data))
    data, rep = S.conflicts(data, cfg.conflicts, max_examples=k)
    record(rep, len(data))

    labels = S.detect_labels(data, cfg.label_balance)
    data, rep = S.label_balance(data, cfg.label_balance, labels, cfg.seed, max_examples=k)
    record(rep, len(data))
    if labels is not None:  # resampling keeps the classes: realign labels without re-detecting
        labels = [r.completion or "" for r in data]

    data, weights, rep = S.group_balance(data, cfg.group_balance, labels, cfg.seed, max_examples=k)
    record(rep, len(data))

    idx, rep = S.split(data, cfg.split, labels, cfg.seed)
    record(rep, len(idx.train) + len(idx.validation))

    train = [data[i] for i in idx.train]
    validation = [data[i] for i in idx.validation]
    train_w = {j: weights[i] for j, i in enumerate(idx.train)} if weights is not None else None
    val_w = {j: weights[i] for j, i in enumerate(idx.validation)} if weights is not None else None
    return CurationResult(
        train=train,
        validation=validation,
        weights=train_w,
        steps=reports,
        input_count=input_count,
        label_like=labels is not None,
        validation_weights=val_w,
        config=cfg,
    )
