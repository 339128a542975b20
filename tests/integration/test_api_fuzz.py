"""Every operation of the OpenAPI schema the service publishes, fuzzed by schemathesis against a real service:
whatever a client sends, the answer is a 2xx or a 4xx, never a 5xx.

A longer run of the same tool (`schemathesis run --checks not_a_server_error`, 14,000 requests) found a 500: a
pagination cursor beyond the database's integer range; that case has its own test in test_data_api.py. This
test is the short net that runs every time: the coverage phase (boundary values of every parameter) and 20
fuzzed requests per operation, seeded so that a failure reproduces. The service runs as a serving node (no
worker), so requests that queue jobs leave them queued. Request bodies are fuzzed from the schemas that
`service/api/bodies.py` publishes (uploads as NDJSON through `schemathesis_hooks.py`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Service, start_service, stop_service

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory, base_model_dir: str, vllm_supervisor: object) -> Iterator[Service]:
    svc = start_service(tmp_path_factory.mktemp("fuzzed"), base_model_dir,
                        [vllm_supervisor.base_url],  # type: ignore[attr-defined]
                        env={"TUNELOOP_START_WORKER": "false"})
    yield svc
    stop_service(svc)


def test_no_request_is_answered_with_a_server_error(fuzzed: Service, tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", fuzzed.url + "/schema/openapi.json",
           "-H", f"Authorization: Bearer {fuzzed.admin_key}", "--checks", "not_a_server_error",
           "--phases", "coverage,fuzzing", "--max-examples", "20", "--seed", "0", "--workers", "1",
           "--request-timeout", "60", "--generation-database", "none"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.integration.schemathesis_hooks",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    run = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900, cwd=tmp_path,  # its cache
                         env=env)
    tested = re.search(r"Tested: (\d+)", run.stdout)
    assert tested and int(tested.group(1)) >= 40, run.stdout[-3000:]  # the whole API, not an empty schema
    assert run.returncode == 0, run.stdout[-6000:]
