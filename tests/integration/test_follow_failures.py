"""An API process following what another process committed (`ExperimentService.follow`,
`Serving.follow_production`), on the real databases, with a stand-in for vLLM (the logic above it is what is
tested): an adapter that will not load here is logged once and retried at every pass, routed once it loads, and
a later failure is logged again."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from service.core.experiments import ExperimentService
from service.core.routing import BASE_NAME, Router, Target
from service.core.serving import Serving
from service.storage.artifacts import ArtifactStore
from service.storage.models import Adapter, Deployment, Experiment


class FlakyServing:
    """Loads fail until `fixed`; every load is counted."""

    def __init__(self) -> None:
        self.pool = SimpleNamespace(ready=True)
        self.fixed = False
        self.loads = 0

    async def staged_or_load(self, deployment: str, adapter: Adapter) -> Target:
        self.loads += 1
        if not self.fixed:
            raise FileNotFoundError(adapter.path)
        return Target(f"{deployment}--{adapter.id}--g1-1", adapter.id)

    def retire(self, target: Target) -> None:
        pass


async def test_an_experiment_that_cannot_load_here_is_logged_once_routed_once_it_loads_and_logged_again_later(
        sessions: Any, caplog: pytest.LogCaptureFixture) -> None:
    async with sessions() as s, s.begin():
        s.add(Deployment(name="d", base_model="m"))
        s.add(Adapter(id="adp-1", deployment="d", version=1, path="/elsewhere/adp-1", base_model="m",
                      base_model_hash="h"))
        s.add(Experiment(id="exp-1", deployment="d", status="running", seed="exp-1", policy={"mode": "fixed"},
                         variants=[{"name": "control", "adapter_id": None, "weight": 0.5, "is_control": True},
                                   {"name": "candidate", "adapter_id": "adp-1", "weight": 0.5,
                                    "is_control": False}]))
    serving = FlakyServing()
    router = Router()
    experiments = ExperimentService(sessions, serving, router)  # type: ignore[arg-type]

    with caplog.at_level(logging.ERROR, logger="tuneloop.experiments"):
        for _ in range(3):
            await experiments.follow()
    assert serving.loads == 3  # retried at every pass
    assert len([r for r in caplog.records if "following experiment exp-1 failed" in r.getMessage()]) == 1
    assert "d" not in router.experiments

    serving.fixed = True
    await experiments.follow()
    route = router.experiments["d"]
    assert route.experiment_id == "exp-1"
    assert [v.weight for v in route.variants] == [0.5, 0.5]

    async with sessions() as s, s.begin():  # stopped and running again (no API does this; the log is the point)
        (await s.get(Experiment, "exp-1")).status = "stopped"
    await experiments.follow()
    assert "d" not in router.experiments
    async with sessions() as s, s.begin():
        (await s.get(Experiment, "exp-1")).status = "running"
    serving.fixed = False
    with caplog.at_level(logging.ERROR, logger="tuneloop.experiments"):
        await experiments.follow()
    assert len([r for r in caplog.records if "following experiment exp-1 failed" in r.getMessage()]) == 2


async def test_a_production_that_cannot_load_here_is_logged_once_adopted_once_it_loads_and_logged_again_later(
        sessions: Any, caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    async with sessions() as s, s.begin():
        s.add(Deployment(name="d", base_model="m", production_adapter_id=None))
        s.add(Adapter(id="adp-1", deployment="d", version=1, path="/elsewhere/adp-1", base_model="m",
                      base_model_hash="h"))

    async def unload_adapter(name: str) -> None:
        pass

    router = Router()
    router.set_production("d", Target(BASE_NAME, None))
    serving = Serving(sessions, SimpleNamespace(ready=True, unload_adapter=unload_adapter), router,  # type: ignore[arg-type]
                      ArtifactStore(sessions, tmp_path, store=False))
    flaky = FlakyServing()
    serving.load = flaky.staged_or_load  # type: ignore[method-assign]

    async def production_is(adapter_id: str | None) -> None:
        async with sessions() as s, s.begin():
            (await s.get(Deployment, "d")).production_adapter_id = adapter_id
        await serving.follow_production({"d": adapter_id})

    def failures() -> int:
        return len([r for r in caplog.records if "adopting adp-1 failed" in r.getMessage()])

    with caplog.at_level(logging.ERROR, logger="tuneloop.serving"):
        for _ in range(3):
            await production_is("adp-1")
        assert flaky.loads == 3 and failures() == 1
        assert router.production["d"].served_name == BASE_NAME

        flaky.fixed = True
        await production_is("adp-1")
        assert router.production["d"].adapter_id == "adp-1"

        await production_is(None)  # rolled back to the base model, then adp-1 again, which fails to load now
        assert router.production["d"].served_name == BASE_NAME
        flaky.fixed = False
        await production_is("adp-1")
        assert failures() == 2
    await serving.close()
