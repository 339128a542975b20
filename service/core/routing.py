"""The routing table: which vLLM model name serves each deployment right now.

It is an in-memory, copy-on-write map owned by the API process (swaps replace whole entries, so a request
sees either the old or the new route, never a mix) plus in-flight counters per served name, so that an
adapter that left routing is unloaded only after its requests have drained.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

BASE_NAME = "base"


@dataclass(frozen=True)
class Target:
    served_name: str
    adapter_id: str | None
    path: str | None = None  # PEFT directory, None for the base model


@dataclass(frozen=True)
class Variant:
    name: str
    target: Target
    weight: float


@dataclass(frozen=True)
class ExperimentRoute:
    experiment_id: str
    seed: str
    variants: tuple[Variant, ...]


@dataclass(frozen=True)
class Choice:
    target: Target
    experiment_id: str | None = None
    variant: str | None = None


Assigner = Callable[[str, str, list[float]], int]


def _random_assign(_seed: str, _unit: str, weights: list[float]) -> int:
    return random.choices(range(len(weights)), weights=weights)[0]


@dataclass
class Router:
    production: dict[str, Target] = field(default_factory=dict)
    experiments: dict[str, ExperimentRoute] = field(default_factory=dict)
    inflight: Counter[str] = field(default_factory=Counter)
    assign: Assigner = _random_assign
    _drained: asyncio.Event = field(default_factory=asyncio.Event)

    def set_production(self, deployment: str, target: Target) -> None:
        self.production = {**self.production, deployment: target}

    def set_experiment(self, deployment: str, route: ExperimentRoute | None) -> None:
        experiments = dict(self.experiments)
        if route is None:
            experiments.pop(deployment, None)
        else:
            experiments[deployment] = route
        self.experiments = experiments

    def choose(self, deployment: str, unit: str | None) -> Choice | None:
        """Pick the target for one request; sticky per unit when an experiment runs."""
        exp = self.experiments.get(deployment)
        if exp is not None:
            weights = [v.weight for v in exp.variants]
            idx = self.assign(exp.seed, unit, weights) if unit else _random_assign(exp.seed, "", weights)
            v = exp.variants[idx]
            return Choice(v.target, exp.experiment_id, v.name)
        target = self.production.get(deployment)
        return None if target is None else Choice(target)

    def routable(self) -> dict[str, Target]:
        """Every adapter some request may be routed to (re-loaded first after a vLLM restart)."""
        out = {t.served_name: t for t in self.production.values() if t.adapter_id}
        for exp in self.experiments.values():
            out.update({v.target.served_name: v.target for v in exp.variants if v.target.adapter_id})
        return out

    @contextmanager
    def track(self, name: str) -> Iterator[None]:
        self.inflight[name] += 1
        try:
            yield
        finally:
            self.inflight[name] -= 1
            if self.inflight[name] <= 0:
                del self.inflight[name]
                self._drained.set()

    async def drain(self, name: str, timeout: float = 120.0) -> bool:
        """Wait until no request is in flight on `name`; False on timeout."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.inflight.get(name, 0) > 0:
            self._drained.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._drained.wait(), timeout=min(remaining, 1.0))
            except TimeoutError:
                pass
        return True
