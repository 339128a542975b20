"""The Litestar application factory: routes, the one exception mapper, and the lifespan."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from litestar import Litestar
from litestar.config.app import AppConfig  # noqa: F401 - documented extension point
from litestar.exceptions import HTTPException
from litestar.openapi.config import OpenAPIConfig

from service.api import data, deployments, experiments, health, inference, keys, monitoring, training
from service.api.common import reject_nul_parameters
from service.context import AppContext
from service.errors import ServiceError, problem_response
from service.settings import Settings

ROUTES = [
    health.health, health.ready,
    keys.create_key,
    deployments.create_deployment, deployments.list_deployments, deployments.get_deployment,
    deployments.update_deployment,
    inference.chat_completions, inference.completions, inference.list_models, inference.get_completion,
    data.post_feedback, data.list_feedback, data.create_dataset, data.list_datasets, data.get_dataset,
    data.delete_dataset,
    data.upload_records, data.create_snapshot, data.get_snapshot_job, data.cancel_snapshot_job, data.get_snapshot,
    data.delete_snapshot, data.snapshot_report, data.create_erasure_job, data.list_erasure_jobs,
    data.get_erasure_job, data.cancel_erasure_job,
    training.create_job, training.list_jobs, training.get_job, training.cancel_job, training.job_events,
    training.job_checkpoints, training.list_adapters, training.get_adapter, training.import_adapter,
    training.export_adapter, training.delete_adapter, training.request_evaluation,
    training.adapter_evaluations, training.get_evaluation, training.cancel_evaluation, training.evaluation_report,
    training.promote, training.rollback, training.history,
    experiments.create_experiment, experiments.list_experiments, experiments.get_experiment,
    experiments.stop_experiment,
    monitoring.drift_history, monitoring.drift_report, monitoring.fairness, monitoring.triggers, monitoring.run_now,
    monitoring.get_drift_job, monitoring.cancel_drift_job,
]


def create_app(settings: Settings | None = None) -> Litestar:
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        ctx = await AppContext.start(settings)
        app.state.ctx = ctx
        try:
            yield
        finally:
            await ctx.stop()

    routes = [*ROUTES, health.metrics_open if settings.metrics_public else health.metrics_admin]
    return Litestar(
        route_handlers=routes,
        lifespan=[lifespan],
        before_request=reject_nul_parameters,
        exception_handlers={ServiceError: problem_response, HTTPException: problem_response,
                            Exception: problem_response},
        openapi_config=OpenAPIConfig(title="tuneloop", version="0.1.0"),
        request_max_body_size=settings.max_upload_bytes,
        logging_config=None,
        debug=False,
    )


logging.getLogger("tuneloop").setLevel(logging.INFO)
