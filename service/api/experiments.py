"""A/B experiments: create, list, show (live statistics), stop."""

from __future__ import annotations

from typing import Any

from litestar import Request, get, post

from service.api import bodies, responses
from service.api.common import ctx_of, json_body
from service.api.openapi import operation
from service.auth import admin_scope
from service.core.experiments import experiment_json


@post("/v1/experiments", guards=[admin_scope], status_code=201,
      operation_class=operation(responses.Experiment, bodies.ExperimentCreate))
async def create_experiment(request: Request[Any, Any, Any]) -> dict[str, Any]:
    ctx = ctx_of(request)
    exp = await ctx.experiments.create(await json_body(request))
    return experiment_json(exp, await ctx.experiments.summary(exp))


@get("/v1/experiments", guards=[admin_scope], operation_class=operation(responses.Page[responses.Experiment]))
async def list_experiments(request: Request[Any, Any, Any], deployment: str | None = None) -> dict[str, Any]:
    return {"object": "list", "data": [experiment_json(e) for e in await ctx_of(request).experiments.list(deployment)]}


@get("/v1/experiments/{experiment_id:str}", guards=[admin_scope], operation_class=operation(responses.Experiment))
async def get_experiment(request: Request[Any, Any, Any], experiment_id: str) -> dict[str, Any]:
    svc = ctx_of(request).experiments
    exp = await svc.get(experiment_id)
    out = experiment_json(exp, await svc.summary(exp))
    out["events"] = [{"type": e.type, "data": e.data, "created_at": e.created_at} for e in await svc.events(exp.id)]
    return out


@post("/v1/experiments/{experiment_id:str}/stop", guards=[admin_scope], status_code=200,
      operation_class=operation(responses.Experiment))
async def stop_experiment(request: Request[Any, Any, Any], experiment_id: str) -> dict[str, Any]:
    return experiment_json(await ctx_of(request).experiments.stop(experiment_id))
