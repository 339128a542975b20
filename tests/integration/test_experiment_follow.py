"""An API process following an experiment another process started (`ExperimentService.follow`), on the real
databases, with a stand-in for vLLM serving (the logic above it is what is tested): an adapter that will not
load here is logged once and retried at every pass, and routed once it loads."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest

from service.core.experiments import ExperimentService
from service.core.routing import Router, Target
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


async def test_an_experiment_that_cannot_load_here_is_logged_once_and_routed_once_it_loads(
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
