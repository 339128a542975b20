"""The OpenAPI document describes every response (`service/api/responses.py`), and the conformance check the
integration tests run on every response (`tests/openapi_conformance.py`) catches a response that strays."""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import pytest

from adapters.curation.config import CurationConfig
from adapters.curation.ndjson import iter_ndjson
from adapters.curation.pipeline import run_pipeline
from adapters.curation.report import quality_report
from adapters.curation.rows import RowError, parse_row
from adapters.evaluation.gates import GateConfig
from adapters.evaluation.generate import ModelRef
from adapters.evaluation.report import report_json
from adapters.evaluation.rows import to_examples
from adapters.evaluation.suites import assemble_result
from monitoring.experiments import Guardrail, Policy, VariantData, summarize
from service.app import create_app
from service.core.datasets import SnapshotSources, UploadResult, snapshot_job_json, snapshot_json
from service.core.deployments import deployment_json
from service.core.drift import drift_job_json
from service.core.evaluations import evaluation_json, evaluation_report_json
from service.core.experiments import experiment_json
from service.core.jobs import job_json
from service.errors import NotFound, _problem
from service.settings import Settings
from service.storage.models import Deployment, Evaluation, Experiment, Job, Snapshot
from tests.openapi_conformance import violations


@pytest.fixture(scope="module")
def openapi(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    settings = Settings.from_env(data_dir=tmp_path_factory.mktemp("data"))
    return create_app(settings).openapi_schema.to_schema()


def test_every_operation_documents_its_answer_and_its_problems(openapi: dict[str, Any]) -> None:
    operations = [(m, p, op) for p, ops in openapi["paths"].items() for m, op in ops.items()]
    assert len(operations) >= 50
    for method, path, op in operations:
        codes = set(op["responses"])
        assert "400" not in codes, (method, path)  # litestar's own error shape, which we never send
        assert {"4XX", "5XX"} <= codes, (method, path)
        assert list(op["responses"]["4XX"]["content"]) == ["application/problem+json"], (method, path)
        success = [c for c in codes if c.startswith("2")]
        assert success, (method, path)
        assert op["responses"][success[0]].get("content"), (method, path)


def _deployment() -> Deployment:
    return Deployment(name="shop", base_model="/models/smollm2", production_adapter_id=None, config={"gates": {}},
                      created_at=1_700_000_000.5)


def test_what_the_handlers_build_conforms(openapi: dict[str, Any]) -> None:
    dep = deployment_json(_deployment())
    assert violations(openapi, "GET", "/v1/deployments/shop", 200, "application/json", {**dep, "serving": "base"}) == []
    assert violations(openapi, "GET", "/v1/deployments", 200, "application/json", {"object": "list", "data": [dep]}) == []
    job = Job(id="ftjob-1", kind="fine_tune", deployment="shop", status="queued", spec={"method": "sft"},
              hyperparameters={}, metrics={}, attempts=0, created_at=1_700_000_000.0)
    assert violations(openapi, "GET", "/v1/fine_tuning/jobs/ftjob-1", 200, "application/json", job_json(job)) == []
    problem = _problem(NotFound.status, NotFound.title, "no such job", "/v1/fine_tuning/jobs/x", field="job_id")
    assert violations(openapi, "GET", "/v1/fine_tuning/jobs/x", 404, "application/problem+json", problem) == []


def test_a_response_that_strays_from_its_schema_is_caught(openapi: dict[str, Any]) -> None:
    dep = deployment_json(_deployment())
    missing = {k: v for k, v in dep.items() if k != "base_model"}
    assert any("base_model" in v for v in violations(openapi, "GET", "/v1/deployments/shop", 200,
                                                      "application/json", missing))
    assert violations(openapi, "GET", "/v1/deployments/shop", 200, "application/json", {**dep, "created_at": "now"})
    assert violations(openapi, "POST", "/v1/deployments", 404, "application/problem+json", {"detail": "x"})
    with pytest.raises(AssertionError, match="not documented"):
        violations(openapi, "GET", "/v1/deployments/shop", 200, "text/html", "<p>")
    assert violations(openapi, "GET", "/v1/no-such-route", 404, "application/json", {}) == []  # not ours to judge


def _evaluation() -> dict[str, Any]:
    rows = [{"prompt": [{"role": "user", "content": f"question {i}"}], "completion": ["card_arrival", "lost_card"][i % 2]}
            for i in range(20)]
    ex, _ = to_examples(rows)
    answers = [e.answer if i % 3 else "lost_card" for i, e in enumerate(ex)]
    result = assemble_result(ModelRef("/m", "/a", "v1"), ModelRef("/m", None, "base"), ex, answers, answers,
                             [0.5] * 20, [0.6] * 20, [2.1] * 4, [2.0] * 4, GateConfig())
    ev = Evaluation(id="eval-1", adapter_id="ad-1", job_id=None, reference="base", status="passed",
                    result=report_json(result, []), reasons=list(result.gates.reasons), created_at=1.0, finished_at=2.0)
    return evaluation_json(ev)


def _experiment() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    policy = Policy(guardrails=(Guardrail("latency_p95_seconds", 0.2),))
    data = [VariantData(name, name == "control", 0.5, ratings=rng.integers(0, 2, 200).astype(float), requests=200,
                        latencies=rng.uniform(0.1, 0.3, 200), output_tokens=np.full(200, 5.0), units=100)
            for name in ("control", "candidate")]
    exp = Experiment(id="exp-1", deployment="shop", status="running", seed="s",
                     variants=[{"name": "control", "adapter_id": None, "weight": 0.5, "is_control": True},
                               {"name": "candidate", "adapter_id": "ad-1", "weight": 0.5, "is_control": False}],
                     goal={"metric": "rating"}, guardrails=[], policy={"alpha": 0.05},
                     decision={"last": {"action": "continue", "winner": None, "reason": "collecting samples",
                                        "apply": False, "at": 3.5}}, created_at=1.0)
    return experiment_json(exp, summarize(data, policy))


def test_evaluation_summary_and_experiment_statistics_are_typed(openapi: dict[str, Any]) -> None:
    ev = _evaluation()
    assert ev["summary"]["task"]["candidate"]["accuracy"] > 0
    assert violations(openapi, "GET", "/v1/evaluations/eval-1", 200, "application/json", ev) == []
    broken = copy.deepcopy(ev)
    del broken["summary"]["task"]["candidate"]["macro_f1"]
    assert any("macro_f1" in v for v in violations(openapi, "GET", "/v1/evaluations/eval-1", 200,
                                                    "application/json", broken))
    broken = copy.deepcopy(ev)
    broken["summary"]["gates"]["checks"][0]["passed"] = "yes"
    assert violations(openapi, "GET", "/v1/evaluations/eval-1", 200, "application/json", broken)

    exp = _experiment()
    treatment = exp["summary"]["variants"][1]
    assert treatment["lift"] is not None and treatment["guardrails"][0]["metric"] == "latency_p95_seconds"
    assert violations(openapi, "GET", "/v1/experiments/exp-1", 200, "application/json", exp) == []
    broken = copy.deepcopy(exp)
    del broken["summary"]["variants"][1]["lift"]["anytime_interval"]["lower"]
    assert any("lower" in v for v in violations(openapi, "GET", "/v1/experiments/exp-1", 200,
                                                 "application/json", broken))
    broken = copy.deepcopy(exp)
    broken["decision"]["action"] = "ship it"
    assert violations(openapi, "GET", "/v1/experiments/exp-1", 200, "application/json", broken)


def test_snapshot_counts_curation_and_experiment_state_are_typed(openapi: dict[str, Any]) -> None:
    """A snapshot built the way the worker builds it (a real curation run) conforms, and so does its job."""
    config = CurationConfig.from_dict({"near_dedupe": False, "split": {"validation_fraction": 0.25}})
    rows = [parse_row({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i % 3}"}]})
            for i in range(12)]
    result = run_pipeline(rows, config)
    snap = snapshot_json(Snapshot(id="snap-1", dataset_id="ds-1", deployment="shop", path="/x", created_at=1.0,
                                  counts={"input": result.input_count, "train": len(result.train),
                                          "validation": len(result.validation)},
                                  curation=config.to_dict(), feedback_range=[3, 9]))
    assert snap["curation"]["split"]["validation_fraction"] == 0.25 and snap["counts"]["validation"] > 0
    path = "/v1/snapshots/snap-1"
    assert violations(openapi, "GET", path, 200, "application/json", snap) == []
    for bad in ({**snap, "counts": {"train": 1}}, {**snap, "feedback_range": [3]},
                {**snap, "curation": {**snap["curation"], "split": {"validation_fraction": "a tenth"}}}):
        assert violations(openapi, "GET", path, 200, "application/json", bad)

    sources = SnapshotSources("shop", ("ds-1",), True, config.to_dict())
    job = snapshot_job_json(Job(id="snapjob-1", kind="snapshot", deployment="shop", status="queued",
                                spec={"sources": sources.to_json()}, hyperparameters={}, attempts=0, created_at=1.0))
    path = "/v1/snapshot_jobs/snapjob-1"
    assert violations(openapi, "GET", path, 200, "application/json", job) == []
    assert violations(openapi, "GET", path, 200, "application/json", {**job, "sources": {"deployment": "shop"}})

    exp = _experiment()
    assert violations(openapi, "GET", "/v1/experiments/exp-1", 200, "application/json",
                      {**exp, "state": {"weights": [0.5, 0.5], "stage": 0, "stage_started_at": 2.5}}) == []
    assert violations(openapi, "GET", "/v1/experiments/exp-1", 200, "application/json",
                      {**exp, "state": {"weights": {"control": 0.5}}})


def test_a_failed_jobs_error_is_typed(openapi: dict[str, Any]) -> None:
    job = job_json(Job(id="ftjob-1", kind="fine_tune", deployment="shop", status="failed", spec={"method": "sft"},
                       hyperparameters={}, metrics={}, attempts=1, created_at=1.0, finished_at=2.0,
                       error={"message": "trainer exited with code 1", "code": "training_error"}))
    path = "/v1/fine_tuning/jobs/ftjob-1"
    assert violations(openapi, "GET", path, 200, "application/json", job) == []
    assert violations(openapi, "GET", path, 200, "application/json", {**job, "error": {"code": "training_error"}})
    assert violations(openapi, "GET", path, 200, "application/json", {**job, "error": "boom"})


def test_an_uploads_bad_lines_are_typed(openapi: dict[str, Any]) -> None:
    """The errors the parser reports for bad NDJSON lines, in the shape the upload returns them."""
    body = b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n' \
           b'not json\n{"messages": [{"role": "robot", "content": "x"}]}\n'
    result = UploadResult("up-1", accepted=1)
    for line, item in iter_ndjson([body]):
        if isinstance(item, RowError):
            result.rejected += 1
            result.errors.append({"line": line, "field": item.field, "reason": item.reason})
    upload = result.to_json()
    assert [e["line"] for e in upload["errors"]] == [2, 3] and upload["errors"][1]["field"].endswith(".role")
    path = "/v1/datasets/ds-1/records"
    assert violations(openapi, "POST", path, 201, "application/json", upload) == []
    assert violations(openapi, "POST", path, 201, "application/json",
                      {**upload, "errors": [{"line": "two", "field": "line", "reason": "x"}]})


def test_reports_are_typed(openapi: dict[str, Any]) -> None:
    """The evaluation and snapshot reports, built from real results the way the handlers return them."""
    rows = [{"prompt": [{"role": "user", "content": f"question {i}"}], "completion": ["card_arrival", "lost_card"][i % 2],
             "attributes": {"segment": "ab"[i % 2]}} for i in range(20)]
    ex, _ = to_examples(rows)
    answers = [e.answer if i % 3 else "lost_card" for i, e in enumerate(ex)]
    result = assemble_result(ModelRef("/m", "/a", "v1"), ModelRef("/m", None, "base"), ex, answers, answers,
                             [0.5] * 20, [0.6] * 20, [2.1] * 4, [2.0] * 4, GateConfig())
    curve = [{"type": "step", "step": 1, "loss": 2.5}, {"type": "validation", "step": 1, "val_loss": 2.0}]
    ev = Evaluation(id="eval-1", adapter_id="ad-1", job_id=None, reference="base", status="passed",
                    result={**report_json(result, curve), "html_path": "/x.html", "seconds": 3.5},
                    reasons=list(result.gates.reasons), created_at=1.0, finished_at=2.0)
    report = evaluation_report_json(ev)
    assert report["evaluation"]["errors"]["candidate"]["confusions"] and report["evaluation"]["fairness"]
    assert "html_path" not in report
    path = "/v1/evaluations/eval-1/report"
    assert violations(openapi, "GET", path, 200, "application/json", report) == []
    broken = copy.deepcopy(report)
    broken["evaluation"]["errors"]["candidate"]["confusions"][0]["count"] = "many"
    assert any("count" in v for v in violations(openapi, "GET", path, 200, "application/json", broken))
    broken = copy.deepcopy(report)
    broken["evaluation"]["fairness"][0]["candidate"]["groups"][0]["count"] = None
    assert violations(openapi, "GET", path, 200, "application/json", broken)
    broken = copy.deepcopy(report)
    broken["loss_curve"]["validation"][0] = {"step": 1}
    assert violations(openapi, "GET", path, 200, "application/json", broken)
    errored = evaluation_report_json(Evaluation(id="eval-2", adapter_id="ad-1", job_id=None, reference="base",
                                                status="error", result={"error": "OSError: disk full"},
                                                reasons=["disk full"], created_at=1.0, finished_at=2.0))
    assert violations(openapi, "GET", path, 200, "application/json", errored) == []

    config = CurationConfig.from_dict({"near_dedupe": False, "split": {"validation_fraction": 0.25}})
    rows = [parse_row({"messages": [{"role": "user", "content": f"q{i % 7}"},
                                    {"role": "assistant", "content": f"a{i % 7 % 3}"}]}) for i in range(14)]
    snap = {"object": "snapshot.report", "snapshot_id": "snap-1",
            **json.loads(json.dumps(quality_report(run_pipeline(rows, config)), default=str))}
    assert snap["removed_total"] > 0 and any(s["removed"] for s in snap["steps"])
    path = "/v1/snapshots/snap-1/report"
    assert violations(openapi, "GET", path, 200, "application/json", snap) == []
    broken = copy.deepcopy(snap)
    broken["splits"]["train"]["prompt_chars"] = {"count": 3}
    assert any("p90" in v for v in violations(openapi, "GET", path, 200, "application/json", broken))
    broken = copy.deepcopy(snap)
    broken["steps"][0]["removed"] = "some"
    assert violations(openapi, "GET", path, 200, "application/json", broken)


def test_training_metrics_drift_results_and_problem_items_are_typed(openapi: dict[str, Any]) -> None:
    metrics = {"train_loss": 0.4, "steps": 20, "total_steps": 20, "epochs": 2.0, "train_rows": 150, "replay_rows": 10,
               "validation_rows": 5, "best_val_loss": 0.3, "best_step": 20, "stopped_early": False,
               "runtime_seconds": 12.5, "precision": "fp32", "tokens_per_second": 900.0,
               "val_history": [{"step": 10, "val_loss": 0.5}, {"step": 20, "val_loss": 0.3}], "last_loss": 0.41}
    job = job_json(Job(id="ftjob-1", kind="fine_tune", deployment="shop", status="succeeded", spec={"method": "sft"},
                       hyperparameters={}, metrics=metrics, attempts=1, created_at=1.0, finished_at=2.0))
    path = "/v1/fine_tuning/jobs/ftjob-1"
    assert violations(openapi, "GET", path, 200, "application/json", job) == []
    for bad in ({"steps": "twenty"}, {"precision": "fp8"}, {"val_history": [{"step": 10}]}):
        assert violations(openapi, "GET", path, 200, "application/json", {**job, "metrics": {**metrics, **bad}}), bad

    drift = drift_job_json(Job(id="driftjob-1", kind="drift", deployment="shop", status="succeeded", spec={},
                               hyperparameters={}, attempts=1, created_at=1.0, finished_at=2.0,
                               metrics={"reference_rows": 500, "current_rows": 500, "reference_source": "first "
                                        "traffic window", "monitor_run_id": 3, "share": 0.4, "drifted": ["prompt"]}))
    path = "/v1/monitoring/drift_jobs/driftjob-1"
    assert violations(openapi, "GET", path, 200, "application/json", drift) == []
    assert violations(openapi, "GET", path, 200, "application/json",
                      {**drift, "result": {**drift["result"], "drifted": True}})

    items = [{"index": 1, "field": "[1].rating", "message": "Expected `float`"},
             {"line": 3, "field": "messages[0].role", "reason": "unknown role"}]
    problem = _problem(422, "Unprocessable Content", "2 invalid items", "/v1/feedback", field="[1].rating",
                       errors=items)
    assert violations(openapi, "POST", "/v1/feedback", 422, "application/problem+json", problem) == []
    assert violations(openapi, "POST", "/v1/feedback", 422, "application/problem+json",
                      {**problem, "errors": [{"index": "first", "field": "[1].rating", "message": "x"}]})
