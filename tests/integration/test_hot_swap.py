"""Zero-downtime swaps under load: concurrent clients for the whole run while 100 promote/rollback swaps
happen on the real service and the real vLLM. No request fails, and every response was served by an
adapter that was routable for the deployment at that moment. And an adapter that passed its evaluation is
loaded ahead of its promote, so the promote does not load it again; the previous production stays loaded for
a rollback, and a restarted service loads it again."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import pytest

from tests.conftest import start_service, stop_service
from tests.conftest_vllm import record_passed_evaluation, register_random_lora

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
SWAPS = 100


def _wait_for_a_request_within(results: list, after: float, timeout: float = 60) -> None:
    """Hold the next swap until a request that started after `after` has finished, so every swap's window
    holds at least one whole request to check, however slow the machine is."""
    deadline = time.monotonic() + timeout
    while not any(t0 > after for t0, *_ in list(results)):
        assert time.monotonic() < deadline, "no request finished within a minute of a swap"
        time.sleep(0.02)


def test_100_swaps_under_load_without_a_failed_request(service, base_model_dir, tmp_path) -> None:
    dep = "swaps"
    with service.client() as c:
        assert c.post("/v1/deployments", json={"name": dep}).status_code == 201
    adapters = [register_random_lora(service.data_dir / "tuneloop.db", base_model_dir, tmp_path / f"lora-{seed}",
                                     dep, seed) for seed in (1, 2)]

    results: list[tuple[float, float, int, str]] = []
    stop = threading.Event()

    def client(k: int) -> None:
        with httpx.Client(base_url=service.url, timeout=120,
                          headers={"Authorization": f"Bearer {service.admin_key}"}) as cl:
            while not stop.is_set():
                t0 = time.monotonic()
                r = cl.post("/v1/chat/completions", json={"model": dep, "max_tokens": 2, "user": f"c{k}",
                                                          "messages": [{"role": "user", "content": "Hi"}]})
                results.append((t0, time.monotonic(), r.status_code, r.headers.get("x-tuneloop-adapter", "")))

    # timeline[i] = (time the i-th swap was requested, time it returned, adapter routable after it)
    timeline: list[tuple[float, float, str | None]] = [(0.0, 0.0, None)]
    threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    try:
        with service.client() as c:
            for i in range(SWAPS):
                t0 = time.monotonic()
                if i % 2 == 0:
                    target = adapters[(i // 2) % 2]
                    r = c.post(f"/v1/deployments/{dep}/promote", json={"adapter_id": target})
                else:
                    r = c.post(f"/v1/deployments/{dep}/rollback")
                assert r.status_code == 200, r.text
                end = time.monotonic()
                timeline.append((t0, end, r.json()["adapter_id"]))
                _wait_for_a_request_within(results, end)
    finally:
        stop.set()
        for t in threads:
            t.join(120)

    assert len(results) > SWAPS
    failed = [r for r in results if r[2] != 200]
    assert not failed, f"{len(failed)} failed requests, e.g. {failed[:3]}"

    def served(header: str) -> str | None:
        if header == "base":
            return None
        assert header.startswith(f"{dep}--"), header
        return header.split("--")[1]

    # A request that started after swap i returned and ended before swap i+1 began saw exactly swap i's adapter.
    checked = 0
    for (_, end_i, adapter_i), (start_next, _, _) in zip(timeline, timeline[1:] + [(float("inf"), 0, None)]):
        for t0, t1, _, header in results:
            if t0 > end_i and t1 < start_next:
                assert served(header) == adapter_i, (header, adapter_i)
                checked += 1
    # Any other request was served by one of the two adapters routable around its time.
    allowed = {None, *adapters}
    assert all(served(h) in allowed for *_, h in results)
    assert checked >= SWAPS  # each swap's window held at least one whole request
    with service.client() as c:
        history = c.get(f"/v1/deployments/{dep}/history").json()["data"]
    assert len(history) == SWAPS


def _staged(c: httpx.Client, dep: str, until, timeout: float = 120, role: str = "staged") -> str | None:
    """The staged (or standby) served name of `dep` once `until(name)` holds (the monitor loop runs every 5 s)."""
    deadline = time.monotonic() + timeout
    while not until(name := c.get(f"/v1/deployments/{dep}").json()[role]):
        assert time.monotonic() < deadline, f"{dep}'s {role} adapter is still {name!r}"
        time.sleep(0.5)
    return name


def _vllm_models(vllm_supervisor) -> set[str]:
    return {m["id"] for m in httpx.get(f"{vllm_supervisor.base_url}/v1/models").json()["data"]}


def _loads(c: httpx.Client, dep: str) -> float:
    text = c.get("/metrics").text
    line = next((ln for ln in text.splitlines() if ln.startswith("tuneloop_swap_phase_seconds_count")
                 and f'deployment="{dep}"' in ln and 'phase="load"' in ln), None)
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


def _start_half_and_half(c: httpx.Client, dep: str, treatment: str) -> str:
    """Start an experiment of production against `treatment`, 50/50, that never decides by itself; its id."""
    exp = c.post("/v1/experiments", json={
        "deployment": dep, "seed": dep, "goal": {"metric": "rating"},
        "variants": [{"name": "control", "adapter_id": "production", "weight": 0.5},
                     {"name": "treatment", "adapter_id": treatment, "weight": 0.5}],
        "policy": {"auto_promote": False, "auto_rollback": False}})
    assert exp.status_code == 201, exp.text
    return exp.json()["id"]


def test_a_passed_adapter_is_staged_and_its_promote_does_not_load_it_again(service, base_model_dir, tmp_path,
                                                                         vllm_supervisor) -> None:
    dep = "staged"
    db = service.data_dir / "tuneloop.db"
    with service.client() as c:
        assert c.post("/v1/deployments", json={"name": dep}).status_code == 201
        first = register_random_lora(db, base_model_dir, tmp_path / "lora-1", dep, 1)
        time.sleep(12)  # two monitor passes: a candidate without a passed evaluation is not staged
        assert c.get(f"/v1/deployments/{dep}").json()["staged"] is None
        record_passed_evaluation(db, first, dep)
        name = _staged(c, dep, lambda n: n is not None)
        assert name.startswith(f"{dep}--{first}--g"), name
        assert name in _vllm_models(vllm_supervisor)
        r = c.post("/v1/chat/completions", json={"model": dep, "max_tokens": 1,
                                                 "messages": [{"role": "user", "content": "Hi"}]})
        assert r.headers["x-tuneloop-adapter"] == "base"  # staged is not routable

        loads = _loads(c, dep)
        assert c.post(f"/v1/deployments/{dep}/promote", json={"adapter_id": first}).status_code == 200
        r = c.post("/v1/chat/completions", json={"model": dep, "max_tokens": 1,
                                                 "messages": [{"role": "user", "content": "Hi"}]})
        assert r.headers["x-tuneloop-adapter"] == name  # the staged served name: no second load and probe
        assert _loads(c, dep) == loads
        assert c.get(f"/v1/deployments/{dep}").json()["staged"] is None

        # a newer passed adapter is staged; once it is rejected it is unloaded again
        second = register_random_lora(db, base_model_dir, tmp_path / "lora-2", dep, 2)
        record_passed_evaluation(db, second, dep)
        name = _staged(c, dep, lambda n: n is not None)
        assert name.startswith(f"{dep}--{second}--g") and name in _vllm_models(vllm_supervisor), name
        # an experiment that starts with it takes it as loaded: its variant serves under the staged name
        exp = _start_half_and_half(c, dep, second)
        assert c.get(f"/v1/deployments/{dep}").json()["staged"] is None
        served = {c.post("/v1/chat/completions", json={"model": dep, "max_tokens": 1, "user": f"u{i}", "messages": [
            {"role": "user", "content": "Hi"}]}).headers["x-tuneloop-adapter"] for i in range(16)}
        assert name in served, served
        assert c.post(f"/v1/experiments/{exp}/stop").status_code == 200
        # still the newest passed candidate, so it is staged again after the experiment, under a new name
        name = _staged(c, dep, lambda n: n is not None)
        assert name.startswith(f"{dep}--{second}--g") and name in _vllm_models(vllm_supervisor), name
        import sqlite3
        with sqlite3.connect(db, timeout=30) as conn:
            conn.execute("UPDATE adapters SET status = 'rejected' WHERE id = ?", (second,))
        _staged(c, dep, lambda n: n is None)
        assert name not in _vllm_models(vllm_supervisor)


def _chat_served_by(c: httpx.Client, dep: str) -> str:
    r = c.post("/v1/chat/completions", json={"model": dep, "max_tokens": 1,
                                             "messages": [{"role": "user", "content": "Hi"}]})
    assert r.status_code == 200, r.text
    return r.headers["x-tuneloop-adapter"]


def test_the_previous_production_stays_loaded_so_a_rollback_does_not_load_it_again(service, base_model_dir,
                                                                                   tmp_path, vllm_supervisor) -> None:
    dep = "standby"
    db = service.data_dir / "tuneloop.db"
    with service.client() as c:
        assert c.post("/v1/deployments", json={"name": dep}).status_code == 201
        first, second = (register_random_lora(db, base_model_dir, tmp_path / f"lora-{seed}", dep, seed)
                         for seed in (1, 2))

        def standby() -> str | None:
            return c.get(f"/v1/deployments/{dep}").json()["standby"]

        assert c.post(f"/v1/deployments/{dep}/promote", json={"adapter_id": first}).status_code == 200
        first_name = _chat_served_by(c, dep)
        assert first_name.startswith(f"{dep}--{first}--g") and standby() is None  # the base model left: nothing kept
        assert c.post(f"/v1/deployments/{dep}/promote", json={"adapter_id": second}).status_code == 200
        second_name = _chat_served_by(c, dep)
        assert second_name.startswith(f"{dep}--{second}--g")
        assert standby() == first_name and first_name in _vllm_models(vllm_supervisor)

        loads = _loads(c, dep)
        r = c.post(f"/v1/deployments/{dep}/rollback")
        assert r.status_code == 200 and r.json()["adapter_id"] == first, r.text
        assert _chat_served_by(c, dep) == first_name  # the same served name: no second load and probe
        assert _loads(c, dep) == loads
        assert standby() == second_name  # rolling back again would be a switch too

        # the base model takes production: `first` is kept for the rollback, `second` is drained and unloaded
        assert c.post(f"/v1/deployments/{dep}/promote", json={"adapter_id": None}).status_code == 200
        assert _chat_served_by(c, dep) == "base" and standby() == first_name
        deadline = time.monotonic() + 60
        while second_name in (models := _vllm_models(vllm_supervisor)):
            assert time.monotonic() < deadline, "the replaced standby was not unloaded"
            time.sleep(0.5)
        assert first_name in models

        # An experiment's control is the production target. When its treatment is promoted and the experiment
        # stops, the experiment's clean-up must not unload the demoted production: it is the standby now.
        assert c.post(f"/v1/deployments/{dep}/promote", json={"adapter_id": first}).status_code == 200
        assert _chat_served_by(c, dep) == first_name
        exp = _start_half_and_half(c, dep, second)
        assert c.post(f"/v1/deployments/{dep}/promote", json={"adapter_id": second}).status_code == 200
        assert c.post(f"/v1/experiments/{exp}/stop").status_code == 200
        time.sleep(2)  # what the experiment's clean-up unloads is unloaded by now
        assert standby() == first_name and first_name in _vllm_models(vllm_supervisor)
        assert c.post(f"/v1/deployments/{dep}/rollback").status_code == 200
        assert _chat_served_by(c, dep) == first_name


def test_a_restarted_service_loads_the_rollback_target_on_standby_again(base_model_dir, tmp_path,
                                                                        vllm_supervisor) -> None:
    """The standby lives in the API process; after a restart it is loaded again from the deployment history."""
    dep = "restarted"
    data_dir = tmp_path / "svc"
    svc = start_service(data_dir, base_model_dir, [vllm_supervisor.base_url])
    try:
        with svc.client() as c:
            assert c.post("/v1/deployments", json={"name": dep}).status_code == 201
            first, second = (register_random_lora(data_dir / "tuneloop.db", base_model_dir, tmp_path / f"lora-{seed}",
                                                  dep, seed) for seed in (1, 2))
            for adapter in (first, second):
                assert c.post(f"/v1/deployments/{dep}/promote", json={"adapter_id": adapter}).status_code == 200
            assert c.get(f"/v1/deployments/{dep}").json()["standby"].startswith(f"{dep}--{first}--g")
    finally:
        stop_service(svc)

    svc = start_service(data_dir, base_model_dir, [vllm_supervisor.base_url])
    try:
        with svc.client() as c:
            name = _staged(c, dep, lambda n: n is not None, timeout=60, role="standby")
            assert name.startswith(f"{dep}--{first}--g") and name in _vllm_models(vllm_supervisor), name
            assert _chat_served_by(c, dep).startswith(f"{dep}--{second}--g")
            loads = _loads(c, dep)
            r = c.post(f"/v1/deployments/{dep}/rollback")
            assert r.status_code == 200 and r.json()["adapter_id"] == first, r.text
            assert _chat_served_by(c, dep) == name  # the restored standby serves: the rollback loaded nothing
            assert _loads(c, dep) == loads
    finally:
        stop_service(svc)


def test_an_adapter_that_cannot_be_loaded_again_fails_only_its_own_deployment(base_model_dir, tmp_path,
                                                                              vllm_supervisor) -> None:
    """A production whose files are gone when the service restarts: vLLM refuses it, the other deployments serve,
    its own requests get a 503, and a rollback makes it serve again (it used to keep the server not ready)."""
    data_dir = tmp_path / "svc"
    svc = start_service(data_dir, base_model_dir, [vllm_supervisor.base_url])
    try:
        with svc.client() as c:
            adapters = {}
            for seed, dep in enumerate(("kept", "lost"), start=1):
                assert c.post("/v1/deployments", json={"name": dep}).status_code == 201
                adapters[dep] = register_random_lora(data_dir / "tuneloop.db", base_model_dir, tmp_path / dep, dep, seed)
                assert c.post(f"/v1/deployments/{dep}/promote", json={"adapter_id": adapters[dep]}).status_code == 200
    finally:
        stop_service(svc)
    shutil.rmtree(tmp_path / "lost")

    svc = start_service(data_dir, base_model_dir, [vllm_supervisor.base_url], timeout=120)
    try:
        with svc.client() as c:
            assert _chat_served_by(c, "kept").startswith(f"kept--{adapters['kept']}--g")
            assert _chat_served_by(c, "default") == "base"
            r = c.post("/v1/chat/completions", json={"model": "lost", "max_tokens": 1,
                                                     "messages": [{"role": "user", "content": "Hi"}]})
            assert r.status_code == 503 and adapters["lost"] in r.json()["detail"], r.text
            assert c.post("/v1/deployments/lost/rollback").status_code == 200
            assert _chat_served_by(c, "lost") == "base"
            r = c.post("/v1/deployments/lost/promote", json={"adapter_id": adapters["lost"]})  # its files are gone
            assert r.status_code == 409 and r.json()["field"] == "adapter_id", r.text
            assert "vLLM cannot serve adapter" in r.json()["detail"] and "No adapter found" in r.json()["detail"]
            assert _chat_served_by(c, "lost") == "base"  # nothing changed
        assert f"adapter {adapters['lost']}" in svc.log_text() and "cannot be loaded again" in svc.log_text()
    finally:
        stop_service(svc)
