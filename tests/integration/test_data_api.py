"""Feedback and dataset ingestion through the real service (real SQLite, real vLLM for the completions)."""

from __future__ import annotations

import json
import random
import sqlite3
import time
import uuid

import pytest

from examples.banking77.prepare import read_rows, to_chat
from service.watch import watch_job
from tests.conftest import make_snapshot

CHAT = {"model": "default", "messages": [{"role": "user", "content": "Where is my card?"}], "max_tokens": 4}


def _completion(c, **extra) -> str:
    r = c.post("/v1/chat/completions", json={**CHAT, **extra})
    assert r.status_code == 200, r.text
    return r.json()["id"]


def _ndjson(rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


@pytest.fixture(scope="module")
def banking_rows(banking77_dir):
    rows = read_rows(banking77_dir / "train.csv")
    random.Random(7).shuffle(rows)
    return [to_chat(t, c) for t, c in rows[:400]]


def test_feedback_is_stored_once_per_client_id(service) -> None:
    with service.client() as c:
        cid = _completion(c, user="u1", metadata={"segment": "retail"})
        body = {"completion_id": cid, "rating": 0.9, "comment": "good", "id": "fb-once-1"}
        first = c.post("/v1/feedback", json=body)
        assert first.status_code == 201, first.text
        again = c.post("/v1/feedback", json=body)
        assert again.status_code == 201 and again.json()["ids"] == first.json()["ids"]
        hdr = c.post("/v1/feedback", json={"completion_id": cid, "rating": 0.1}, headers={"Idempotency-Key": "k-77"})
        hdr2 = c.post("/v1/feedback", json={"completion_id": cid, "rating": 0.1}, headers={"Idempotency-Key": "k-77"})
        assert hdr.json()["ids"] == hdr2.json()["ids"]
        listed = c.get("/v1/feedback", params={"deployment": "default", "limit": 1000}).json()["data"]
    mine = [f for f in listed if f["completion_id"] == cid]
    assert len(mine) == 2
    stored = next(f for f in mine if f["client_id"] == "fb-once-1")
    assert stored["attributes"] == {"segment": "retail"}  # the completion's attributes travel with it


def test_feedback_validation_stores_nothing_from_a_bad_batch(service) -> None:
    with service.client() as c:
        cid = _completion(c)
        before = len(c.get("/v1/feedback", params={"limit": 1000}).json()["data"])
        r = c.post("/v1/feedback", json=[{"completion_id": cid, "rating": 0.5},
                                          {"completion_id": "chatcmpl-nope", "rating": 1},
                                          {"completion_id": cid, "rating": 3},
                                          {"completion_id": cid}])
        assert r.status_code == 422
        problem = r.json()
        assert problem["field"] == "[2].rating"
        assert {e["index"] for e in problem["errors"]} == {2, 3}
        r = c.post("/v1/feedback", json=[{"completion_id": cid, "rating": 0.5},
                                          {"completion_id": "chatcmpl-nope", "rating": 1}])
        assert r.status_code == 422 and r.json()["errors"][0]["index"] == 1
        assert c.post("/v1/feedback", json={"completion_id": "chatcmpl-nope", "rating": 1}).status_code == 404
        assert c.post("/v1/feedback", json=[{}] * 1001).status_code == 422
        after = len(c.get("/v1/feedback", params={"limit": 1000}).json()["data"])
    assert after == before


def test_old_completions_and_monitor_runs_are_pruned(service) -> None:
    """The default retentions at work in the running service: the monitor prunes an old completion beyond the
    deployment's first traffic window (the drift reference), and old fairness runs but the newest; a completion
    about to go takes no feedback."""
    now = time.time()
    with service.client() as c:
        assert c.post("/v1/deployments", json={"name": "retained"}).status_code == 201
        served = c.get(f"/v1/completions/{_completion(c, model='retained')}").json()
        db = sqlite3.connect(service.data_dir / "tuneloop.db", timeout=30)
        (row,) = db.execute("SELECT * FROM completions WHERE id = ?", (served["id"],)).fetchall()
        columns = [d[0] for d in db.execute("SELECT * FROM completions LIMIT 0").description]
        at = columns.index("created_at")

        def aged(created_at: float) -> str:  # the served completion as if it had come long ago
            copy = list(row)
            copy[0], copy[at] = f"chatcmpl-aged-{uuid.uuid4().hex}", created_at
            db.execute(f"INSERT INTO completions VALUES ({', '.join('?' * len(copy))})", copy)
            return copy[0]

        first_window = [aged(now - 60 * 86400 + i) for i in range(500)]  # 500: the service's drift window
        prunable = aged(now - 31 * 86400)
        closing = aged(now - 30 * 86400 + 1800)  # kept half an hour more, closed for feedback
        for days in (100, 99):  # fairness runs older than the monitor history (90 days): the newer one stays
            db.execute("INSERT INTO monitor_runs (deployment, kind, data, created_at) VALUES (?, ?, ?, ?)",
                       ("retained", "fairness", json.dumps({"attributes": {}, "rows": days}), now - days * 86400))
        db.commit()
        db.close()
        r = c.post("/v1/feedback", json={"completion_id": closing, "rating": 1})
        assert r.status_code == 410 and r.json()["field"] == "completion_id", r.text
        assert "TUNELOOP_COMPLETION_RETENTION_DAYS" in r.json()["detail"]
        deadline = time.monotonic() + 180  # a monitor pass runs every TUNELOOP_MONITOR_INTERVAL_SECONDS (60)
        def fairness_rows() -> list[int]:
            return [r["rows"] for r in c.get("/v1/monitoring/fairness", params={"deployment": "retained"}).json()["data"]]

        while c.get(f"/v1/completions/{prunable}").status_code != 404 or fairness_rows() != [99]:
            assert time.monotonic() < deadline, "the old completion or fairness run was not pruned"
            time.sleep(2)
        kept = (closing, first_window[0], first_window[-1], served["id"])
        assert all(c.get(f"/v1/completions/{i}").status_code == 200 for i in kept)
        assert c.post("/v1/feedback", json={"completion_id": prunable, "rating": 1}).status_code == 404
        scraped = c.get("/metrics").text
    assert 'tuneloop_completions_pruned_total{deployment="retained"} 1.0' in scraped


def test_one_users_data_is_erased_by_a_job(service, capsys) -> None:
    """`POST /v1/erasure_jobs` through the running service and its worker: the user's completions and feedback go,
    everyone else's stay; feedback on an erased completion, which the API process still remembers, is a 404."""
    with service.client() as c:
        assert c.post("/v1/deployments", json={"name": "erasing"}).status_code == 201
        theirs = [_completion(c, model="erasing", user="user-to-forget") for _ in range(3)]
        others = [_completion(c, model="erasing", user="user-to-keep"), _completion(c, model="erasing")]
        assert c.post("/v1/feedback", json=[{"completion_id": i, "rating": 1} for i in theirs[:2] + others[:1]]
                      ).status_code == 201
        for body, status, field in (({"deployment": "erasing"}, 422, "user"),
                                    ({"deployment": "erasing", "user": ""}, 422, "user"),
                                    ({"deployment": "erasing", "user": "u", "all": True}, 422, "all"),
                                    ({"deployment": "nope", "user": "u"}, 404, "deployment")):
            r = c.post("/v1/erasure_jobs", json=body)
            assert r.status_code == status and r.json()["field"] == field, r.text
        r = c.post("/v1/erasure_jobs", json={"deployment": "erasing", "user": "user-to-forget"})
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["object"] == "erasure.job" and job["user"] == "user-to-forget"
        assert watch_job(service.url, job["id"], service.admin_key, poll_seconds=0.5) == 0  # `tuneloop jobs watch`
        assert "[succeeded] deleted 3 completions and 2 feedback" in capsys.readouterr().out
        job = c.get(f"/v1/erasure_jobs/{job['id']}").json()
        assert job["status"] == "succeeded"
        assert job["result"] == {"completions": 3, "feedback": 2, "snapshots": [], "adapters": []}
        assert all(c.get(f"/v1/completions/{i}").status_code == 404 for i in theirs)
        assert all(c.get(f"/v1/completions/{i}").status_code == 200 for i in others)
        r = c.post("/v1/feedback", json={"completion_id": theirs[2], "rating": 1})
        assert r.status_code == 404 and r.json()["field"] == "completion_id", r.text
        assert c.post(f"/v1/erasure_jobs/{job['id']}/cancel").status_code == 409  # it has finished
        listed = c.get("/v1/erasure_jobs", params={"deployment": "erasing"}).json()
        assert [j["id"] for j in listed["data"]] == [job["id"]] and not listed["has_more"]
        feedback = c.get("/v1/feedback", params={"deployment": "erasing"}).json()["data"]
    assert [f["completion_id"] for f in feedback] == others[:1]


def test_feedback_pagination(service) -> None:
    with service.client() as c:
        cid = _completion(c)
        r = c.post("/v1/feedback", json=[{"completion_id": cid, "rating": i / 10} for i in range(7)])
        assert r.status_code == 201 and len(r.json()["ids"]) == 7
        seen, cursor = [], None
        while True:
            page = c.get("/v1/feedback", params={"limit": 3, **({"cursor": cursor} if cursor else {})}).json()
            seen += [f["id"] for f in page["data"]]
            cursor = page["next_cursor"]
            if not page["has_more"]:
                break
    assert seen == sorted(seen) and set(r.json()["ids"]) <= set(seen)
    with service.client() as c:
        r = c.get("/v1/feedback", params={"cursor": -(10**22)})  # found by schemathesis: was a 500 (overflow)
    assert r.status_code == 422 and r.json()["field"] == "cursor"
    assert r.headers["content-type"].startswith("application/problem+json")


def test_upload_reject_skip_duplicates_and_errors(service, banking_rows) -> None:
    with service.client() as c:
        ds = c.post("/v1/datasets", json={"name": "b77", "deployment": "default"}).json()
        url = f"/v1/datasets/{ds['id']}/records"
        good = _ndjson(banking_rows[:50])
        bad = good + b'{"messages": [{"role": "user", "content": "x"}]}\nnot json\n' + _ndjson(banking_rows[50:60])
        r = c.post(url, content=bad, headers={"content-type": "application/x-ndjson"})
        assert r.status_code == 422
        assert [e["line"] for e in r.json()["errors"]] == [51, 52]
        assert c.get(f"/v1/datasets/{ds['id']}").json()["records"] == 0  # nothing stored
        r = c.post(url, params={"on_error": "skip"}, content=bad, headers={"content-type": "application/x-ndjson"})
        assert r.status_code == 201
        assert (r.json()["accepted"], r.json()["rejected"], r.json()["duplicates"]) == (60, 2, 0)
        r = c.post(url, content=_ndjson(banking_rows[55:70]), headers={"content-type": "application/x-ndjson"})
        assert (r.json()["accepted"], r.json()["duplicates"]) == (10, 5)
        assert c.get(f"/v1/datasets/{ds['id']}").json()["records"] == 70
        assert c.post(url, content=good, headers={"content-type": "text/csv"}).status_code == 415
        assert c.post(url, content=good, headers={"content-type": "application/x-ndjson; charset=latin-1"}).status_code == 415
        assert c.post("/v1/datasets/ds-missing/records", content=good,
                      headers={"content-type": "application/x-ndjson"}).status_code == 404
        assert c.post("/v1/datasets", json={"name": "x", "deployment": "missing"}).status_code == 404


def test_snapshot_curates_and_reports(service, banking_rows) -> None:
    rows = list(banking_rows[:300])
    rows += rows[:5]  # exact duplicates
    long_q = ("I ordered a new card three weeks ago and it still has not arrived at my home address, "
              "what should I do about it now please")
    rows.append({"messages": [{"role": "user", "content": long_q}, {"role": "assistant", "content": "card_arrival"}]})
    rows.append({"messages": [{"role": "user", "content": long_q.replace("please", "thanks")},
                              {"role": "assistant", "content": "card_arrival"}]})  # near duplicate
    with service.client() as c:
        ds = c.post("/v1/datasets", json={"name": "snap", "deployment": "default"}).json()
        r = c.post(f"/v1/datasets/{ds['id']}/records", params={"on_error": "skip"}, content=_ndjson(rows),
                   headers={"content-type": "application/x-ndjson"})
        assert r.json()["duplicates"] == 5
        curation = {"near_dedupe": {"threshold": 0.8}, "split": {"validation_fraction": 0.1}, "seed": 3}
        queued = c.post(f"/v1/datasets/{ds['id']}/snapshots", json={"curation": curation})
        assert queued.status_code == 202 and queued.json()["snapshot_id"] is None  # curation is a worker's job
        s = make_snapshot(c, ds["id"], {"curation": curation})
        assert s["counts"]["train"] + s["counts"]["validation"] <= 301
        assert s["counts"]["validation"] >= 25
        first = _wait_snapshot_job(c, queued.json()["id"])
        assert first["snapshot_id"] == s["id"]  # content-addressed: the same request, the same snapshot
        events = c.get(f"/v1/snapshot_jobs/{first['id']}/events").json()["data"]
        steps = [e["data"]["step"] for e in events if e["type"] == "curation" and "step" in e["data"]]
        assert steps == ["normalize", "length_filter", "exact_dedupe", "near_dedupe", "conflicts",
                         "label_balance", "group_balance", "split"]
        assert [e["type"] for e in events][-2:] == ["snapshot", "succeeded"]
        for i, has_more in ((-3, True), (-2, False)):  # a page of one event after the i-th
            page = c.get(f"/v1/snapshot_jobs/{first['id']}/events", params={"after": events[i]["id"], "limit": 1})
            assert [e["id"] for e in page.json()["data"]] == [events[i + 1]["id"]]
            assert page.json()["has_more"] is has_more
        r = c.get(f"/v1/snapshot_jobs/{first['id']}/events", params={"after": 2**70})  # no row id is this large
        assert r.status_code == 422 and r.json()["field"] == "after"
        report = c.get(f"/v1/snapshots/{s['id']}/report").json()
        steps = {st["name"]: st for st in report["steps"]}
        assert steps["near_dedupe"]["removed"] >= 1
        html = c.get(f"/v1/snapshots/{s['id']}/report", headers={"accept": "text/html"})
        assert html.headers["content-type"].startswith("text/html") and "<html" in html.text.lower()
        bad = c.post(f"/v1/datasets/{ds['id']}/snapshots", json={"curation": {"near_dedupe": {"bogus": 1}}})
        assert bad.status_code == 422 and bad.json()["field"] == "curation" and "bogus" in bad.json()["detail"]
        empty = c.post("/v1/datasets", json={"name": "empty", "deployment": "default"}).json()
        r = c.post(f"/v1/datasets/{empty['id']}/snapshots", json={})
        assert r.status_code == 422 and r.json()["field"] == "datasets"  # nothing to curate: no job at all



def test_a_snapshot_nothing_uses_can_be_deleted_and_curated_again(service, banking_rows) -> None:
    with service.client() as c:
        ds = c.post("/v1/datasets", json={"name": "deleting", "deployment": "default"}).json()
        c.post(f"/v1/datasets/{ds['id']}/records", content=_ndjson(banking_rows[:60]),
               headers={"content-type": "application/x-ndjson"})
        body = {"curation": {"seed": 21, "label_balance": {"enabled": False}}}
        snap = make_snapshot(c, ds["id"], body)
        assert snap["deleted_at"] is None
        assert c.delete("/v1/snapshots/snap-nope").status_code == 404

        job = c.post("/v1/fine_tuning/jobs", json={"deployment": "default", "snapshot_id": snap["id"],
                                                   "method": {"type": "sft", "hyperparameters": {"max_steps": 1}}})
        assert job.status_code == 201, job.text
        r = c.delete(f"/v1/snapshots/{snap['id']}")  # queued or running: in use either way
        assert r.status_code == 409 and r.json()["field"] == "snapshot_id", r.text
        assert job.json()["id"] in r.json()["detail"]
        c.post(f"/v1/fine_tuning/jobs/{job.json()['id']}/cancel")
        deadline = time.monotonic() + 300
        while c.get(f"/v1/fine_tuning/jobs/{job.json()['id']}").json()["status"] in ("queued", "running"):
            assert time.monotonic() < deadline
            time.sleep(0.3)

        r = c.delete(f"/v1/snapshots/{snap['id']}")
        assert r.status_code == 200, r.text
        deleted = r.json()
        assert deleted["deleted_at"] >= int(time.time()) - 60 and deleted["deleted_reason"] == "deleted via API"
        assert c.delete(f"/v1/snapshots/{snap['id']}").json() == deleted  # idempotent
        assert c.get(f"/v1/snapshots/{snap['id']}").json()["deleted_at"] == deleted["deleted_at"]
        assert c.get(f"/v1/snapshots/{snap['id']}/report").json()["steps"]  # the JSON report stays
        html = c.get(f"/v1/snapshots/{snap['id']}/report", headers={"accept": "text/html"})
        assert html.status_code == 410 and html.headers["content-type"].startswith("application/problem+json")
        r = c.post("/v1/fine_tuning/jobs", json={"deployment": "default", "snapshot_id": snap["id"]})
        assert r.status_code == 409 and r.json()["field"] == "snapshot_id" and "deleted" in r.json()["detail"]
        metrics = c.get("/metrics").text
        assert 'tuneloop_snapshots_deleted_total{deployment="default",kind="api"} 1.0' in metrics

        again = make_snapshot(c, ds["id"], body)  # the same content curated again: the same snapshot, restored
        assert again["id"] == snap["id"] and again["deleted_at"] is None
        html = c.get(f"/v1/snapshots/{snap['id']}/report", headers={"accept": "text/html"})
        assert html.status_code == 200 and "<html" in html.text.lower()


def test_a_dataset_can_be_deleted_once_no_deployment_evaluates_on_it(service, banking_rows) -> None:
    with service.client() as c:
        assert c.post("/v1/deployments", json={"name": "dataset-deleting"}).status_code == 201
        ds = c.post("/v1/datasets", json={"name": "to delete", "deployment": "dataset-deleting"}).json()
        c.post(f"/v1/datasets/{ds['id']}/records", content=_ndjson(banking_rows[:30]),
               headers={"content-type": "application/x-ndjson"})
        assert c.patch("/v1/deployments/dataset-deleting", json={"config": {"eval_dataset_id": ds["id"]}}).is_success
        r = c.delete(f"/v1/datasets/{ds['id']}")
        assert r.status_code == 409 and r.json()["field"] == "dataset_id" and "eval_dataset_id" in r.json()["detail"]
        assert c.get(f"/v1/datasets/{ds['id']}").json()["records"] == 30

        assert c.patch("/v1/deployments/dataset-deleting", json={"config": {"eval_dataset_id": None}}).is_success
        r = c.delete(f"/v1/datasets/{ds['id']}")
        assert r.status_code == 200 and r.json()["deleted_at"] >= int(time.time()) - 60, r.text
        shown = c.get(f"/v1/datasets/{ds['id']}").json()
        assert shown["records"] == 0 and shown["deleted_at"] == r.json()["deleted_at"]
        assert c.delete(f"/v1/datasets/{ds['id']}").status_code == 200  # idempotent
        assert c.delete("/v1/datasets/ds-nope").status_code == 404
        r = c.post(f"/v1/datasets/{ds['id']}/records", content=_ndjson(banking_rows[:2]),
                   headers={"content-type": "application/x-ndjson"})
        assert r.status_code == 409 and r.json()["field"] == "dataset_id", r.text
        r = c.post(f"/v1/datasets/{ds['id']}/snapshots", json={})
        assert r.status_code == 409 and r.json()["field"] == "datasets", r.text
        r = c.patch("/v1/deployments/dataset-deleting", json={"config": {"eval_dataset_id": ds["id"]}})
        assert r.status_code == 409 and r.json()["field"] == "config.eval_dataset_id", r.text

def _wait_snapshot_job(c, job_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while (job := c.get(f"/v1/snapshot_jobs/{job_id}").json())["status"] in ("queued", "running"):
        assert time.monotonic() < deadline, job
        time.sleep(0.3)
    return job


def test_a_running_snapshot_job_can_be_cancelled(service, banking77_dir) -> None:
    # 30,009 rows (train.csv three times, reworded): several seconds of curation, mostly near-dedupe
    rows = [to_chat(f"{t} {suffix}", c) for suffix in ("", "please", "thanks")
            for t, c in read_rows(banking77_dir / "train.csv")]
    with service.client() as c:
        ds = c.post("/v1/datasets", json={"name": "cancel-me", "deployment": "default"}).json()
        assert c.post(f"/v1/datasets/{ds['id']}/records", content=_ndjson(rows),
                      headers={"content-type": "application/x-ndjson"}).status_code == 201
        job = c.post(f"/v1/datasets/{ds['id']}/snapshots", json={"curation": {"seed": 11}}).json()
        deadline = time.monotonic() + 120
        while c.get(f"/v1/snapshot_jobs/{job['id']}").json()["status"] == "queued":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert c.post(f"/v1/snapshot_jobs/{job['id']}/cancel").status_code == 200
        done = _wait_snapshot_job(c, job["id"])
        events = c.get(f"/v1/snapshot_jobs/{job['id']}/events").json()["data"]
        assert c.post(f"/v1/snapshot_jobs/{job['id']}/cancel").status_code == 409  # already over
    assert done["status"] == "cancelled" and done["snapshot_id"] is None, (done, events)
    assert events[-1]["type"] == "cancelled"
    assert not any(e["type"] == "snapshot" for e in events)  # stopped between steps: nothing was written


def test_feedback_becomes_training_rows(service) -> None:
    with service.client() as c:
        c.post("/v1/deployments", json={"name": "fbrows"})
        # same prompt, different outputs (1 vs 6 greedy tokens): the two ratings form a preference pair
        ids = [_completion(c, model="fbrows", temperature=0, max_tokens=n) for n in (3, 1, 6)]
        r = c.post("/v1/feedback", json=[{"completion_id": ids[0], "correction": "card_arrival"},
                                          {"completion_id": ids[1], "rating": 1.0},
                                          {"completion_id": ids[2], "rating": 0.0}])
        assert r.status_code == 201
        ds = c.post("/v1/datasets", json={"name": "fb-only", "deployment": "fbrows"}).json()
        s = make_snapshot(c, ds["id"], {"include_feedback": True, "curation": {"split": {"validation_fraction": 0.0}}})
        # asked for: the answer rated 1.0 is taught as it was given (the one rated 0.0 is not)
        s2 = make_snapshot(c, ds["id"], {"include_feedback": True, "curation": {
            "split": {"validation_fraction": 0.0}, "feedback": {"sft_min_rating": 1.0}}})
    assert s["feedback_range"] == [min(r.json()["ids"]), max(r.json()["ids"])]

    def rows(snap: dict) -> list[dict]:
        with open(f"{service.data_dir}/snapshots/{snap['id']}/train.jsonl") as f:
            return [json.loads(line) for line in f]

    # correction → sft, a desirable unpaired row and a preference pair over the answer it corrects;
    # two ratings → two unpaired rows + one preference pair (same prompt, different ratings)
    assert sorted(r["kind"] for r in rows(s)) == ["preference", "preference", "sft", "unpaired", "unpaired", "unpaired"]
    prefs = [(r["chosen"], r["rejected"]) for r in rows(s) if r["kind"] == "preference"]
    assert prefs[0][0] == "card_arrival" and prefs[0][1] != "card_arrival"  # the correction over the answer
    liked = next(r["completion"] for r in rows(s) if r["kind"] == "unpaired" and r["label"]
                 and r["completion"] != "card_arrival")
    assert s2["id"] != s["id"]
    assert sorted(r["completion"] for r in rows(s2) if r["kind"] == "sft") == sorted(["card_arrival", liked])
