"""Deployments: create, list, show."""

from __future__ import annotations

from typing import Any

from litestar import Request, get, patch, post

from service.api import bodies, responses
from service.api.common import ctx_of, json_object
from service.api.openapi import operation
from service.auth import admin_scope, app_scope
from service.core.deployments import deployment_json
from service.core.routing import BASE_NAME, Target
from service.errors import Unprocessable


@post("/v1/deployments", guards=[admin_scope], status_code=201,
      operation_class=operation(responses.Deployment, bodies.DeploymentCreate))
async def create_deployment(request: Request[Any, Any, Any]) -> dict[str, Any]:
    body = await json_object(request, bodies.DeploymentCreate)
    ctx = ctx_of(request)
    dep = await ctx.deployments.create(body.get("name"), body.get("base_model"), body.get("config"))
    ctx.router.set_production(dep.name, Target(BASE_NAME, None))
    return {**deployment_json(dep), "serving": BASE_NAME}


@patch("/v1/deployments/{name:str}", guards=[admin_scope],
       operation_class=operation(responses.Deployment, bodies.DeploymentPatch))
async def update_deployment(request: Request[Any, Any, Any], name: str) -> dict[str, Any]:
    """Merge `config` keys (gates, eval_dataset_id, triggers, …) into the deployment's config."""
    body = await json_object(request, bodies.DeploymentPatch)
    if not isinstance(body.get("config"), dict):
        raise Unprocessable("body must be {\"config\": {...}}", field="config")
    return deployment_json(await ctx_of(request).deployments.update_config(name, body["config"]))


@get("/v1/deployments", guards=[app_scope], operation_class=operation(responses.Page[responses.Deployment]))
async def list_deployments(request: Request[Any, Any, Any]) -> dict[str, Any]:
    deps = await ctx_of(request).deployments.list()
    return {"object": "list", "data": [deployment_json(d) for d in deps]}


@get("/v1/deployments/{name:str}", guards=[app_scope], operation_class=operation(responses.Deployment))
async def get_deployment(request: Request[Any, Any, Any], name: str) -> dict[str, Any]:
    ctx = ctx_of(request)
    out = deployment_json(await ctx.deployments.get(name))
    choice = ctx.router.production.get(name)
    out["serving"] = choice.served_name if choice else None
    for role, targets in (("staged", ctx.serving.staged), ("standby", ctx.serving.standby)):
        t = targets.get(name)
        out[role] = t.served_name if t else None
    return out
