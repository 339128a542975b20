"""The shipped Prometheus config, alert rules and Grafana dashboards, proven against a REAL Prometheus that
scrapes the REAL service (session `service`, in front of the session's real vLLM).

The live part drives one fresh deployment through everything the dashboards show: traffic in several
segments (and a client error), feedback with ratings and corrections, an A/B experiment of the base model
against itself, a dataset upload, a monitor run (drift, fairness, a retraining trigger that creates a real
small SFT job), its evaluation, a promotion and a rollback. Then every panel query of every dashboard is run
through Prometheus' HTTP API the way Grafana runs it (range queries over the test's window, instant queries
for "instant" targets) and must return at least one series with a finite value; every alert expression
must evaluate, and the real Prometheus must have loaded and evaluated the shipped rules.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from examples.banking77.prepare import read_rows, to_chat
from tests.conftest import ROOT, free_port

PROM_DIR = ROOT / "monitoring" / "prometheus"
GRAFANA_DIR = ROOT / "monitoring" / "grafana"
DASHBOARDS = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
DS_UID = "prometheus"
SMALL = {"n_epochs": 1, "batch_size": 4, "learning_rate": 1e-3, "lora_r": 8, "lora_alpha": 16,
         "target_modules": ["q_proj", "v_proj"], "max_seq_len": 128, "warmup_ratio": 0.0}
SEGMENT_RATING = {"retail": 0.9, "business": 0.6, "student": 0.2}  # a rating gap of ~0.7 on purpose
RATE_INTERVAL = "1m"  # what Grafana computes for $__rate_interval with timeInterval 15s (4 scrapes)
STEP = 5  # seconds between points of the range queries


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: install Debian's `prometheus` package (`.ci/run` does; then "
                    "`pkill -x prometheus`, the package starts a system instance)", pytrace=False)
    return path


def _run(*cmd: str, cwd: Path = PROM_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def _dashboards() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in DASHBOARDS]


def _panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])  # collapsed rows


def _targets(dash: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    for p in _panels(dash):
        for t in p.get("targets", []):
            yield p, t


def _alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]


# --- static checks: promtool, JSON, wiring ------------------------------------------------------------
def test_shipped_prometheus_config_passes_promtool() -> None:
    out = _run(_tool("promtool"), "check", "config", "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout and "1 rule files found" in out.stdout + out.stderr
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    job = next(j for j in cfg["scrape_configs"] if j["job_name"] == "tuneloop")
    assert job["static_configs"][0]["targets"] == ["tuneloop:8000"]
    assert job["scrape_interval"] == "15s" and cfg["rule_files"] == ["alerts.yml"]


def test_shipped_alert_rules_pass_promtool_and_their_unit_tests() -> None:
    promtool = _tool("promtool")
    out = _run(promtool, "check", "rules", "alerts.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    rules = _alert_rules()
    assert f"SUCCESS: {len(rules)} rules found" in out.stdout
    names = {r["alert"] for r in rules}
    assert {"TuneloopDriftShareHigh", "TuneloopRatingDrop", "TuneloopFairnessGap", "TuneloopVLLMDown",
            "TuneloopTrainingFailures", "TuneloopExperimentSRM", "TuneloopHighErrorRate"} <= names
    for r in rules:
        assert r["labels"]["severity"] in ("critical", "warning", "info"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
    # Every alert has a firing case in the unit tests (and they pass).
    tests = yaml.safe_load((PROM_DIR / "alerts_test.yml").read_text())
    firing = {c["alertname"] for t in tests["tests"] for c in t["alert_rule_test"] if c.get("exp_alerts")}
    assert names <= firing, f"alerts without a firing unit test: {sorted(names - firing)}"
    out = _run(promtool, "test", "rules", "alerts_test.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboards_are_provisionable_grafana_json() -> None:
    ds = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert [d["uid"] for d in ds["datasources"]] == [DS_UID] and ds["datasources"][0]["type"] == "prometheus"
    dashes = _dashboards()
    assert {d["uid"] for d in dashes} == {"tuneloop-overview", "tuneloop-quality", "tuneloop-drift",
                                          "tuneloop-fairness", "tuneloop-training"}
    for d in dashes:
        assert 36 <= d["schemaVersion"] <= 41, d["uid"]
        variables = {v["name"]: v for v in d["templating"]["list"]}
        assert variables["deployment"]["query"].startswith("label_values(")
        assert variables["deployment"]["datasource"]["uid"] == DS_UID
        ids = [p["id"] for p in _panels(d)]
        assert len(ids) == len(set(ids)), d["uid"]
        cells: set[tuple[int, int]] = set()
        for p in _panels(d):
            g = p["gridPos"]
            assert g["x"] + g["w"] <= 24 and g["w"] > 0 and g["h"] > 0, (d["uid"], p["title"])
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not cells & mine, f"{d['uid']}: panel {p['title']!r} overlaps another"
            cells |= mine
            if p["type"] == "row":
                continue
            assert p["datasource"] == {"type": "prometheus", "uid": DS_UID}, (d["uid"], p["title"])
            assert p["targets"], (d["uid"], p["title"])
            for t in p["targets"]:
                assert t["datasource"]["uid"] == DS_UID and t["expr"].strip(), (d["uid"], p["title"])
                if "tuneloop_" in t["expr"] and "deployment" not in t["expr"]:
                    # only the process-wide metrics (jobs, vLLM, the monitor leader) may ignore the deployment variable
                    assert re.search(r"tuneloop_(jobs|vllm|monitor_leader)", t["expr"]), (d["uid"], p["title"], t["expr"])


def _declared_metric_names() -> dict[str, set[str]]:
    """Family → the sample names Prometheus sees for it (counters _total, histograms _bucket/_sum/_count)."""
    from monitoring.metrics import REGISTRY

    out: dict[str, set[str]] = {}
    for fam in REGISTRY.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(fam.type, [""])
        out[fam.name] = {fam.name + s for s in suffixes}
    return out


def test_dashboards_and_alerts_use_declared_metrics_and_cover_every_family() -> None:
    declared = _declared_metric_names()
    known = set().union(*declared.values())
    used: set[str] = set()
    exprs = [t["expr"] for d in _dashboards() for _, t in _targets(d)] + [r["expr"] for r in _alert_rules()]
    for expr in exprs:
        names = set(re.findall(r"\btuneloop_[a-z0-9_]+", expr))
        assert names <= known, f"unknown metric(s) {sorted(names - known)} in {expr}"
        used |= names
    dash_used = {n for d in _dashboards() for _, t in _targets(d) for n in re.findall(r"\btuneloop_[a-z0-9_]+", t["expr"])}
    missing = sorted(fam for fam, samples in declared.items() if not samples & dash_used)
    assert not missing, f"metric families shown on no dashboard: {missing}"


def test_docker_compose_wires_the_shipped_files() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    svc = compose["services"]
    assert set(svc) >= {"tuneloop", "postgres", "prometheus", "grafana"}
    app = svc["tuneloop"]
    assert (ROOT / app["build"]["context"] / app["build"].get("dockerfile", "Dockerfile")).is_file()
    env = app["environment"]
    assert env["TUNELOOP_DATABASE_URL"] == "postgresql+asyncpg://tuneloop@postgres/tuneloop"
    assert env["TUNELOOP_HOST"] == "0.0.0.0" and "TUNELOOP_ADMIN_KEY" in env["TUNELOOP_ADMIN_KEY"]
    assert svc["postgres"]["image"].startswith("postgres:16")
    pg_env = svc["postgres"]["environment"]
    assert pg_env["POSTGRES_USER"] == "tuneloop" and pg_env["POSTGRES_DB"] == "tuneloop"
    assert pg_env.get("POSTGRES_HOST_AUTH_METHOD") == "trust" or pg_env.get("POSTGRES_PASSWORD")
    ports = {p for s in svc.values() for p in s.get("ports", [])}
    assert {"8000:8000", "9090:9090", "3000:3000"} <= ports

    def mounts(name: str) -> dict[str, Path]:
        out = {}
        for m in svc[name]["volumes"]:
            src, dst = m.split(":")[:2]
            if src.startswith("."):
                assert (ROOT / src).exists(), m
                out[dst] = ROOT / src
        return out

    prom = mounts("prometheus")
    cfg_target = next(d for d, s in prom.items() if s.name == "prometheus.yml")
    assert "--config.file=" + cfg_target in svc["prometheus"]["command"]
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    for rule_file in cfg["rule_files"]:  # relative to the config file inside the container
        assert str(Path(cfg_target).parent / rule_file) in prom, rule_file
    host, port = cfg["scrape_configs"][0]["static_configs"][0]["targets"][0].split(":")
    assert host in svc and port == str(env.get("TUNELOOP_PORT", "8000"))

    graf = mounts("grafana")
    assert graf["/etc/grafana/provisioning"] == GRAFANA_DIR / "provisioning"
    provider = yaml.safe_load((GRAFANA_DIR / "provisioning" / "dashboards" / "tuneloop.yml").read_text())
    assert graf[provider["providers"][0]["options"]["path"]] == GRAFANA_DIR / "dashboards"
    ds = yaml.safe_load((GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert httpx.URL(ds["datasources"][0]["url"]).host in svc


# --- the live part: real Prometheus, real service, real workload ------------------------------------
def live_test(fn: Any) -> Any:
    """Needs the session's vLLM and service, and runs a real (small) training job."""
    return pytest.mark.slow(pytest.mark.vllm(fn))


