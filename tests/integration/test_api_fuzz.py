"""Every operation of the OpenAPI schema the service publishes, fuzzed by schemathesis against a real service:
whatever a client sends, the answer is a 2xx or a 4xx, never a 5xx, and its body and media type are the ones the
document gives for that status (`service/api/responses.py`; problem+json for every error).

Longer runs of the same tool found 500s, each now with its own test: a pagination cursor beyond the database's
integer range (test_data_api.py); once request bodies were in the schema, a variant whose adapter_id was an
object (test_experiments_api.py); and on PostgreSQL, a NUL character in a parameter or body (below). This test
is the short net that runs every time, on SQLite and on PostgreSQL: the examples and coverage phases (schema
examples, boundary values of every parameter and body field) and 20 fuzzed requests per operation, seeded so
that a failure reproduces. The service runs as a serving node (no worker), so requests that queue jobs leave
them queued. Bodies come from the schemas `service/api/bodies.py` publishes (uploads as NDJSON through
`schemathesis_hooks.py`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PG_URL, Service, _reset_pg, start_service, stop_service

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def fuzzed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, base_model_dir: str,
           vllm_supervisor: object) -> Iterator[Service]:
    """PostgreSQL too: it refuses what SQLite stores (a NUL character in text was a 500 there)."""
    if request.param == "postgresql":
        _reset_pg()
    svc = start_service(tmp_path_factory.mktemp("fuzzed"), base_model_dir,
                        [vllm_supervisor.base_url],  # type: ignore[attr-defined]
                        database_url=PG_URL if request.param == "postgresql" else None,
                        env={"TUNELOOP_START_WORKER": "false"})
    yield svc
    stop_service(svc)


def test_no_request_is_answered_with_a_server_error(fuzzed: Service, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", fuzzed.url + "/schema/openapi.json",
           "-H", f"Authorization: Bearer {fuzzed.admin_key}", "--checks",
           "not_a_server_error,response_schema_conformance,content_type_conformance",
           "--phases", "examples,coverage,fuzzing", "--max-examples", "20", "--seed", "0", "--workers", "1",
           "--request-timeout", "60", "--generation-database", "none"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.integration.schemathesis_hooks",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900, cwd=tmp_path,  # its cache
                         env=env)
    tested = re.search(r"Tested: (\d+)", run.stdout)
    assert tested and int(tested.group(1)) >= 40, run.stdout[-3000:]  # the whole API, not an empty schema
    assert run.returncode == 0, run.stdout[-6000:]


@pytest.mark.parametrize(("method", "path", "body", "field"), [
    ("POST", "/v1/api-keys", {"name": "a\x00b", "scope": "app"}, "name"),
    ("POST", "/v1/chat/completions", {"model": "default", "messages": [{"role": "user", "content": "hi\x00"}]},
     "messages[0].content"),
    ("GET", "/v1/datasets?deployment=a%00b", None, "deployment"),
    ("POST", "/v1/monitoring/run?deployment=%00", None, "deployment")])
def test_a_nul_character_is_a_422_naming_the_field(fuzzed: Service, method: str, path: str, body: object,
                                                   field: str) -> None:
    """Three of the 500s schemathesis found on PostgreSQL, which cannot store U+0000 in text."""
    with fuzzed.client() as c:
        r = c.request(method, path, json=body)
    assert r.status_code == 422 and r.json()["field"] == field, r.text
