"""`tuneloop jobs watch ID`: follow a fine-tuning, snapshot, drift or erasure job's events with a progress bar (tqdm)."""

from __future__ import annotations

import time

import httpx
from tqdm import tqdm

TERMINAL = ("succeeded", "failed", "cancelled")
BASES = {"snapjob": "/v1/snapshot_jobs", "driftjob": "/v1/monitoring/drift_jobs", "erasejob": "/v1/erasure_jobs"}


def watch_job(url: str, job_id: str, api_key: str, poll_seconds: float = 2.0) -> int:
    """Print events as they come, drive a bar from `step` events; exit 0 if the job succeeded."""
    headers = {"Authorization": f"Bearer {api_key}"}
    bar: tqdm | None = None
    cursor: int | None = None
    base = BASES.get(job_id.split("-")[0], "/v1/fine_tuning/jobs")
    with httpx.Client(base_url=url, headers=headers, timeout=30) as c:
        while True:
            r = c.get(f"{base}/{job_id}/events", params={"after": cursor} if cursor else {})
            if r.status_code != 200:
                print(f"error: {r.status_code} {r.text}")
                return 2
            for e in r.json()["data"]:
                cursor = e["id"]
                data = e.get("data") or {}
                if e["type"] == "step" and data.get("total_steps"):
                    if bar is None:
                        bar = tqdm(total=int(data["total_steps"]), desc=job_id, unit="step")
                    bar.n = int(data["step"])
                    bar.set_postfix(loss=f"{data.get('loss', 0):.4f}", tok_s=f"{data.get('tokens_per_second', 0):.0f}")
                    bar.refresh()
                elif e["type"] != "progress":
                    (bar.write if bar else print)(f"[{e['type']}] {e['message']}")
            job = c.get(f"{base}/{job_id}").json()
            if job["status"] in TERMINAL:
                if bar:
                    bar.close()
                made = f"adapter {job['adapter_id']}" if job.get("adapter_id") else job.get("snapshot_id")
                print(f"job {job_id} {job['status']}" + (f": {made}" if made else "")
                      + (f" ({job['error']['message']})" if job.get("error") else ""))
                return 0 if job["status"] == "succeeded" else 1
            time.sleep(poll_seconds)
