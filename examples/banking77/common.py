"""HTTP helpers shared by `run.py` and `demo.py`.

Everything goes through tuneloop's public HTTP API with httpx (never `import service`), so these
scripts double as a worked example of a client: problem+json errors, streamed NDJSON uploads, job
events, evaluations, promotion, and concurrent inference through the gateway.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
DATA_DIR = REPO_ROOT.parent / "shared" / "datasets" / "banking77"
DEFAULT_URL = "http://127.0.0.1:8000"
TERMINAL_JOB = ("succeeded", "failed", "cancelled")
TERMINAL_EVAL = ("passed", "failed", "error", "cancelled")

if str(HERE) not in sys.path:  # `python examples/banking77/run.py` and `-m examples.banking77.run` both work
    sys.path.insert(0, str(HERE))

from prepare import read_rows, to_chat

__all__ = ["Api", "ApiError", "Prediction", "Query", "classify", "normalize", "read_rows", "to_chat"]


def say(msg: str) -> None:
    """Print a step line that does not tear an active tqdm bar."""
    tqdm.write(msg)


def step(title: str) -> None:
    say(f"\n== {title}")


def normalize(answer: str) -> str:
    """Exact-match normalisation: surrounding whitespace and case don't count."""
    return answer.strip().casefold()


class ApiError(RuntimeError):
    """A non-2xx answer, with the problem+json `detail` and `field` when the service gave them."""

    def __init__(self, method: str, path: str, status: int, body: Any) -> None:
        self.method, self.path, self.status, self.body = method, path, status, body
        detail = body.get("detail") if isinstance(body, dict) else str(body)[:500]
        fld = body.get("field") if isinstance(body, dict) else None
        super().__init__(f"{method} {path} -> {status}: {detail}" + (f" (field: {fld})" if fld else ""))


def _body(resp: httpx.Response) -> Any:
    ctype = resp.headers.get("content-type", "")
    if "json" in ctype:
        try:
            return resp.json()
        except ValueError:
            pass
    return resp.text


