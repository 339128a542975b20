"""Curation steps: small pure functions over ``list[Row]`` that each explain what they did.

Every step returns the new rows plus a `StepReport` (counts, reasons, a few examples) so the data
quality report can show a person *why* rows disappeared. Steps are deterministic: random choices use
a seeded `random.Random`, iteration never depends on set/hash order.
"""

from __future__ import annotations

import math
import random
import re
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .config import (
    ConflictsConfig,
    ExactDedupeConfig,
    GroupBalanceConfig,
    LabelBalanceConfig,
    LengthFilterConfig,
    NearDedupeConfig,
    NormalizeConfig,
    SplitConfig,
)
from .rows import Message, Row

CountTokens = Callable[[str], int]


@dataclass
class StepReport:
    """What one step did: rows removed/changed/flagged/added, per-reason counts, a few examples."""

    name: str
    removed: int = 0
    changed: int = 0
    flagged: int = 0
    added: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)
    skipped: str | None = None  # why the step did nothing (disabled, not applicable)
    details: dict[str, Any] = field(default_factory=dict)

    def count(self, reason: str, n: int = 1) -> None:
        self.reasons[reason] = self.reasons.get(reason, 0) + n

    def example(self, limit: int, **item: Any) -> None:
        if len(self.examples) < limit:
            self.examples.append(item)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def skipped(name: str, why: str) -> StepReport:
    return StepReport(name=name, skipped=why)


# --------------------------------------------------------------------------------------------
# 1. normalize
_CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u200b\u2060\ufeff]")
_HSPACE_RE = re.compile(r"[^\S\n]+")
_SPACE_AROUND_NL_RE = re.compile(r" ?\n ?")
_MANY_NL_RE = re.compile(r"\n{3,}")
_ANY_SPACE_RE = re.compile(r"\s+")


