"""Data-quality report of a curation run: numbers as a dict (for the API) and a self-contained HTML page.

The dict answers "what went in, what came out and why"; the HTML adds evidently's column
summaries of train vs validation so a person can see whether the split is representative.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .pipeline import CurationResult
from .rows import Row

MAX_LABELS = 100
MAX_ATTRIBUTE_KEYS = 8
MAX_ATTRIBUTE_VALUES = 50


def _stats(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"count": 0, "min": 0, "mean": 0.0, "p50": 0, "p90": 0, "max": 0}
    s = sorted(values)

    def pct(q: float) -> float:
        return s[min(len(s) - 1, int(q * (len(s) - 1) + 0.5))]

    return {
        "count": len(s),
        "min": s[0],
        "mean": round(sum(s) / len(s), 4),
        "p50": pct(0.5),
        "p90": pct(0.9),
        "max": s[-1],
    }


def _top(counter: Counter[str], limit: int) -> dict[str, int]:
    items = sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))
    out = dict(items[:limit])
    rest = sum(n for _, n in items[limit:])
    if rest:
        out["(other)"] = rest
    return out


def _split_summary(rows: Sequence[Row], label_like: bool, weights: dict[int, float] | None) -> dict[str, Any]:
    answers = [r.answer for r in rows]
    attrs: dict[str, Counter[str]] = {}
    for r in rows:
        for k, v in r.attributes.items():
            attrs.setdefault(k, Counter())[v] += 1
    keys = sorted(attrs, key=lambda k: (-sum(attrs[k].values()), k))[:MAX_ATTRIBUTE_KEYS]
    labels: dict[str, int] | None = None
    if label_like:
        labels = _top(Counter(answers), MAX_LABELS)
    unpaired = Counter("good" if r.label else "bad" for r in rows if r.kind == "unpaired")
    return {
        "rows": len(rows),
        "kinds": dict(sorted(Counter(r.kind for r in rows).items())),
        "labels": labels,
        "distinct_labels": len(set(answers)) if label_like else None,
        "unpaired_labels": dict(sorted(unpaired.items())) or None,
        "prompt_chars": _stats([len(r.prompt_text()) for r in rows]),
        "answer_chars": _stats([len(a) for a in answers]),
        "prompt_words": _stats([len(r.prompt_text().split()) for r in rows]),
        "answer_words": _stats([len(a.split()) for a in answers]),
        "prompt_turns": _stats([len(r.prompt) for r in rows]),
        "attributes": {k: _top(attrs[k], MAX_ATTRIBUTE_VALUES) for k in sorted(keys)},
        "weights": _stats(list(weights.values())) if weights is not None else None,
    }


def quality_report(result: CurationResult) -> dict[str, Any]:
    """JSON-ready summary: counts per split, label distribution, length stats, attribute mix,
    and each step's removals with reasons and examples."""
    steps = [s.to_dict() for s in result.steps]
    return {
        "input_count": result.input_count,
        "output_count": len(result.train) + len(result.validation),
        "removed_total": sum(s.removed for s in result.steps),
        "added_total": sum(s.added for s in result.steps),
        "flagged_total": sum(s.flagged for s in result.steps),
        "counts": {"train": len(result.train), "validation": len(result.validation)},
        "label_like": result.label_like,
        "splits": {
            "train": _split_summary(result.train, result.label_like, result.weights),
            "validation": _split_summary(result.validation, result.label_like, result.validation_weights),
        },
        "steps": steps,
        "config": result.config.to_dict(),
        "content_hash": result.content_hash(),
    }


# ---------------------------------------------------------------------------------------------
# HTML
def _frame(
    rows: Sequence[Row], weights: dict[int, float] | None, label_like: bool, attr_keys: list[str]
) -> Any:
    import pandas as pd

    data: dict[str, list[Any]] = {
        "prompt_chars": [len(r.prompt_text()) for r in rows],
        "answer_chars": [len(r.answer) for r in rows],
        "prompt_words": [len(r.prompt_text().split()) for r in rows],
        "answer_words": [len(r.answer.split()) for r in rows],
        "kind": [r.kind for r in rows],
    }
    if label_like:
        data["label"] = [r.answer for r in rows]
    for k in attr_keys:
        data[f"attr_{k}"] = [r.attributes.get(k) for r in rows]
    if weights is not None:
        data["weight"] = [weights[i] for i in range(len(rows))]
    return pd.DataFrame(data)


