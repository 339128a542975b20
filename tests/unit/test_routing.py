"""The routing table: atomic swaps, sticky experiment assignment, in-flight draining."""

from __future__ import annotations

import asyncio

from monitoring.experiments import assign
from service.core.routing import BASE_NAME, ExperimentRoute, Router, Target, Variant


def test_production_swap_replaces_the_whole_map() -> None:
    r = Router()
    r.set_production("d", Target(BASE_NAME, None))
    before = r.production
    r.set_production("d", Target("d--a1--g1", "a1", "/p"))
    assert before["d"].served_name == BASE_NAME  # readers holding the old map are unaffected
    assert r.choose("d", None).target.adapter_id == "a1"
    assert r.choose("missing", None) is None
    assert set(r.routable()) == {"d--a1--g1"}


def test_experiment_assignment_is_sticky_per_unit() -> None:
    r = Router(assign=assign)
    r.set_production("d", Target(BASE_NAME, None))
    a, b = Target(BASE_NAME, None), Target("d--a2--g2", "a2", "/p2")
    r.set_experiment("d", ExperimentRoute("exp-1", "seed", (Variant("control", a, 0.5), Variant("t", b, 0.5))))
    picks = {u: r.choose("d", u).variant for u in (f"u{i}" for i in range(200))}
    assert all(r.choose("d", u).variant == v for u, v in picks.items())
    assert 70 < sum(v == "t" for v in picks.values()) < 130
    assert r.choose("d", "u1").experiment_id == "exp-1"
    assert "d--a2--g2" in r.routable()
    r.set_experiment("d", None)
    assert r.choose("d", "u1").variant is None and "d--a2--g2" not in r.routable()


async def test_drain_waits_for_in_flight_requests() -> None:
    r = Router()
    released = asyncio.Event()

    async def request() -> None:
        with r.track("x"):
            await released.wait()

    tasks = [asyncio.create_task(request()) for _ in range(3)]
    await asyncio.sleep(0)
    assert r.inflight["x"] == 3
    assert await r.drain("x", timeout=0.2) is False  # still busy
    drained = asyncio.create_task(r.drain("x", timeout=5))
    released.set()
    assert await drained is True
    await asyncio.gather(*tasks)
    assert "x" not in r.inflight