class Prometheus:
    def __init__(self, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.url, self.proc, self.log = url, proc, log
        self.http = httpx.Client(base_url=url, timeout=60)

    def api(self, path: str, **params: Any) -> dict[str, Any]:
        r = self.http.get(path, params=params)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{path} {params}: {r.text[:500]}"
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        return self.api("/api/v1/query", query=expr, **({"time": at} if at else {}))["result"]

    def query_range(self, expr: str, start: float, end: float, step: int = STEP) -> list[dict[str, Any]]:
        return self.api("/api/v1/query_range", query=expr, start=start, end=end, step=step)["result"]

    def wait_for(self, expr: str, timeout: float, n: int = 1) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if len(result) >= n:
                return result
            if time.monotonic() > deadline:
                return result
            time.sleep(1)

    def stop(self) -> None:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_prometheus(tmp: Path, target: str) -> Prometheus:
    """The real binary, with the shipped config re-pointed at the test service, scraping every second."""
    cfg = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str(PROM_DIR / f) for f in cfg["rule_files"]]
    jobs = [j for j in cfg["scrape_configs"] if j["job_name"] == "tuneloop"]
    for j in jobs:
        j.update(scrape_interval="1s", scrape_timeout="1s")
        j["static_configs"] = [{"targets": [target], "labels": j["static_configs"][0].get("labels", {})}]
    cfg["scrape_configs"] = jobs
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    log = tmp / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([_tool("prometheus"), f"--config.file={tmp / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}",
                                 "--storage.tsdb.retention.time=1d"], stdout=out, stderr=subprocess.STDOUT)
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if prom.http.get("/-/ready").status_code == 200:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            prom.stop()
            raise TimeoutError(f"prometheus not ready:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    return prom


@dataclass
class Live:
    prom: Prometheus
    deployment: str
    start: float
    end: float = 0.0
    stages: dict[str, Any] = field(default_factory=dict)


def _poll(fetch: Any, done: Any, timeout: float, every: float = 2.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(every)


def _chat(service: Any, dep: str, text: str, user: str, segment: str) -> str:
    with service.client() as c:
        r = c.post("/v1/chat/completions", json={
            "model": dep, "messages": [{"role": "user", "content": text}], "max_tokens": 8, "temperature": 0,
            "user": user, "metadata": {"segment": segment}})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _workload(service: Any, live: Live, banking77_dir: Path) -> None:
    """Drive one fresh deployment through everything the dashboards show; record how far it got."""
    dep, stages = live.deployment, live.stages
    rows = read_rows(banking77_dir / "train.csv")
    random.Random(11).shuffle(rows)
    intents = sorted({c for _, c in rows})[:4]
    picked = [(t, c) for t, c in rows if c in intents]
    traffic, upload = picked[:48], picked[48:60]
    segments = list(SEGMENT_RATING)
    c = service.client()
    try:
        r = c.post("/v1/deployments", json={"name": dep, "config": {
            "eval_max_rows": 4, "retention_rows": 2,
            "gates": {"min_task_delta": -1.0, "max_retention_increase": 10.0},
            "triggers": {"corrections": 20, "job": {
                "seed": 1, "method": {"type": "sft", "hyperparameters": SMALL},
                "curation": {"split": {"validation_fraction": 0.25}}}}}})
        assert r.status_code == 201, r.text

        # dataset rows: accepted, a duplicate and a rejected line
        ds = c.post("/v1/datasets", json={"name": "prom-upload", "deployment": dep}).json()
        lines = [json.dumps(to_chat(t, cat)) for t, cat in upload] + [json.dumps(to_chat(*upload[0])), '{"bad": 1}']
        r = c.post(f"/v1/datasets/{ds['id']}/records", params={"on_error": "skip"}, content="\n".join(lines) + "\n",
                   headers={"content-type": "application/x-ndjson"})
        assert r.status_code == 201, r.text
        stages["upload"] = r.json()

        # an A/B experiment of the base model against itself: experiment gauges without an adapter
        r = c.post("/v1/experiments", json={"deployment": dep, "variants": [
            {"name": "control", "adapter_id": "production", "weight": 0.5},
            {"name": "same", "adapter_id": None, "weight": 0.5}]})
        assert r.status_code == 201, r.text
        stages["experiment_id"] = r.json()["id"]

        # traffic and feedback in two waves, so counters rise while Prometheus watches
        ids: list[tuple[str, str, str]] = []
        for wave in (traffic[:24], traffic[24:]):
            start = len(ids)
            with ThreadPoolExecutor(2) as pool:
                futures = [pool.submit(_chat, service, dep, text, f"user-{start + i}", segments[(start + i) % 3])
                           for i, (text, _) in enumerate(wave)]
                ids += [(f.result(), segments[(start + i) % 3], wave[i][1]) for i, f in enumerate(futures)]
            bad = c.post("/v1/chat/completions", json={"model": dep, "max_tokens": 10**7,
                                                        "messages": [{"role": "user", "content": "x"}]})
            assert bad.status_code == 400, bad.text  # vLLM rejects it: reason="invalid_request"
            feedback = []
            for i, (cid, seg, intent) in enumerate(ids[start:], start):
                item: dict[str, Any] = {"completion_id": cid, "rating": SEGMENT_RATING[seg] - 0.05 * (i % 3)}
                if i % 4 != 3:
                    item["correction"] = intent
                feedback.append(item)
            r = c.post("/v1/feedback", json=feedback)
            assert r.status_code == 201, r.text
            live.prom.wait_for(f'tuneloop_feedback_rating_count{{deployment="{dep}"}} >= {len(ids)}', 30)
        stages["completions"] = len(ids)

        # the experiment's decision loop exports per-variant ratings on its next tick
        stages["experiment_series"] = len(live.prom.wait_for(
            f'tuneloop_experiment_rating{{deployment="{dep}", stat="mean"}}', 60, n=2))

        # drift, fairness and the retraining trigger (→ a real small SFT job on the corrections)
        r = c.post("/v1/monitoring/run", params={"deployment": dep})
        assert r.status_code == 202, r.text
        q = {"deployment": dep}
        drift_job = r.json()["drift_job"]["id"]
        done = _poll(lambda: c.get(f"/v1/monitoring/drift_jobs/{drift_job}").json(),
                     lambda j: j["status"] in ("succeeded", "failed", "cancelled"), 300)
        events = c.get(f"/v1/monitoring/drift_jobs/{drift_job}/events").json()["data"]
        stages["drift_job"] = {"status": done["status"], "result": done.get("result"),
                               "events": [e["type"] for e in events]}
        stages["drift_runs"] = len(_poll(lambda: c.get("/v1/monitoring/drift", params=q).json()["data"], bool, 300))
        # the worker computed it; the API exports the newest run, and Prometheus scrapes it
        stages["drift_share_series"] = len(live.prom.wait_for(f'tuneloop_drift_share{{deployment="{dep}"}}', 60))
        stages["fairness_runs"] = len(_poll(lambda: c.get("/v1/monitoring/fairness", params=q).json()["data"],
                                            bool, 300))
        trig = _poll(lambda: c.get("/v1/monitoring/triggers", params=q).json()["data"], bool, 300)
        stages["trigger"] = trig[0] if trig else None
        job_id = (stages["trigger"] or {}).get("job_id")
        if not job_id:
            return
        job = _poll(lambda: c.get(f"/v1/fine_tuning/jobs/{job_id}").json(),
                    lambda j: j["status"] in ("succeeded", "failed", "cancelled"), 1200)
        stages["job"] = {k: job.get(k) for k in ("id", "status", "error", "adapter_id")}
        if job["status"] != "succeeded":
            return
        adapter_id = job["adapter_id"]
        # the worker queues the evaluation right after training; if it did not, ask for one (and say so)
        evs = _poll(lambda: c.get(f"/v1/adapters/{adapter_id}/evaluations").json()["data"], bool, 120)
        if not evs:
            r = c.post(f"/v1/adapters/{adapter_id}/evaluations")
            stages["evaluation_not_queued_by_worker"] = f"{r.status_code} {r.text[:300]}"
            evs = [r.json()] if r.status_code == 201 else []
        if evs:
            evs = _poll(lambda: c.get(f"/v1/adapters/{adapter_id}/evaluations").json()["data"],
                        lambda e: e[0]["status"] not in ("queued", "running"), 1200)
        stages["evaluation"] = {k: evs[0].get(k) for k in ("id", "status", "reasons")} if evs else None

        # a promotion and a rollback (deployment-change counters, adapters-loaded gauge)
        adapter = c.get(f"/v1/adapters/{adapter_id}").json()
        r = c.post(f"/v1/deployments/{dep}/promote",
                   json={"adapter_id": adapter_id, "force": adapter.get("status") == "rejected"})
        stages["promote"] = r.status_code
        r = c.post(f"/v1/deployments/{dep}/rollback")
        stages["rollback"] = r.status_code
        live.prom.wait_for(f'tuneloop_deployment_changes_total{{deployment="{dep}", type="rollback"}}', 30)
    finally:
        c.close()


@pytest.fixture(scope="module")
def live(service, banking77_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    prom = start_prometheus(tmp_path_factory.mktemp("prometheus"), httpx.URL(service.url).netloc.decode())
    dep = "prom-" + uuid.uuid4().hex[:8]
    state = Live(prom, dep, time.time())
    try:
        assert prom.wait_for('up{job="tuneloop"} == 1', 60), f"the service is not scraped:\n{prom.log.read_text()}"
        _workload(service, state, banking77_dir)
        # a few more scrapes and rule evaluations after the last event
        end = time.time() + 5
        prom.wait_for(f"timestamp(up{{job=\"tuneloop\"}}) > {end}", 30)
        state.end = time.time()
        yield state
    finally:
        with service.client() as c:
            exp_id = state.stages.get("experiment_id")
            if exp_id:
                c.post(f"/v1/experiments/{exp_id}/stop")
        prom.stop()


def _variables(live: Live) -> dict[str, str]:
    """Resolve each dashboard variable like Grafana: label_values(label) / label_values(selector, label)."""
    values: dict[str, str] = {"deployment": live.deployment}
    for d in _dashboards():
        for v in d["templating"]["list"]:
            m = re.fullmatch(r"label_values\((?:(.+),\s*)?(\w+)\)", v["query"].strip())
            assert m, v["query"]
            selector, label = m.groups()
            params: dict[str, Any] = {"start": live.start, "end": live.end}
            if selector:
                params["match[]"] = selector.replace("$deployment", live.deployment)
            found = live.prom.api(f"/api/v1/label/{label}/values", **params)
            if v["name"] == "deployment":
                assert live.deployment in found, (d["uid"], found)
            else:
                assert found, f"{d['uid']}: variable {v['name']} ({v['query']}) has no values"
                values.setdefault(v["name"], found[0] if "segment" not in found else "segment")
    return values


def _render(expr: str, variables: dict[str, str], range_seconds: int) -> str:
    out = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$__range", f"{range_seconds}s") \
        .replace("$__interval", f"{STEP}s")
    for name, value in variables.items():
        out = out.replace("${" + name + "}", value).replace("$" + name, value)
    assert "$" not in out, f"unresolved variable in {out}"
    return out


def _finite(result: list[dict[str, Any]]) -> bool:
    values = [v for s in result for v in (s.get("values") or [s["value"]])]
    return any(math.isfinite(float(v[1])) for v in values)


@live_test
def test_template_variables_resolve_to_the_test_deployment(live: Live) -> None:
    values = _variables(live)
    assert values["attribute"] == "segment"


@live_test
def test_every_panel_query_returns_a_series(live: Live) -> None:
    variables = _variables(live)
    window = int(live.end - live.start) + 1
    empty, checked = [], 0
    for d in _dashboards():
        for p, t in _targets(d):
            expr = _render(t["expr"], variables, window)
            if t.get("instant"):
                result = live.prom.query(expr, at=live.end)
            else:
                result = live.prom.query_range(expr, live.start, live.end)
            checked += 1
            if not result or not _finite(result):
                empty.append(f"{d['uid']} / {p['title']} [{t['refId']}]: {expr} -> "
                             f"{'no series' if not result else 'only NaN/Inf'}")
        for a in d["annotations"]["list"]:
            if a.get("expr"):
                expr = _render(a["expr"], variables, window)
                checked += 1
                if not live.prom.query_range(expr, live.start, live.end):
                    empty.append(f"{d['uid']} / annotation {a['name']}: {expr} -> no series")
    assert checked >= 50
    assert not empty, (f"{len(empty)} of {checked} panel queries returned nothing "
                       f"(workload stages: {live.stages}):\n" + "\n".join(empty))


@live_test
def test_every_alert_expression_evaluates_against_the_live_metrics(live: Live) -> None:
    for rule in _alert_rules():
        live.prom.query(rule["expr"], at=live.end)  # asserts status success
    dep = live.deployment
    # the vLLM is up: the gauge is there, and the alert expression is empty
    assert [s["value"][1] for s in live.prom.query("tuneloop_vllm_up", at=live.end)] == ["1"]
    rules = {r["alert"]: r["expr"] for r in _alert_rules()}
    assert live.prom.query(rules["TuneloopVLLMDown"], at=live.end) == []
    assert live.prom.query(rules["TuneloopDown"], at=live.end) == []
    # the one API process holds the monitor's leader lock (SQLite: the flock beside the database)
    assert [s["value"][1] for s in live.prom.query("tuneloop_monitor_leader", at=live.end)] == ["1"]
    assert live.prom.query(rules["TuneloopNoDecidingProcess"], at=live.end) == []
    # the segments were rated 0.9 / 0.6 / 0.2: the fairness alert's expression matches this deployment
    gap = [s for s in live.prom.query(rules["TuneloopFairnessGap"], at=live.end)
           if s["metric"].get("deployment") == dep]
    assert [s["metric"]["attribute"] for s in gap] == ["segment"] and float(gap[0]["value"][1]) > 0.5


@live_test
def test_the_real_prometheus_loaded_and_evaluates_the_shipped_rules(live: Live) -> None:
    groups = live.prom.api("/api/v1/rules")["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(loaded) == {r["alert"] for r in _alert_rules()}
    for name, r in loaded.items():
        assert r["health"] == "ok" and not r.get("lastError"), (name, r)
    # the rating gap is real: the alert is pending (its `for` is 30 minutes) for the test deployment
    pending = [a for a in live.prom.api("/api/v1/alerts")["alerts"]
               if a["labels"]["alertname"] == "TuneloopFairnessGap" and a["labels"].get("deployment") == live.deployment]
    assert pending and pending[0]["state"] in ("pending", "firing") and pending[0]["labels"]["severity"] == "warning"


@live_test
def test_the_workload_reached_every_stage(live: Live) -> None:
    s = live.stages
    assert s["upload"]["accepted"] >= 10 and s["upload"]["duplicates"] >= 1 and s["upload"]["rejected"] >= 1, s
    assert s["completions"] == 48 and s["drift_runs"] >= 1 and s["fairness_runs"] >= 1, s
    assert s["drift_share_series"] == 1, s
    assert s["drift_job"]["status"] == "succeeded" and s["drift_job"]["result"]["current_rows"] == 48, s
    assert s["drift_job"]["events"] == ["created", "windows", "computing", "succeeded"], s
    assert s["experiment_series"] == 2, s
    assert s["trigger"] and s["trigger"]["outcome"] == "job_created", s
    assert s["job"]["status"] == "succeeded", s
    assert s["evaluation"] and s["evaluation"]["status"] in ("passed", "failed"), s
    assert s["promote"] == 200 and s["rollback"] == 200, s