class Api:
    """A small synchronous client for the admin/app endpoints the examples use."""

    def __init__(self, url: str, api_key: str, timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.http = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {api_key}"},
                                 timeout=httpx.Timeout(timeout, connect=10.0))

    def close(self) -> None:
        self.http.close()

    # -- plumbing ---------------------------------------------------------------------------------------
    def call(self, method: str, path: str, *, ok: tuple[int, ...] = (200, 201, 202), **kw: Any) -> Any:
        resp = self.http.request(method, path, **kw)
        body = _body(resp)
        if resp.status_code not in ok:
            raise ApiError(method, path, resp.status_code, body)
        return body

    def get(self, path: str, **kw: Any) -> Any:
        return self.call("GET", path, **kw)

    def post(self, path: str, payload: Any = None, **kw: Any) -> Any:
        return self.call("POST", path, json=payload, **kw)

    def patch(self, path: str, payload: Any, **kw: Any) -> Any:
        return self.call("PATCH", path, json=payload, **kw)

    # -- health -----------------------------------------------------------------------------------------
    def healthy(self) -> bool:
        try:
            return self.http.get("/health", timeout=3.0).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = 900.0, is_alive: Callable[[], bool] | None = None) -> float:
        """Poll `/ready` (vLLM starting takes ~1-2 min on a busy CPU); returns the seconds waited."""
        start = time.monotonic()
        last: Any = None
        with tqdm(desc="waiting for /ready", unit="s", bar_format="{desc}: {elapsed} {postfix}") as bar:
            while time.monotonic() - start < timeout:
                if is_alive is not None and not is_alive():
                    raise RuntimeError("the service process exited while starting (see its log)")
                try:
                    resp = self.http.get("/ready", timeout=5.0)
                    last = _body(resp)
                    if resp.status_code == 200:
                        return time.monotonic() - start
                    bar.set_postfix_str(json.dumps(last) if isinstance(last, dict) else str(last)[:80])
                except httpx.HTTPError as exc:
                    bar.set_postfix_str(type(exc).__name__)
                bar.update(0)
                time.sleep(3.0)
        raise TimeoutError(f"{self.url}/ready did not answer 200 within {timeout:.0f} s (last: {last})")

    # -- deployments and datasets ------------------------------------------------------------------------
    def ensure_deployment(self, name: str, config: dict[str, Any] | None = None) -> tuple[dict[str, Any], bool]:
        """Create a deployment with `config`; on 409 reuse the existing one unchanged (PATCH changes a config)."""
        try:
            body: dict[str, Any] = {"name": name}
            if config is not None:
                body["config"] = config
            return self.post("/v1/deployments", body), True
        except ApiError as exc:
            if exc.status != 409:
                raise
            return self.get(f"/v1/deployments/{name}"), False

    def find_dataset(self, deployment: str, name: str) -> dict[str, Any] | None:
        for d in self.get("/v1/datasets", params={"deployment": deployment})["data"]:
            if d["name"] == name:
                return self.get(f"/v1/datasets/{d['id']}")  # with its record count
        return None

    def ensure_dataset(self, deployment: str, name: str) -> dict[str, Any]:
        found = self.find_dataset(deployment, name)
        if found is not None:
            return found
        return self.post("/v1/datasets", {"name": name, "deployment": deployment})

    def upload(self, dataset_id: str, rows: list[dict[str, Any]], desc: str, chunk_rows: int = 256) -> dict[str, Any]:
        """One streamed NDJSON request (chunked transfer); the bar advances as chunks are sent."""
        bar = tqdm(total=len(rows), desc=desc, unit="row")

        def chunks() -> Iterator[bytes]:
            for i in range(0, len(rows), chunk_rows):
                part = rows[i:i + chunk_rows]
                yield "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part).encode()
                bar.update(len(part))

        try:
            return self.call("POST", f"/v1/datasets/{dataset_id}/records", content=chunks(),
                             headers={"Content-Type": "application/x-ndjson"})
        finally:
            bar.close()

    # -- jobs, adapters, evaluations ---------------------------------------------------------------------
    def follow_job(self, job_id: str, desc: str = "training", poll: float = 2.0,
                   base: str = "/v1/fine_tuning/jobs") -> dict[str, Any]:
        """Follow `GET {base}/{id}/events` with a step bar until the job ends."""
        cursor: int | None = None
        bar = tqdm(total=None, desc=desc, unit="step")
        try:
            while True:
                params: dict[str, Any] = {"limit": 1000}
                if cursor is not None:
                    params["after"] = cursor
                events = self.get(f"{base}/{job_id}/events", params=params)["data"]
                for e in events:
                    cursor = e["id"]
                    data = e.get("data") or {}
                    if e["type"] == "step":
                        if data.get("total_steps") and bar.total != data["total_steps"]:
                            bar.total = data["total_steps"]
                        bar.n = int(data.get("step") or bar.n)
                        bar.set_postfix(loss=f"{data.get('loss', float('nan')):.3f}",
                                        tok_s=f"{data.get('tokens_per_second', 0):.0f}")
                        bar.refresh()
                    else:
                        bar.write(f"   [{e['type']}] {e.get('message') or ''}".rstrip())
                job = self.get(f"{base}/{job_id}")
                if job["status"] in TERMINAL_JOB and not events:
                    return job
                time.sleep(poll if not events else 0.2)
        finally:
            bar.close()

    def snapshot(self, dataset_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """Queue a snapshot, follow its curation job (a worker runs it) and return the snapshot."""
        job = self.post(f"/v1/datasets/{dataset_id}/snapshots", body)
        job = self.follow_job(job["id"], desc="curation", poll=1.0, base="/v1/snapshot_jobs")
        if job["status"] != "succeeded":
            raise RuntimeError(f"snapshot job {job['id']} {job['status']}: {job.get('error')}")
        return self.get(f"/v1/snapshots/{job['snapshot_id']}")

    def wait_evaluation(self, adapter_id: str, timeout: float = 7200.0, poll: float = 3.0) -> dict[str, Any]:
        """Wait for the evaluation the worker queues after training; a bar follows its progress events."""
        start = time.monotonic()
        ev: dict[str, Any] | None = None
        while ev is None:
            evs = self.get(f"/v1/adapters/{adapter_id}/evaluations")["data"]
            ev = evs[-1] if evs else None
            if ev is None:
                if time.monotonic() - start > 120:
                    raise TimeoutError(f"no evaluation was queued for {adapter_id}")
                time.sleep(poll)
        bar = tqdm(total=100, desc=f"evaluation {ev['id']}", unit="%")
        cursor: int | None = None
        try:
            while time.monotonic() - start < timeout:
                ev = self.get(f"/v1/evaluations/{ev['id']}")
                params: dict[str, Any] = {"limit": 1000} if cursor is None else {"limit": 1000, "after": cursor}
                for e in self.get(f"/v1/fine_tuning/jobs/{ev['job_id']}/events", params=params)["data"]:
                    cursor = e["id"]
                    data = e.get("data") or {}
                    if "fraction" in data:
                        bar.n = round(100 * float(data["fraction"]))
                        bar.set_postfix_str(str(data.get("phase") or data.get("stage") or "")[:40])
                        bar.refresh()
                if ev["status"] in TERMINAL_EVAL:
                    bar.n = 100
                    bar.refresh()
                    return ev
                time.sleep(poll)
        finally:
            bar.close()
        raise TimeoutError(f"evaluation {ev['id']} did not finish within {timeout:.0f} s")


def eval_summary_lines(ev: dict[str, Any]) -> list[str]:
    """Human-readable lines for an evaluation object (task metrics, gates)."""
    out = [f"evaluation {ev['id']}: {ev['status']} (candidate vs {ev.get('reference')})"]
    task = (ev.get("summary") or {}).get("task") or {}
    for who in ("candidate", "reference"):
        m = task.get(who) or {}
        if m:
            acc = m.get("accuracy")
            out.append(f"  {who:9s}: accuracy {acc:.3f}" if isinstance(acc, int | float) else f"  {who}: {m}")
    ret = (ev.get("summary") or {}).get("retention") or {}
    if ret.get("relative_change") is not None:
        out.append(f"  retention: NLL change {ret['relative_change']:+.1%} vs base")
    out.extend(f"  {r}" for r in ev.get("reasons") or [])
    return out


# --- inference through the gateway ------------------------------------------------------------------------
@dataclass
class Query:
    text: str
    expected: str
    user: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass
class Prediction:
    query: Query
    output: str
    completion_id: str | None
    served_by: str | None
    variant: str | None
    latency: float
    error: str | None = None

    @property
    def correct(self) -> bool:
        return self.error is None and normalize(self.output) == normalize(self.query.expected)


async def _one(client: httpx.AsyncClient, deployment: str, q: Query, max_tokens: int,
               retries: int = 8) -> Prediction:
    body: dict[str, Any] = {"model": deployment, "messages": [{"role": "user", "content": q.text}],
                            "temperature": 0, "max_tokens": max_tokens}
    if q.user:
        body["user"] = q.user
    if q.metadata:
        body["metadata"] = q.metadata
    start = time.perf_counter()
    error = "no attempt"
    for attempt in range(retries):
        try:
            resp = await client.post("/v1/chat/completions", json=body)
        except httpx.TransportError as exc:
            error = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(min(2 ** attempt, 15))
            continue
        if resp.status_code in (429, 503):  # vLLM (re)starting or an adapter swap: retry as told
            error = f"{resp.status_code}: {resp.text[:200]}"
            await asyncio.sleep(float(resp.headers.get("retry-after") or 2) + random.random())
            continue
        if resp.status_code != 200:
            return Prediction(q, "", None, None, None, time.perf_counter() - start,
                              f"{resp.status_code}: {resp.text[:300]}")
        data = resp.json()
        return Prediction(q, (data["choices"][0]["message"].get("content") or ""),
                          resp.headers.get("x-tuneloop-completion-id"), resp.headers.get("x-tuneloop-adapter"),
                          resp.headers.get("x-tuneloop-variant"), time.perf_counter() - start)
    return Prediction(q, "", None, None, None, time.perf_counter() - start, error)


async def _classify(url: str, api_key: str, deployment: str, queries: list[Query], concurrency: int,
                    max_tokens: int, desc: str) -> list[Prediction]:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {api_key}"},
                                 timeout=httpx.Timeout(600.0, connect=10.0), limits=limits) as client:
        bar = tqdm(total=len(queries), desc=desc, unit="req")
        right = 0

        async def guarded(i: int, q: Query) -> tuple[int, Prediction]:
            nonlocal right
            async with sem:
                p = await _one(client, deployment, q, max_tokens)
            right += p.correct
            bar.update(1)
            bar.set_postfix(acc=f"{right / bar.n:.3f}")
            return i, p

        try:
            done = await asyncio.gather(*(guarded(i, q) for i, q in enumerate(queries)))
        finally:
            bar.close()
    out: list[Prediction | None] = [None] * len(queries)
    for i, p in done:
        out[i] = p
    return [p for p in out if p is not None]


def classify(url: str, api_key: str, deployment: str, queries: list[Query], concurrency: int = 16,
             max_tokens: int = 16, desc: str = "gateway") -> list[Prediction]:
    """Send every query through `POST /v1/chat/completions` (temperature 0), `concurrency` at a time."""
    return asyncio.run(_classify(url, api_key, deployment, queries, concurrency, max_tokens, desc))


def accuracy(preds: Iterable[Prediction]) -> float:
    preds = list(preds)
    return sum(p.correct for p in preds) / len(preds) if preds else 0.0


def served_counts(preds: Iterable[Prediction]) -> dict[str, int]:
    out: dict[str, int] = {}
    for p in preds:
        key = p.served_by or ("error" if p.error else "?")
        out[key] = out.get(key, 0) + 1
    return out


def default_api_key(cli_value: str | None) -> str:
    key = cli_value or os.environ.get("TUNELOOP_ADMIN_KEY") or ""
    return key


def sample(rows: list[tuple[str, str]], limit: int | None, seed: int) -> list[tuple[str, str]]:
    """A seeded sample kept in file order (the same rule as `prepare.prepare`)."""
    if limit is None or limit >= len(rows):
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]