def evidently_html(result: CurationResult) -> str:
    """evidently's DataSummaryPreset of train (current) vs validation (reference), as a full HTML page."""
    os.environ.setdefault("DO_NOT_TRACK", "1")  # evidently reads it at call time; no network here anyway
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataSummaryPreset

    keys: Counter[str] = Counter()
    for r in [*result.train, *result.validation]:
        keys.update(r.attributes.keys())
    attr_keys = sorted(k for k, _ in keys.most_common(MAX_ATTRIBUTE_KEYS))
    numerical = ["prompt_chars", "answer_chars", "prompt_words", "answer_words"]
    if result.weights is not None:
        numerical.append("weight")
    categorical = ["kind"] + (["label"] if result.label_like else []) + [f"attr_{k}" for k in attr_keys]
    definition = DataDefinition(numerical_columns=numerical, categorical_columns=categorical)
    current = Dataset.from_pandas(
        _frame(result.train, result.weights, result.label_like, attr_keys), data_definition=definition
    )
    reference = None
    if result.validation:
        reference = Dataset.from_pandas(
            _frame(result.validation, result.validation_weights, result.label_like, attr_keys),
            data_definition=definition,
        )
    snapshot = Report([DataSummaryPreset()]).run(current, reference)
    return snapshot.get_html_str(as_iframe=False)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:22px} h2{font-size:18px;margin-top:28px} h3{font-size:15px}