def normalize_text(text: str, cfg: NormalizeConfig) -> str:
    """NFC, line endings to ``\\n``, drop control/invisible characters, collapse whitespace, strip."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    if cfg.strip_control:
        text = _CONTROL_RE.sub("", text)
    if cfg.collapse_whitespace:
        if cfg.keep_newlines:
            text = _HSPACE_RE.sub(" ", text)
            text = _SPACE_AROUND_NL_RE.sub("\n", text)
            text = _MANY_NL_RE.sub("\n\n", text)
        else:
            text = _ANY_SPACE_RE.sub(" ", text)
    return text.strip()


def normalize(
    rows: Sequence[Row], cfg: NormalizeConfig, *, max_examples: int = 5
) -> tuple[list[Row], StepReport]:
    if not cfg.enabled:
        return list(rows), skipped("normalize", "disabled")
    report = StepReport(name="normalize")
    out: list[Row] = []

    def fix(value: str | None) -> str | None:
        return None if value is None else normalize_text(value, cfg)

    for row in rows:
        new = row.replace(
            prompt=tuple(Message(role=m.role, content=normalize_text(m.content, cfg)) for m in row.prompt),
            completion=fix(row.completion),
            chosen=fix(row.chosen),
            rejected=fix(row.rejected),
        )
        if new != row:
            report.changed += 1
            report.count("normalized")
            report.example(max_examples, reason="normalized", before=row.to_json(), after=new.to_json())
        out.append(new)
    return out, report


# --------------------------------------------------------------------------------------------
# 2. length_filter
def _percentile(sorted_values: Sequence[int], q: float) -> int:
    if not sorted_values:
        return 0
    return sorted_values[min(len(sorted_values) - 1, int(q * (len(sorted_values) - 1) + 0.5))]


def length_filter(
    rows: Sequence[Row], cfg: LengthFilterConfig, count_tokens: CountTokens, *, max_examples: int = 5
) -> tuple[list[Row], StepReport]:
    """Drop empty rows and rows outside the token budget (prompt + longest answer)."""
    if not cfg.enabled:
        return list(rows), skipped("length_filter", "disabled")
    report = StepReport(
        name="length_filter", details={"min_tokens": cfg.min_tokens, "max_tokens": cfg.max_tokens}
    )
    cache: dict[str, int] = {}

    def tokens(text: str) -> int:
        n = cache.get(text)
        if n is None:
            n = cache[text] = int(count_tokens(text)) if text else 0
        return n

    out: list[Row] = []
    kept_tokens: list[int] = []
    for row in rows:
        reason = None
        total = 0
        if not any(m.content.strip() for m in row.prompt if m.role == "user"):
            reason = "empty_prompt"
        elif not all(a.strip() for a in row.answers()):
            reason = "empty_answer"
        else:
            total = sum(tokens(m.content) for m in row.prompt) + max(tokens(a) for a in row.answers())
            if total < cfg.min_tokens:
                reason = "too_short"
            elif total > cfg.max_tokens:
                reason = "too_long"
        if reason is None:
            out.append(row)
            kept_tokens.append(total)
        else:
            report.removed += 1
            report.count(reason)
            report.example(max_examples, reason=reason, tokens=total, row=row.to_json())
    kept_tokens.sort()
    report.details["tokens"] = {
        "min": kept_tokens[0] if kept_tokens else 0,
        "p50": _percentile(kept_tokens, 0.5),
        "p95": _percentile(kept_tokens, 0.95),
        "max": kept_tokens[-1] if kept_tokens else 0,
    }
    return out, report


# --------------------------------------------------------------------------------------------
# 3. exact_dedupe
def exact_dedupe(
    rows: Sequence[Row], cfg: ExactDedupeConfig, *, max_examples: int = 5
) -> tuple[list[Row], StepReport]:
    """Keep the first row of each content hash (attributes are not content)."""
    if not cfg.enabled:
        return list(rows), skipped("exact_dedupe", "disabled")
    report = StepReport(name="exact_dedupe")
    first: dict[str, int] = {}
    dupes_per_hash: Counter[str] = Counter()
    out: list[Row] = []
    for row in rows:
        h = row.content_hash
        if h in first:
            report.removed += 1
            dupes_per_hash[h] += 1
            report.example(max_examples, reason="exact_duplicate", duplicate_of=first[h], row=row.to_json())
        else:
            first[h] = len(out)
            out.append(row)
    if report.removed:
        report.count("exact_duplicate", report.removed)
    report.details["duplicate_groups"] = len(dupes_per_hash)
    return out, report


# --------------------------------------------------------------------------------------------
# 4. near_dedupe
_WORD_RE = re.compile(r"\w+")


def _shingles(text: str, n: int, tag: str) -> set[str]:
    words = _WORD_RE.findall(text.casefold())
    if not words:
        return set()
    if len(words) <= n:
        return {tag + " ".join(words)}
    return {tag + " ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


def _answer_shingles(row: Row, n: int) -> set[str]:
    if row.kind == "preference":
        return _shingles(row.chosen or "", n, "c\x1f") | _shingles(row.rejected or "", n, "r\x1f")
    out = _shingles(row.completion or "", n, "a\x1f")
    if row.kind == "unpaired":
        out.add(f"label\x1f{row.label}")
    return out


def _jaccard(a: set[str], b: set[str]) -> float:
    if a == b:
        return 1.0
    return len(a & b) / len(a | b)


def _make_lsh(lsh_cls: Any, threshold: float, num_perm: int) -> Any:
    """LSH tuned for recall: datasketch's default banding for threshold t finds only ~30% of pairs
    with similarity exactly t. Candidates are verified exactly, so ask for a lower threshold with
    false negatives weighted 9:1 (recall ≈ 0.99 at t with 128 permutations)."""
    try:
        return lsh_cls(threshold=max(0.05, threshold - 0.1), num_perm=num_perm, weights=(0.1, 0.9))
    except ValueError:  # too few bands for a tiny num_perm: fall back to two bands
        return lsh_cls(num_perm=num_perm, params=(2, num_perm // 2))


def near_dedupe(
    rows: Sequence[Row], cfg: NearDedupeConfig, *, max_examples: int = 5
) -> tuple[list[Row], StepReport]:
    """Remove rows whose prompt and answer are both near-identical to an earlier kept row.

    MinHash LSH (datasketch) proposes candidates over the union of tagged prompt and answer
    shingles; each candidate is then confirmed with the exact Jaccard similarity of the prompt and
    answer shingle sets, so the result does not depend on MinHash estimation noise. If both
    similarities are >= t, the tagged union's similarity is >= t too, so LSH sees every such pair.
    """
    if not cfg.enabled:
        return list(rows), skipped("near_dedupe", "disabled")
    from datasketch import MinHash, MinHashLSH

    report = StepReport(
        name="near_dedupe", details={"threshold": cfg.threshold, "shingle_size": cfg.shingle_size}
    )
    lsh = _make_lsh(MinHashLSH, cfg.threshold, cfg.num_perm)
    # Drawing permutations is the costly part of a MinHash: draw them once and copy the empty sketch.
    template = MinHash(num_perm=cfg.num_perm, seed=1)
    kept: list[tuple[Row, set[str], set[str]]] = []
    out: list[Row] = []
    for row in rows:
        p_sh = _shingles(row.prompt_text(), cfg.shingle_size, "p\x1f")
        a_sh = _answer_shingles(row, cfg.shingle_size)
        if not p_sh and not a_sh:  # nothing to compare (no word characters): exact dedupe's job
            out.append(row)
            continue
        mh = template.copy()
        mh.update_batch([s.encode("utf-8") for s in sorted(p_sh | a_sh)])
        match: tuple[int, float] | None = None
        for key in sorted(lsh.query(mh)):
            other, op, oa = kept[key]
            if other.kind != row.kind:
                continue
            sim = min(_jaccard(p_sh, op), _jaccard(a_sh, oa))
            if sim >= cfg.threshold:
                match = (key, sim)
                break
        if match is None:
            lsh.insert(len(kept), mh)
            kept.append((row, p_sh, a_sh))
            out.append(row)
        else:
            report.removed += 1
            report.example(
                max_examples,
                reason="near_duplicate",
                similarity=round(match[1], 4),
                row=row.to_json(),
                similar_to=kept[match[0]][0].to_json(),
            )
    if report.removed:
        report.count("near_duplicate", report.removed)
    return out, report


# --------------------------------------------------------------------------------------------
# 5. conflicts
def _norm_key(text: str) -> str:
    return " ".join(text.casefold().split())


def _prompt_key(row: Row) -> tuple[tuple[str, str], ...]:
    return tuple((m.role, _norm_key(m.content)) for m in row.prompt)


def conflicts(
    rows: Sequence[Row], cfg: ConflictsConfig, *, max_examples: int = 5
) -> tuple[list[Row], StepReport]:
    """Flag (or drop) rows that contradict each other for the same prompt.

    sft: one prompt with different answers; preference: both (a over b) and (b over a);
    unpaired: the same prompt + completion labelled both good and bad. Different completions of
    one prompt in preference/unpaired data are normal and not conflicts.
    """
    if not cfg.enabled:
        return list(rows), skipped("conflicts", "disabled")
    report = StepReport(name="conflicts", details={"drop_conflicts": cfg.drop_conflicts})
    groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for i, row in enumerate(rows):
        groups[(row.kind, _prompt_key(row))].append(i)

    conflicting: set[int] = set()
    n_groups = 0
    for (kind, _), idx in groups.items():
        if len(idx) < 2:
            continue
        bad: list[int] = []
        if kind == "sft":
            answers = {_norm_key(rows[i].completion or "") for i in idx}
            if len(answers) > 1:
                bad = idx
                reason = "different_answers"
        elif kind == "preference":
            pairs = {(_norm_key(rows[i].chosen or ""), _norm_key(rows[i].rejected or "")) for i in idx}
            bad = [
                i
                for i in idx
                if (_norm_key(rows[i].rejected or ""), _norm_key(rows[i].chosen or "")) in pairs
            ]
            reason = "reversed_preference"
        else:
            labels: dict[str, set[bool | None]] = defaultdict(set)
            for i in idx:
                labels[_norm_key(rows[i].completion or "")].add(rows[i].label)
            bad = [i for i in idx if len(labels[_norm_key(rows[i].completion or "")]) > 1]
            reason = "contradicting_labels"
        if bad:
            n_groups += 1
            conflicting.update(bad)
            report.count(reason, len(bad))
            seen: list[str] = []
            for i in bad:
                for a in rows[i].answers():
                    if a not in seen:
                        seen.append(a)
            report.example(
                max_examples,
                reason=reason,
                prompt=[m.to_json() for m in rows[bad[0]].prompt],
                answers=seen[:10],
                rows=len(bad),
            )
    report.flagged = len(conflicting)
    report.details["groups"] = n_groups
    if cfg.drop_conflicts:
        report.removed = len(conflicting)
        return [r for i, r in enumerate(rows) if i not in conflicting], report
    return list(rows), report


# --------------------------------------------------------------------------------------------
# label detection (shared by label_balance, group_balance, split and the report)
def detect_labels(rows: Sequence[Row], cfg: LabelBalanceConfig) -> list[str] | None:
    """Answers as class labels when the data looks like classification, else None.

    Label-like: only SFT rows, distinct answers <= max_distinct_fraction·rows and <= max_distinct,
    and every distinct answer short.
    """
    if not rows or any(r.kind != "sft" for r in rows):
        return None
    answers = [r.completion or "" for r in rows]
    distinct = set(answers)
    if len(distinct) > cfg.max_distinct_fraction * len(rows) or len(distinct) > cfg.max_distinct:
        return None
    if any(len(a) > cfg.max_label_chars for a in distinct):
        return None
    return answers


# --------------------------------------------------------------------------------------------
# 6. label_balance
def label_balance(
    rows: Sequence[Row],
    cfg: LabelBalanceConfig,
    labels: Sequence[str] | None,
    seed: int,
    *,
    max_examples: int = 5,
) -> tuple[list[Row], StepReport]:
    """Resample classes so that max/min class size <= target_ratio (seeded, order-preserving)."""
    if not cfg.enabled:
        return list(rows), skipped("label_balance", "disabled")
    if labels is None:
        return list(rows), skipped("label_balance", "not a label-like task")
    by_label: dict[str, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_label[y].append(i)
    sizes = {y: len(v) for y, v in by_label.items()}
    report = StepReport(name="label_balance", details={"classes": len(sizes), "mode": cfg.mode})
    ratio = max(sizes.values()) / min(sizes.values())
    report.details["ratio_before"] = round(ratio, 4)
    if ratio <= cfg.target_ratio:
        report.details["ratio_after"] = round(ratio, 4)
        return list(rows), report
    rng = random.Random(seed)
    out: list[Row]
    if cfg.mode == "undersample":
        cap = math.floor(cfg.target_ratio * min(sizes.values()))
        keep: set[int] = set()
        for y in sorted(by_label):
            idx = by_label[y]
            keep.update(idx if len(idx) <= cap else rng.sample(idx, cap))
        out = []
        for i, row in enumerate(rows):
            if i in keep:
                out.append(row)
            else:
                report.removed += 1
                report.example(max_examples, reason="undersampled", label=labels[i], row=row.to_json())
        if report.removed:
            report.count("undersampled", report.removed)
        new_sizes = {y: min(n, cap) for y, n in sizes.items()}
    else:
        floor = math.ceil(max(sizes.values()) / cfg.target_ratio)
        out = list(rows)
        for y in sorted(by_label):
            idx = by_label[y]
            need = floor - len(idx)
            if need <= 0:
                continue
            order = rng.sample(idx, len(idx))  # cycle through a shuffled class: copies spread evenly
            for k in range(need):
                out.append(rows[order[k % len(order)]])
            report.example(max_examples, reason="oversampled", label=y, copies=need, rows_before=len(idx))
        report.added = len(out) - len(rows)
        report.count("oversampled", report.added)
        new_sizes = {y: max(n, floor) for y, n in sizes.items()}
    report.details["ratio_after"] = round(max(new_sizes.values()) / min(new_sizes.values()), 4)
    return out, report


# --------------------------------------------------------------------------------------------
# 7. group_balance
def group_balance(
    rows: Sequence[Row],
    cfg: GroupBalanceConfig,
    labels: Sequence[str] | None,
    seed: int,
    *,
    max_examples: int = 5,
) -> tuple[list[Row], list[float] | None, StepReport]:
    """Balance groups of one attribute.

    ``reweigh``: Kamiran & Calders (2012) weights w = P(g)·P(y)/P(g, y), which make label and group
    independent in the weighted data; without labels (free-text answers) each group gets equal
    total weight, w = n / (G·n_g). Mean weight is 1 either way. Rows without the attribute keep 1.
    ``undersample``: every group is sampled down to the smallest group's size (seeded).
    """
    name = "group_balance"
    if not cfg.enabled:
        return list(rows), None, skipped(name, "disabled")
    if cfg.attribute is None:
        return list(rows), None, skipped(name, "no attribute configured")
    key = cfg.attribute
    member = [i for i, r in enumerate(rows) if key in r.attributes]
    if not member:
        return list(rows), None, skipped(name, f"attribute {key!r} missing from all rows")
    if labels is None and rows and all(r.kind == "unpaired" for r in rows):
        labels = ["good" if r.label else "bad" for r in rows]
    groups = [rows[i].attributes[key] for i in member]
    n_g = Counter(groups)
    report = StepReport(
        name=name,
        details={
            "attribute": key,
            "mode": cfg.mode,
            "groups": dict(sorted(n_g.items())),
            "rows_without_attribute": len(rows) - len(member),
        },
    )
    if cfg.mode == "reweigh":
        weights = [1.0] * len(rows)
        n = len(member)
        if labels is not None:
            ys = [labels[i] for i in member]
            n_y = Counter(ys)
            n_gy = Counter(zip(groups, ys))
            for i, g, y in zip(member, groups, ys):
                weights[i] = (n_g[g] * n_y[y]) / (n * n_gy[(g, y)])
            report.details["labels_used"] = True
        else:
            for i, g in zip(member, groups):
                weights[i] = n / (len(n_g) * n_g[g])
            report.details["labels_used"] = False
        report.changed = sum(1 for w in weights if abs(w - 1.0) > 1e-12)
        if report.changed:
            report.count("reweighed", report.changed)
        per_group: dict[str, list[float]] = defaultdict(list)
        for i, g in zip(member, groups):
            per_group[g].append(weights[i])
        report.details["mean_weight_per_group"] = {
            g: round(sum(v) / len(v), 6) for g, v in sorted(per_group.items())
        }
        return list(rows), weights, report

    target = min(n_g.values())
    rng = random.Random(seed)
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, g in zip(member, groups):
        by_group[g].append(i)
    drop: set[int] = set()
    for g in sorted(by_group):
        idx = by_group[g]
        if len(idx) > target:
            drop.update(set(idx) - set(rng.sample(idx, target)))
    out = []
    for i, row in enumerate(rows):
        if i in drop:
            report.removed += 1
            report.example(max_examples, reason="undersampled", group=row.attributes[key], row=row.to_json())
        else:
            out.append(row)
    if report.removed:
        report.count("undersampled", report.removed)
    report.details["group_size_after"] = target
    return out, None, report


# --------------------------------------------------------------------------------------------
# 8. split
def _largest_remainder_split(
    rest: Sequence[int], labels: Sequence[str], fraction: float, n_total: int, seed: int
) -> list[int]:
    """Approximate stratification when scikit-learn's is impossible: each class gets
    floor(fraction·size) validation rows, and the remaining slots go to the classes with the largest
    remainders (seeded tie-break); every class keeps at least one training row."""
    rng = random.Random(seed)
    by_label: dict[str, list[int]] = defaultdict(list)
    for i in rest:
        by_label[labels[i]].append(i)
    classes = sorted(by_label)
    tie = {c: rng.random() for c in classes}
    n_val = min(math.ceil(fraction * n_total), len(rest) - len(classes))
    quota = {c: fraction * len(by_label[c]) for c in classes}
    take = {c: min(math.floor(quota[c]), len(by_label[c]) - 1) for c in classes}
    left = n_val - sum(take.values())
    for c in sorted(classes, key=lambda c: (-(quota[c] - take[c]), tie[c])):
        if left <= 0:
            break
        if take[c] < len(by_label[c]) - 1:
            take[c] += 1
            left -= 1
    out: list[int] = []
    for c in classes:
        out.extend(rng.sample(by_label[c], len(by_label[c]))[: take[c]])
    return sorted(out)


@dataclass
class SplitIndices:
    train: list[int]
    validation: list[int]


def split(
    rows: Sequence[Row],
    cfg: SplitConfig,
    labels: Sequence[str] | None,
    seed: int,
) -> tuple[SplitIndices, StepReport]:
    """Train/validation split over distinct rows (copies from oversampling stay on one side).

    Stratified by answer for label-like data with scikit-learn; classes with a single distinct
    row go to train (they cannot be stratified), and if stratification is still impossible (e.g.
    fewer validation rows than classes) a largest-remainder allocation per class is used instead.
    Data that is not label-like gets a seeded random split.
    """
    name = "split"
    all_idx = list(range(len(rows)))
    if not cfg.enabled:
        return SplitIndices(all_idx, []), skipped(name, "disabled")
    members: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        members.setdefault(row.content_hash, []).append(i)
    reps = [v[0] for v in members.values()]  # first occurrence of each distinct row, input order
    report = StepReport(name=name, details={"validation_fraction": cfg.validation_fraction, "seed": seed})
    if cfg.validation_fraction == 0 or len(reps) < 2:
        report.details.update(stratified=False, train=len(rows), validation=0)
        if len(reps) < 2 and cfg.validation_fraction > 0:
            report.details["note"] = "fewer than 2 distinct rows: everything is train"
        return SplitIndices(all_idx, []), report

    from sklearn.model_selection import train_test_split

    train_reps: list[int]
    val_reps: list[int]
    stratified = False
    if cfg.stratify and labels is not None:
        counts = Counter(labels[i] for i in reps)
        forced = [i for i in reps if counts[labels[i]] == 1]
        rest = [i for i in reps if counts[labels[i]] > 1]
        report.details["singleton_classes"] = len(forced)
        try:
            tr, va = train_test_split(
                rest, test_size=cfg.validation_fraction, stratify=[labels[i] for i in rest], random_state=seed
            )
            train_reps, val_reps = list(tr) + forced, list(va)
            report.details["method"] = "sklearn"
        except ValueError as exc:  # e.g. fewer validation rows than classes
            report.details["fallback"] = str(exc)
            report.details["method"] = "largest_remainder"
            val_reps = _largest_remainder_split(rest, labels, cfg.validation_fraction, len(reps), seed)
            chosen = set(val_reps)
            train_reps = [i for i in reps if i not in chosen]
        stratified = True
    if not stratified:
        report.details["method"] = "random"
        tr, va = train_test_split(reps, test_size=cfg.validation_fraction, random_state=seed, shuffle=True)
        train_reps, val_reps = list(tr), list(va)
    rep_hash = {i: rows[i].content_hash for i in reps}
    train = sorted(j for i in train_reps for j in members[rep_hash[i]])
    validation = sorted(j for i in val_reps for j in members[rep_hash[i]])
    report.details.update(stratified=stratified, train=len(train), validation=len(validation))
    return SplitIndices(train, validation), report
