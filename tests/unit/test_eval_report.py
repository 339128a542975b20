"""The evaluation report: JSON shape, and HTML with real inline PNG plots and escaped text."""

from __future__ import annotations

import base64
import json
import re
import struct

import pytest

from adapters.evaluation.gates import GateConfig
from adapters.evaluation.generate import ModelRef
from adapters.evaluation.report import report_html, report_json, split_loss_curve
from adapters.evaluation.rows import to_examples
from adapters.evaluation.suites import EvaluationResult, assemble_result

LABELS = ["card_arrival", "lost_card", "refund_missing"]


def _result() -> EvaluationResult:
    rows = [{"prompt": [{"role": "user", "content": f"<script>alert({i})</script> question {i}"}],
             "completion": LABELS[i % 3], "attributes": {"segment": "retail" if i % 2 else "business"}}
            for i in range(30)]
    ex, _ = to_examples(rows)
    cand = [LABELS[i % 3] if i % 5 else "lost_card" for i in range(30)]
    ref = [LABELS[i % 3] if i % 4 else "card_arrival" for i in range(30)]
    return assemble_result(ModelRef("/m", "/a/v2", "v2"), ModelRef("/m", None, "base"), ex, cand, ref,
                           [0.1 * i for i in range(30)], [0.2] * 30, [2.1] * 5, [2.0] * 5, GateConfig(),
                           min_group_size=5)


EVENTS = [{"type": "step", "step": s, "loss": 3.0 / (s + 1)} for s in range(0, 40, 2)] + [
    {"type": "validation", "step": 10, "val_loss": 0.9}, {"type": "validation", "step": 30, "val_loss": 0.5},
    {"type": "checkpoint", "step": 30}, {"type": "step", "step": 41, "loss": float("nan")},
]


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)]


def test_split_loss_curve() -> None:
    curve = split_loss_curve(EVENTS)
    assert len(curve["train"]) == 20 and curve["train"][0] == {"step": 0.0, "loss": 3.0}
    assert curve["validation"] == [{"step": 10.0, "val_loss": 0.9}, {"step": 30.0, "val_loss": 0.5}]


def test_report_json_is_plain_json() -> None:
    doc = report_json(_result(), EVENTS)
    back = json.loads(json.dumps(doc))
    assert back["schema_version"] == 1
    assert back["evaluation"]["label_like"] is True
    assert back["evaluation"]["errors"]["candidate"]["confusions"][0]["produced"] == "lost_card"
    assert len(back["loss_curve"]["validation"]) == 2


def test_report_html_has_real_plots_and_tables() -> None:
    r = _result()
    page = report_html(r, EVENTS)
    pngs = _pngs(page)
    # headline, per-class, fairness (segment), loss curve
    assert len(pngs) == 4 and page.count("<img") == 4
    for png in pngs:
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", png[16:24])
        assert width >= 500 and height >= 200
        assert len(png) > 5000  # a blank canvas compresses to far less
    assert "<script>" not in page and "&lt;script&gt;" in page  # prompts are escaped
    assert "Top confusions" in page and "card_arrival" in page
    assert "Retention (forgetting)" in page and "+5.00%" in page
    assert "fairness:segment" in page and "DPD" in page
    assert ("PASSED" if r.gates and r.gates.passed else "FAILED") in page


def test_report_without_loss_or_labels() -> None:
    rows = [{"prompt": "say something", "completion": f"free text answer number {i}"} for i in range(6)]
    ex, _ = to_examples(rows)
    out = [f"free text answer {i}" for i in range(6)]
    r = assemble_result(ModelRef("/m", "/a", "c"), ModelRef("/m", None, "base"), ex, out, out,
                        [1.0] * 6, [1.0] * 6, None, None, GateConfig())
    assert not r.label_like and r.gates is not None
    assert r.gates.checks[0].reason.startswith("chrf")
    page = report_html(r, [])
    assert len(_pngs(page)) == 1  # only the headline chart
    assert "No loss events" in page and "Not a label-like task" in page
    assert "No retention rows" in page


@pytest.mark.parametrize("bad", [[{"type": "step", "step": None, "loss": 1.0}], [{"type": "validation", "step": 1}]])
def test_loss_curve_ignores_incomplete_events(bad: list[dict]) -> None:
    assert split_loss_curve(bad) == {"train": [], "validation": []}
