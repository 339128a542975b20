"""Evaluation report: a JSON document for machines and one self-contained HTML page for people.

The HTML embeds its plots as base64 PNGs (matplotlib's Agg canvas through ``Figure`` objects, not
pyplot, so rendering holds no global state and is safe in worker threads) and has no external
assets: it can be mailed, archived with the adapter, or served as is.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from adapters.evaluation.suites import EvaluationResult

REPORT_SCHEMA_VERSION = 1
_CAND, _REF, _VAL = "#1f77b4", "#ff7f0e", "#2ca02c"


def split_loss_curve(events: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Train/validation points from job events ``{"type":"step","step","loss"}`` / ``{"type":"validation",...}``."""
    train, val = [], []
    for ev in events:
        t = ev.get("type")
        if t == "step" and _finite(ev.get("loss")) and ev.get("step") is not None:
            train.append({"step": float(ev["step"]), "loss": float(ev["loss"])})
        elif t == "validation" and _finite(ev.get("val_loss")) and ev.get("step") is not None:
            val.append({"step": float(ev["step"]), "val_loss": float(ev["val_loss"])})
    return {"train": sorted(train, key=lambda p: p["step"]), "validation": sorted(val, key=lambda p: p["step"])}


def report_json(result: EvaluationResult, loss_curve: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The whole evaluation as plain JSON types (gates included), plus the training loss curve."""
    return {
        "schema_version": REPORT_SCHEMA_VERSION,
        "evaluation": result.to_dict(),
        "loss_curve": split_loss_curve(loss_curve),
    }


def report_html(result: EvaluationResult, loss_curve: Sequence[dict[str, Any]] = ()) -> str:
    """A self-contained HTML page with inline PNG plots and tables."""
    parts = [_header(result), _headline(result), _per_class(result), _confusions(result), _worst(result),
             _retention(result), _fairness(result), _loss(split_loss_curve(loss_curve))]
    title = f"Evaluation: {result.candidate.label} vs {result.reference.label}"
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1>{''.join(parts)}</body></html>"
    )


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:.9em}
th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#fff;background:#2e7d32;padding:2px 10px;border-radius:4px}
.fail{color:#fff;background:#c62828;padding:2px 10px;border-radius:4px}
li.PASS{color:#2e7d32}li.FAIL{color:#c62828}img{max-width:100%;display:block;margin:8px 0}
.muted{color:#777}td.txt{max-width:420px;word-wrap:break-word}
"""


def _header(r: EvaluationResult) -> str:
    g = r.gates
    verdict = "" if g is None else (
        f"<p>Gates: <span class='{'pass' if g.passed else 'fail'}'>{'PASSED' if g.passed else 'FAILED'}</span></p>"
        "<ul>" + "".join(f"<li class='{_e(x.split(' ', 1)[0])}'>{_e(x)}</li>" for x in g.reasons) + "</ul>"
    )
    rows = [
        ("candidate", r.candidate.label, r.candidate.adapter_path or "(base model)"),
        ("reference", r.reference.label, r.reference.adapter_path or "(base model)"),
    ]
    return (
        f"<p>Base model <code>{_e(r.candidate.base_model_path)}</code>; backend <b>{_e(r.backend)}</b>; "
        f"{r.rows} rows ({r.skipped_rows} skipped); task is {'label-like' if r.label_like else 'free text'}"
        f"{f'; answers constrained to {r.answer_choices} choices' if r.answer_choices else ''}.</p>"
        + _table(["role", "label", "adapter"], rows) + verdict
    )


_HEADLINE = [("accuracy", "exact-match accuracy", 1.0), ("macro_f1", "macro F1", 1.0),
             ("macro_precision", "macro precision", 1.0), ("macro_recall", "macro recall", 1.0),
             ("chrf", "chrF", 100.0), ("bleu", "BLEU", 100.0), ("rouge_l", "ROUGE-L F", 1.0),
             ("mean_nll", "mean answer NLL", None), ("perplexity", "perplexity", None)]


def _headline(r: EvaluationResult) -> str:
    c, ref = r.task["candidate"].to_dict(), r.task["reference"].to_dict()
    rows, names, cv, rv = [], [], [], []
    for key, name, scale in _HEADLINE:
        a, b = c.get(key), ref.get(key)
        if a is None and b is None:
            continue
        delta = a - b if isinstance(a, (int, float)) and isinstance(b, (int, float)) else None
        rows.append((name, _f(a), _f(b), _f(delta, signed=True)))
        if scale is not None and a is not None and b is not None:
            names.append(name + (" /100" if scale == 100.0 else ""))
            cv.append(float(a) / scale)
            rv.append(float(b) / scale)
    fig = _figure(8, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], cv, 0.4, label=r.candidate.label, color=_CAND)
    ax.bar([x + 0.2 for x in xs], rv, 0.4, label=r.reference.label, color=_REF)
    ax.set_xticks(list(xs), names, rotation=15, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("score (0-1)")
    ax.set_title("Headline metrics: candidate vs reference")
    _legend(ax)
    return ("<h2>Headline metrics</h2>" + _table(["metric", r.candidate.label, r.reference.label, "delta"], rows,
                                                 numeric={1, 2, 3}) + _img(fig, "headline metrics chart"))


def _per_class(r: EvaluationResult) -> str:
    cand = r.errors["candidate"].per_class
    if not cand:
        return "<h2>Per-class accuracy</h2><p class='muted'>Not a label-like task.</p>"
    ref = {c.label: c.accuracy for c in r.errors["reference"].per_class}
    shown = cand[:40]  # worst classes first; a 77-bar chart is unreadable
    fig = _figure(9, max(2.5, 0.28 * len(shown) + 1.2))
    ax = fig.add_subplot(1, 1, 1)
    ys = list(range(len(shown)))[::-1]
    ax.barh([y + 0.2 for y in ys], [c.accuracy for c in shown], 0.4, color=_CAND, label=r.candidate.label)
    ax.barh([y - 0.2 for y in ys], [ref.get(c.label, 0.0) for c in shown], 0.4, color=_REF, label=r.reference.label)
    ax.set_yticks(ys, [f"{c.label} (n={c.support})" for c in shown], fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.set_title("Per-class accuracy" + (f" (worst {len(shown)} of {len(cand)} classes)" if len(cand) > len(shown) else ""))
    _legend(ax)
    return "<h2>Per-class accuracy</h2>" + _img(fig, "per-class accuracy chart")


def _confusions(r: EvaluationResult) -> str:
    conf = r.errors["candidate"].confusions
    if not conf:
        return "<h2>Top confusions</h2><p class='muted'>None (or not a label-like task).</p>"
    return "<h2>Top confusions (candidate)</h2>" + _table(
        ["expected", "produced", "count"], [(c.expected, c.produced, str(c.count)) for c in conf], numeric={2})


def _worst(r: EvaluationResult) -> str:
    rows = [(str(x.index), _clip(x.prompt), _clip(x.expected), _clip(x.produced), _f(x.nll), "yes" if x.correct else "no")
            for x in r.errors["candidate"].worst]
    return "<h2>Worst examples (candidate)</h2>" + _table(
        ["row", "prompt", "expected", "produced", "answer NLL", "correct"], rows, numeric={0, 4}, text={1, 2, 3})


def _retention(r: EvaluationResult) -> str:
    ret = r.retention
    if ret is None:
        return "<h2>Retention</h2><p class='muted'>No retention rows were evaluated.</p>"
    return "<h2>Retention (forgetting)</h2>" + _table(
        ["rows", "candidate NLL", "base NLL", "relative change"],
        [(str(ret.rows), _f(ret.candidate_nll), _f(ret.base_nll),
          f"{ret.relative_change:+.2%}" if ret.relative_change is not None else "–")], numeric={0, 1, 2, 3},
    ) + "<p class='muted'>Mean NLL per answer token of reference answers; a rise means the adapter forgot.</p>"


def _fairness(r: EvaluationResult) -> str:
    if not r.fairness:
        return "<h2>Fairness</h2><p class='muted'>No attribute with bounded cardinality in the rows.</p>"
    out = ["<h2>Fairness</h2>"]
    for comp in r.fairness:
        ref_groups = {g.group: g for g in comp.reference.groups}
        rows = []
        for g in comp.candidate.groups:
            rg = ref_groups.get(g.group)
            rows.append((g.group, str(g.count), _f(g.accuracy), _f(rg.accuracy if rg else None),
                         _f(g.selection_rate), _f(rg.selection_rate if rg else None),
                         _f(g.mean_rating), _f(rg.mean_rating if rg else None)))
        rows.append(("DPD", "", "", "", _f(comp.candidate.demographic_parity_difference),
                     _f(comp.reference.demographic_parity_difference), "", ""))
        rows.append(("EOD", "", "", "", _f(comp.candidate.equalized_odds_difference),
                     _f(comp.reference.equalized_odds_difference), "", ""))
        out.append(f"<h3>{_e(comp.attribute)}</h3>" + _table(
            ["group", "n", "accuracy (cand)", "accuracy (ref)", "selection (cand)", "selection (ref)",
             "mean score (cand)", "mean score (ref)"], rows, numeric={1, 2, 3, 4, 5, 6, 7}))
        groups = [g.group for g in comp.candidate.groups]
        fig = _figure(7, 2.8)
        ax = fig.add_subplot(1, 1, 1)
        xs = range(len(groups))
        ax.bar([x - 0.2 for x in xs], [g.accuracy or 0.0 for g in comp.candidate.groups], 0.4, color=_CAND,
               label=r.candidate.label)
        ax.bar([x + 0.2 for x in xs], [(ref_groups[g].accuracy or 0.0) if g in ref_groups else 0.0 for g in groups],
               0.4, color=_REF, label=r.reference.label)
        ax.set_xticks(list(xs), groups)
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(f"Accuracy by {comp.attribute}")
        _legend(ax)
        out.append(_img(fig, f"accuracy by {comp.attribute}"))
    return "".join(out)


def _loss(curve: dict[str, list[dict[str, float]]]) -> str:
    train, val = curve["train"], curve["validation"]
    if not train and not val:
        return "<h2>Training loss</h2><p class='muted'>No loss events were supplied.</p>"
    fig = _figure(8, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        ax.plot([p["step"] for p in train], [p["loss"] for p in train], color=_CAND, label="train loss", lw=1.2)
    if val:
        ax.plot([p["step"] for p in val], [p["val_loss"] for p in val], color=_VAL, marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    _legend(ax)
    return "<h2>Training loss</h2>" + _img(fig, "training loss curve")


def _legend(ax: Any) -> None:
    """Legend outside the axes, so it never hides a bar or a point."""
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)


def _figure(w: float, h: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), dpi=100, layout="constrained")


def _img(fig: Any, alt: str) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f"<img alt='{_e(alt)}' src='data:image/png;base64,{data}'>"


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], numeric: set[int] = frozenset(),  # type: ignore[assignment]
           text: set[int] = frozenset()) -> str:  # type: ignore[assignment]
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(
            f"<td class='{'num' if i in numeric else 'txt' if i in text else ''}'>{_e(v)}</td>" for i, v in enumerate(row)
        ) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _f(x: Any, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, int) and not isinstance(x, bool):
        return f"{x:+d}" if signed else str(x)
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def _clip(s: str, n: int = 300) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False
