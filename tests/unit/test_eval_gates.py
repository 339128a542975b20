"""Gates, fairness and retention suites on constructed model outputs (no model needed)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from adapters.evaluation.gates import GateConfig, apply_gates
from adapters.evaluation.generate import BackendConfig, ModelRef
from adapters.evaluation.retention import default_retention_path, load_retention_rows, retention_result
from adapters.evaluation.rows import to_examples
from adapters.evaluation.suites import EvaluationResult, assemble_result

CAND = ModelRef("/models/base", "/adapters/v2", "v2")
REF = ModelRef("/models/base", "/adapters/v1", "v1")


def _rows() -> list[dict]:
    """20 rows, 2 labels, segment a/b (10 each) and a high-cardinality user id."""
    rows = []
    for i in range(20):
        rows.append({"kind": "sft", "prompt": [{"role": "user", "content": f"q{i}"}],
                     "completion": "yes" if i % 2 else "no",
                     "attributes": {"segment": "a" if i < 10 else "b", "user": f"u{i}"}})
    return rows


def _result(cand_correct_a: int, cand_correct_b: int, ref_correct: int = 8, ret: tuple[float, float] | None = (2.0, 2.0),
            gates: GateConfig | None = None) -> EvaluationResult:
    """Candidate right on the first N rows of each segment; reference right on the first ref_correct of each."""
    ex, _ = to_examples(_rows())
    expected = [e.answer for e in ex]

    def answers(na: int, nb: int) -> list[str]:
        out = []
        for i, e in enumerate(expected):
            k = i if i < 10 else i - 10
            ok = k < (na if i < 10 else nb)
            out.append(e if ok else ("no" if e == "yes" else "yes"))
        return out

    cand, ref = answers(cand_correct_a, cand_correct_b), answers(ref_correct, ref_correct)
    return assemble_result(
        CAND, REF, ex, cand, ref, [1.0] * 20, [1.5] * 20,
        [ret[0]] * 10 if ret else None, [ret[1]] * 10 if ret else None,
        gates or GateConfig(), label_like=True, min_group_size=5,
    )


def test_gate_config_validation() -> None:
    with pytest.raises(ValueError, match="task_metric"):
        GateConfig(task_metric="f2")
    with pytest.raises(ValueError, match="max_retention_increase"):
        GateConfig(max_retention_increase=-0.1)
    with pytest.raises(ValueError, match="max_fairness_gap_increase"):
        GateConfig(max_fairness_gap_increase=2.0)
    with pytest.raises(ValueError, match="unknown gate field"):
        GateConfig.from_dict({"min_delta": 1})
    assert GateConfig.from_dict({"task_metric": "chrf"}).resolved_metric(True) == "chrf"
    assert GateConfig().resolved_metric(True) == "accuracy"
    assert GateConfig().resolved_metric(False) == "chrf"
    with pytest.raises(ValueError, match="vllm_base_url"):
        BackendConfig(kind="vllm")
    with pytest.raises(ValueError, match="kind"):
        BackendConfig(kind="tgi")  # type: ignore[arg-type]


def test_all_gates_pass_and_every_reason_is_reported() -> None:
    r = _result(9, 9)  # 18/20 vs reference 16/20, equal segments, no retention change
    assert r.task["candidate"].accuracy == pytest.approx(0.9)
    assert r.task["reference"].accuracy == pytest.approx(0.8)
    assert r.gates is not None and r.gates.passed
    names = [c.name for c in r.gates.checks]
    assert names == ["task", "retention", "fairness:segment"]  # "user" has 20 values: not a group
    assert all(reason.startswith("PASS") for reason in r.gates.reasons)
    assert "accuracy 0.9000 vs reference 0.8000" in r.gates.reasons[0]


def test_task_gate_fails_when_worse() -> None:
    r = _result(7, 7)
    assert r.gates is not None and not r.gates.passed
    task = r.gates.checks[0]
    assert not task.passed and task.value == pytest.approx(-0.1)
    assert r.gates.reasons[0].startswith("FAIL task")
    # a negative allowance lets a slightly worse candidate through
    loose = apply_gates(r, GateConfig(min_task_delta=-0.15))
    assert loose.checks[0].passed


def test_retention_gate() -> None:
    r = _result(9, 9, ret=(2.2, 2.0))  # +10 % NLL
    assert r.retention is not None and r.retention.relative_change == pytest.approx(0.1)
    assert r.gates is not None and not r.gates.passed
    assert any(x.startswith("FAIL retention") for x in r.gates.reasons)
    assert apply_gates(r, GateConfig(max_retention_increase=0.2)).passed
    assert apply_gates(r, GateConfig(max_retention_increase=None)).passed
    none = _result(9, 9, ret=None)
    assert none.retention is None
    assert any("PASS retention: skipped" in x for x in none.gates.reasons)  # type: ignore[union-attr]


def test_fairness_gap_gate() -> None:
    r = _result(10, 6)  # segment a 100 %, b 60 %: accuracy gap 0.4; reference gap 0
    comp = r.fairness[0]
    assert comp.attribute == "segment"
    acc = {g.group: g.accuracy for g in comp.candidate.groups}
    assert acc == {"a": pytest.approx(1.0), "b": pytest.approx(0.6)}
    assert comp.candidate.demographic_parity_difference == pytest.approx(0.4)
    assert comp.reference.demographic_parity_difference == pytest.approx(0.0)
    assert r.gates is not None and not r.gates.passed
    fair = r.gates.checks[-1]
    assert fair.name == "fairness:segment" and not fair.passed and fair.value is not None and fair.value >= 0.4
    assert apply_gates(r, GateConfig(max_fairness_gap_increase=None)).checks[-1].passed


def test_result_json_roundtrip() -> None:
    r = _result(9, 8)  # segment gap 0.1 > 0.05: fails on fairness only
    back = json.loads(json.dumps(r.to_dict(include_predictions=True)))
    assert back["task"]["candidate"]["accuracy"] == pytest.approx(0.85)
    assert back["gates"]["passed"] is False and len(back["predictions"]) == 20
    assert [c["passed"] for c in back["gates"]["checks"]] == [True, True, False]
    cand = back["fairness"][0]["candidate"]
    assert cand["demographic_parity_difference"] == pytest.approx(0.1)  # accuracy 0.9 vs 0.8
    # EOD is the worst one-vs-rest class: 'yes' recall is 5/5 in a, 4/5 in b
    assert cand["equalized_odds_difference"] == pytest.approx(0.2) and cand["max_gap"] == pytest.approx(0.2)
    assert "predictions" not in r.to_dict()


def test_retention_data_and_result(tmp_path) -> None:
    assert default_retention_path().is_file()
    rows = load_retention_rows(limit=10)
    assert len(rows) == 10 and rows[0]["kind"] == "sft" and rows[0]["prompt"][0]["role"] == "user"
    assert "####" in rows[0]["completion"]  # GSM8K answers end with '#### <number>'
    assert load_retention_rows(limit=3) == rows[:3]
    assert len(load_retention_rows(limit=None)) == 400
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_retention_rows(bad)
    res = retention_result([2.0, 4.0], [2.0, 2.0])
    assert res.candidate_nll == pytest.approx(3.0) and res.relative_change == pytest.approx(0.5)
    with pytest.raises(ValueError):
        retention_result([1.0], [])


def test_model_ref_validation() -> None:
    with pytest.raises(ValueError, match="base_model_path"):
        ModelRef("")
    assert dataclasses.replace(CAND, label="x").base == ModelRef("/models/base", None, "base")
