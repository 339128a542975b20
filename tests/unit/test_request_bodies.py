"""The request bodies the OpenAPI document describes (`service/api/bodies.py`) match what the handlers accept."""

from __future__ import annotations

from typing import Any

import pytest

from service.api import bodies
from service.app import create_app
from service.core.deployments import checked_config
from service.core.experiments import EXPERIMENT_FIELDS, checked_auto_deploy
from service.core.feedback import FEEDBACK_FIELDS
from service.core.jobs import JOB_FIELDS
from service.errors import Unprocessable
from service.settings import Settings


@pytest.mark.parametrize(("body_type", "accepted"), [
    (bodies.JobCreate, JOB_FIELDS), (bodies.ExperimentCreate, EXPERIMENT_FIELDS),
    (bodies.FeedbackItem, FEEDBACK_FIELDS)])
def test_documented_fields_are_the_accepted_fields(body_type: Any, accepted: frozenset[str]) -> None:
    """These services check fields themselves (the worker and triggers call them without HTTP)."""
    assert set(body_type.__struct_fields__) == accepted


@pytest.fixture(scope="module")
def openapi(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    settings = Settings.from_env(data_dir=tmp_path_factory.mktemp("data"))
    return create_app(settings).openapi_schema.to_schema()


def test_every_operation_that_reads_a_body_describes_it(openapi: dict[str, Any]) -> None:
    without = {("post", p) for p in ("/v1/snapshot_jobs/{job_id}/cancel", "/v1/fine_tuning/jobs/{job_id}/cancel",
                                     "/v1/adapters/{adapter_id}/evaluations", "/v1/deployments/{name}/rollback",
                                     "/v1/experiments/{experiment_id}/stop", "/v1/monitoring/run",
                                     "/v1/monitoring/drift_jobs/{job_id}/cancel", "/v1/evaluations/{evaluation_id}/cancel",
                                     "/v1/erasure_jobs/{job_id}/cancel")}
    described = {(m, p) for p, ops in openapi["paths"].items() for m, op in ops.items() if "requestBody" in op}
    writes = {(m, p) for p, ops in openapi["paths"].items() for m in ops if m in ("post", "patch", "put")}
    assert described == writes - without
    assert len(described) == 14


def test_body_schemas_are_self_contained(openapi: dict[str, Any]) -> None:
    """No `$ref` left dangling: litestar rebuilds the document's component schemas from its own registry."""
    job = openapi["paths"]["/v1/fine_tuning/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "$ref" not in str(job)
    props = job["properties"]
    assert job["additionalProperties"] is False and job["required"] == ["deployment"]
    hyper = next(s for s in props["method"]["anyOf"] if s.get("type") == "object")["properties"]["hyperparameters"]
    lora_r = next(s for s in hyper["anyOf"] if s.get("type") == "object")["properties"]["lora_r"]
    assert lora_r["type"] == "integer"  # from adapters.training.config.Hyperparameters itself
    upload = openapi["paths"]["/v1/datasets/{dataset_id}/records"]["post"]["requestBody"]["content"]
    assert list(upload) == ["application/x-ndjson"]
    policy = openapi["paths"]["/v1/experiments"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    policy_props = next(s for s in policy["properties"]["policy"]["anyOf"] if s.get("type") == "object")["properties"]
    assert "alpha" in policy_props and "guardrails" not in policy_props  # guardrails sit at the top level


def test_cross_field_rules_and_ranges_are_in_the_schema(openapi: dict[str, Any]) -> None:
    """What the handlers check beyond types: a feedback item needs a rating or a correction, and policy
    values have ranges (from `Policy`'s own field annotations)."""
    from jsonschema import Draft202012Validator

    feedback = Draft202012Validator(
        openapi["paths"]["/v1/feedback"]["post"]["requestBody"]["content"]["application/json"]["schema"])
    assert feedback.is_valid({"completion_id": "c", "rating": 1})
    assert feedback.is_valid([{"completion_id": "c", "correction": "card_arrival"}])
    assert not feedback.is_valid({"completion_id": "c", "comment": "neither"})
    assert not feedback.is_valid([{"completion_id": "c"}])
    experiment = Draft202012Validator(
        openapi["paths"]["/v1/experiments"]["post"]["requestBody"]["content"]["application/json"]["schema"])
    body = {"deployment": "d", "variants": [{"name": "a", "adapter_id": None}, {"name": "b", "adapter_id": "x"}]}
    assert experiment.is_valid({**body, "policy": {"alpha": 0.05, "ramp": [0.1, 0.5]}})
    assert not experiment.is_valid({**body, "policy": {"alpha": 0.5}})
    assert not experiment.is_valid({**body, "policy": {"ramp": [0.5, 1.5]}})
    assert not experiment.is_valid({**body, "guardrails": [{"metric": "rating", "max_regression": -1}]})


@pytest.mark.parametrize(("config", "field"), [
    ({"triggers": {"job": [None, None]}}, "config.triggers.job"),  # found by schemathesis: stored, then failed later
    ({"triggers": {"drift_share": 0}}, "config.triggers.drift_share"),
    ({"eval_max_rows": True}, "config.eval_max_rows"),
    ({"eval_backend": "gpu"}, "config.eval_backend"),
    ({"gates": {"max_retention_increase": 50}}, "config.gates"),
    ({"gates": {"bogus": 1}}, "config.gates"),
    ({"answer_choices": ["only"]}, "config.answer_choices"),
    # a trigger's job: checked as a job body when the config is written, not when the trigger fires
    ({"triggers": {"job": {"deployment": "other"}}}, "config.triggers.job.deployment"),
    ({"triggers": {"job": {"epochs": 2}}}, "config.triggers.job.epochs"),
    ({"triggers": {"job": {"method": {"type": "sft", "hyperparameters": {"learning_rate": -1}}}}},
     "config.triggers.job.method.hyperparameters.learning_rate"),
    ({"triggers": {"job": {"suffix": "Not A Suffix"}}}, "config.triggers.job.suffix"),
    ({"triggers": {"job": {"curation": {"split": {"validation_fraction": 2}}}}}, "config.triggers.job.curation"),
    ({"triggers": {"job": {"auto_deploy": {"experiment": {"policy": {"alpha": 2}}}}}},
     "config.triggers.job.auto_deploy.experiment.policy.alpha"),
])
def test_a_deployment_config_is_checked_against_its_documented_type(config: dict, field: str) -> None:
    with pytest.raises(Unprocessable) as err:
        checked_config(config)
    assert err.value.field == field


def test_a_valid_deployment_config_is_kept_as_sent_without_nulls() -> None:
    job = {"method": {"type": "sft", "hyperparameters": {"n_epochs": 2}}, "suffix": "auto",
           "auto_deploy": {"experiment": {"policy": {"auto_promote": True}}}}
    config = {"eval_max_rows": 3, "gates": {"min_task_delta": 0.01}, "triggers": {"corrections": 5, "job": job},
              "retention_path": None}
    assert checked_config(config) == {k: v for k, v in config.items() if v is not None}


@pytest.mark.parametrize(("auto_deploy", "field"), [
    ([], "auto_deploy"),
    ({}, "auto_deploy"),  # the experiment is required
    ({"experiment": {"polcy": {}}}, "auto_deploy.experiment"),  # a typo is named, not ignored
    ({"experiment": {"goal": {"metric": "clicks"}}}, "auto_deploy.experiment.goal.metric"),
    ({"experiment": {"policy": {"alpha": 0.9}}}, "auto_deploy.experiment.policy.alpha"),
    ({"experiment": {"policy": {"ramp": None}}}, "auto_deploy.experiment.policy.ramp"),
    ({"experiment": {"policy": {"ramp": [0.5, 0.25]}}}, "auto_deploy.experiment.policy"),  # must increase
    ({"experiment": {"guardrails": [{"metric": "rating", "max_regression": "a lot"}]}},
     "auto_deploy.experiment.guardrails[0].max_regression"),
])
def test_a_jobs_auto_deploy_is_checked_when_the_job_is_created(auto_deploy: Any, field: str) -> None:
    """Checked up front: otherwise it would fail only when the experiment starts, after the whole training run."""
    with pytest.raises(Unprocessable) as err:
        checked_auto_deploy(auto_deploy)
    assert err.value.field == field


def test_a_valid_auto_deploy_is_kept_as_sent() -> None:
    spec = {"experiment": {"policy": {"auto_promote": True, "ramp": [0.1, 0.5]}, "seed": 3,
                           "guardrails": [{"metric": "error_rate", "max_regression": 0.02}]}}
    assert checked_auto_deploy(spec) == spec and checked_auto_deploy(None) is None
