"""The OpenAPI document describes every response (`service/api/responses.py`), and the conformance check the
integration tests run on every response (`tests/openapi_conformance.py`) catches a response that strays."""

from __future__ import annotations

from typing import Any

import pytest

from service.app import create_app
from service.core.deployments import deployment_json
from service.core.jobs import job_json
from service.errors import NotFound, _problem
from service.settings import Settings
from service.storage.models import Deployment, Job
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