table{border-collapse:collapse;margin:8px 0 16px} td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;
vertical-align:top;font-size:13px} th{background:#f3f3f3} td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{white-space:pre-wrap;word-break:break-word;margin:2px 0 6px;font-size:12px;max-width:1000px}
.muted{color:#777} iframe{width:100%;height:1400px;border:1px solid #ddd}
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], numeric_from: int = 1) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            cls = ' class="n"' if i >= numeric_from and isinstance(v, (int, float)) else ""
            cells.append(f"<td{cls}>{v if isinstance(v, _Raw) else _e(v)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class _Raw(str):
    """Already-escaped HTML for a table cell."""


def _clip(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + " …"


def _row_text(row: dict[str, Any]) -> str:
    """A row as a person reads it: the prompt turns, then the answer(s)."""
    lines = [f"{m['role']}: {_clip(m['content'])}" for m in row.get("prompt", [])]
    if "chosen" in row:
        lines += [f"chosen ⇒ {_clip(row['chosen'])}", f"rejected ⇒ {_clip(row['rejected'])}"]
    else:
        lines.append(f"answer ⇒ {_clip(str(row.get('completion')))}")
        if "label" in row:
            lines.append(f"label: {row['label']}")
    if row.get("attributes"):
        lines.append("attributes: " + ", ".join(f"{k}={v}" for k, v in row["attributes"].items()))
    return "\n".join(lines)


def _example_html(example: dict[str, Any]) -> _Raw:
    parts = []
    for key, value in example.items():
        if key == "reason":
            continue
        if isinstance(value, dict) and "prompt" in value:
            parts.append(f"<b>{_e(key)}</b><pre>{_e(_row_text(value))}</pre>")
        elif key == "prompt" and isinstance(value, list):
            parts.append(
                f"<b>prompt</b><pre>{_e(_row_text({'prompt': value, 'completion': '…'}).rsplit(chr(10), 1)[0])}</pre>"
            )
        else:
            parts.append(f"<b>{_e(key)}</b>: {_e(_clip(json.dumps(value, ensure_ascii=False)))}")
    return _Raw("<br>".join(parts))


def _fmt(x: Any) -> Any:
    return round(x, 2) if isinstance(x, float) and not math.isnan(x) else x


def quality_report_html(result: CurationResult, *, include_evidently: bool = True) -> str:
    """A self-contained HTML page: summary, steps, examples, distributions, and evidently's
    train-vs-validation column summary embedded as an ``<iframe srcdoc>`` (no external requests)."""
    rep = quality_report(result)
    parts: list[str] = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>tuneloop data-quality report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Data-quality report</h1>",
        _table(
            ["input rows", "train", "validation", "removed", "added", "flagged", "label-like task"],
            [
                [
                    rep["input_count"],
                    rep["counts"]["train"],
                    rep["counts"]["validation"],
                    rep["removed_total"],
                    rep["added_total"],
                    rep["flagged_total"],
                    "yes" if rep["label_like"] else "no",
                ]
            ],
            numeric_from=0,
        ),
        f"<p class='muted'>content hash <code>{_e(rep['content_hash'])}</code></p>",
        "<h2>Curation steps</h2>",
    ]
    step_rows = []
    for s in rep["steps"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in s["reasons"].items()) or (
            "skipped: " + s["skipped"] if s["skipped"] else ""
        )
        step_rows.append([s["name"], s["removed"], s["changed"], s["flagged"], s["added"], reasons])
    parts.append(_table(["step", "removed", "changed", "flagged", "added", "reasons"], step_rows))

    parts.append("<h2>Examples</h2>")
    for s in rep["steps"]:
        if not s["examples"]:
            continue
        parts.append(f"<h3>{_e(s['name'])}</h3>")
        ex_rows = []
        for ex in s["examples"]:
            ex_rows.append([ex.get("reason", ""), _example_html(ex)])
        parts.append(_table(["reason", "example"], ex_rows))

    train, val = rep["splits"]["train"], rep["splits"]["validation"]
    parts.append("<h2>Lengths (train | validation)</h2>")
    len_rows = []
    for key in ("prompt_words", "answer_words", "prompt_chars", "answer_chars", "prompt_turns"):
        for split_name, sm in (("train", train), ("validation", val)):
            st = sm[key]
            len_rows.append(
                [key, split_name, st["count"], st["min"], _fmt(st["mean"]), st["p50"], st["p90"], st["max"]]
            )
    parts.append(
        _table(["field", "split", "rows", "min", "mean", "p50", "p90", "max"], len_rows, numeric_from=2)
    )

    if rep["label_like"]:
        parts.append("<h2>Labels</h2>")
        labels = list(dict.fromkeys([*(train["labels"] or {}), *(val["labels"] or {})]))
        parts.append(
            f"<details{' open' if len(labels) <= 20 else ''}><summary>{len(labels)} labels</summary>"
        )
        parts.append(
            _table(
                ["label", "train", "validation"],
                [[y, (train["labels"] or {}).get(y, 0), (val["labels"] or {}).get(y, 0)] for y in labels],
            )
        )
        parts.append("</details>")
    if train["attributes"] or val["attributes"]:
        parts.append("<h2>Attributes</h2>")
        attr_rows = []
        for key in sorted(set(train["attributes"]) | set(val["attributes"])):
            values = list(dict.fromkeys([*train["attributes"].get(key, {}), *val["attributes"].get(key, {})]))
            for v in values:
                attr_rows.append(
                    [
                        key,
                        v,
                        train["attributes"].get(key, {}).get(v, 0),
                        val["attributes"].get(key, {}).get(v, 0),
                    ]
                )
        parts.append(_table(["attribute", "value", "train", "validation"], attr_rows, numeric_from=2))
    if train["weights"] is not None:
        w = train["weights"]
        parts.append("<h2>Group weights (train)</h2>")
        parts.append(_table(["min", "mean", "max"], [[_fmt(w["min"]), _fmt(w["mean"]), _fmt(w["max"])]], 0))

    if include_evidently:
        parts.append("<h2>Distributions: train (current) vs validation (reference) — evidently</h2>")
        if not result.train:
            parts.append("<p class='muted'>no training rows</p>")
        else:
            try:
                page = evidently_html(result)
            except Exception as exc:  # noqa: BLE001 - the rest of the report is still useful without the plots
                parts.append(
                    f"<p class='muted'>evidently summary failed: {_e(type(exc).__name__)}: {_e(exc)}</p>"
                )
            else:
                parts.append(
                    f"<iframe class='evidently' title='evidently data summary' srcdoc=\"{html.escape(page, quote=True)}\"></iframe>"
                )
    parts.append("</body></html>")
    return "\n".join(parts)
