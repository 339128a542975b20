"""SIGKILL the service while clients write: every acknowledged write (feedback, completion) survives, no half upload
is visible."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.conftest import start_service, stop_service

pytestmark = pytest.mark.vllm


def test_acknowledged_feedback_survives_sigkill_and_partial_upload_is_invisible(
        tmp_path, base_model_dir, vllm_supervisor) -> None:
    data_dir = tmp_path / "crash"
    svc = start_service(data_dir, base_model_dir, [vllm_supervisor.base_url])
    with svc.client() as c:
        cids = [c.post("/v1/chat/completions", json={"model": "default", "max_tokens": 2,
                                                      "messages": [{"role": "user", "content": f"q{i}"}]}).json()["id"]
                for i in range(3)]
        ds = c.post("/v1/datasets", json={"name": "crash", "deployment": "default"}).json()

    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def poster(worker: int) -> None:
        with httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {svc.admin_key}"}, timeout=10) as cl:
            for n in range(100_000):
                if stop.is_set():
                    return
                fid = f"crash-{worker}-{n}"
                try:
                    r = cl.post("/v1/feedback", json={"id": fid, "completion_id": cids[n % 3], "rating": 0.5})
                except httpx.TransportError:
                    return
                if r.status_code == 201:
                    with lock:
                        acked.append(fid)

    acked_completions: list[str] = []

    def chatter() -> None:  # completions are committed to the log before their response, too
        with httpx.Client(base_url=svc.url, headers={"Authorization": f"Bearer {svc.admin_key}"}, timeout=30) as cl:
            for n in range(100_000):
                if stop.is_set():
                    return
                try:
                    r = cl.post("/v1/chat/completions", json={"model": "default", "max_tokens": 1,
                                                               "messages": [{"role": "user", "content": f"c{n}"}]})
                except httpx.TransportError:
                    return
                if r.status_code == 200:
                    with lock:
                        acked_completions.append(r.json()["id"])

    upload_started = threading.Event()

    def slow_upload() -> None:
        def body():
            row = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
            for i in range(100_000):
                row["messages"][0]["content"] = f"question {i}"
                yield (json.dumps(row) + "\n").encode() * 50
                upload_started.set()
                time.sleep(0.01)
        try:
            httpx.post(f"{svc.url}/v1/datasets/{ds['id']}/records", content=body(), timeout=60,
                       headers={"Authorization": f"Bearer {svc.admin_key}", "content-type": "application/x-ndjson"})
        except httpx.HTTPError:
            pass

    threads = [threading.Thread(target=poster, args=(w,)) for w in range(4)] + [threading.Thread(target=slow_upload),
                                                                                threading.Thread(target=chatter)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while ((len(acked) < 200 or not upload_started.is_set() or len(acked_completions) < 3)
           and time.monotonic() < deadline):
        time.sleep(0.05)
    time.sleep(1.0)  # let the upload write some batches
    svc.proc.send_signal(signal.SIGKILL)
    svc.proc.wait()
    stop.set()
    for t in threads:
        t.join(30)
    assert len(acked) >= 200 and len(acked_completions) >= 3

    svc2 = start_service(data_dir, base_model_dir, [vllm_supervisor.base_url])
    try:
        with svc2.client() as c:
            stored: set[str] = set()
            cursor = None
            while True:
                page = c.get("/v1/feedback", params={"limit": 1000, **({"cursor": cursor} if cursor else {})}).json()
                stored |= {f["client_id"] for f in page["data"]}
                cursor = page["next_cursor"]
                if not page["has_more"]:
                    break
            missing = set(acked) - stored
            assert not missing, f"{len(missing)} acknowledged feedback items lost"
            assert c.get(f"/v1/datasets/{ds['id']}").json()["records"] == 0  # the half upload is not visible
            lost = [cid for cid in cids + acked_completions if c.get(f"/v1/completions/{cid}").status_code != 200]
            assert not lost, f"{len(lost)} acknowledged completions lost"
    finally:
        stop_service(svc2)
