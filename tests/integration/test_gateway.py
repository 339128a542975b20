"""The OpenAI-compatible gateway against a real `tuneloop serve` and a real vLLM (SmolLM2)."""

from __future__ import annotations

import json

import httpx
import pytest
from openai import NotFoundError, OpenAI

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def oai(service) -> OpenAI:
    return OpenAI(base_url=service.url + "/v1", api_key=service.admin_key, max_retries=0)


def test_chat_completion_is_answered_by_smollm2_and_logged(service, oai: OpenAI) -> None:
    raw = oai.chat.completions.with_raw_response.create(
        model="default", messages=[{"role": "user", "content": "Say hello."}], max_tokens=12, temperature=0,
        user="customer-42", metadata={"segment": "retail"})
    resp = raw.parse()
    assert raw.headers["x-tuneloop-adapter"] == "base"
    assert resp.model == "default"
    text = resp.choices[0].message.content
    assert text and text.strip()
    assert resp.usage.completion_tokens > 0

    with service.client() as c:
        logged = c.get(f"/v1/completions/{resp.id}").json()
    assert logged["id"] == resp.id
    assert logged["deployment"] == "default" and logged["adapter"] == "base"
    assert logged["user"] == "customer-42" and logged["metadata"] == {"segment": "retail"}
    assert logged["messages"] == [{"role": "user", "content": "Say hello."}]
    assert logged["output"] == text
    assert logged["finish_reason"] == resp.choices[0].finish_reason
    assert logged["usage"]["completion_tokens"] == resp.usage.completion_tokens
    assert logged["latency_seconds"] > 0


def test_streaming_chat_is_logged_with_the_streamed_text(service, oai: OpenAI) -> None:
    stream = oai.chat.completions.create(model="default", messages=[{"role": "user", "content": "Count to three."}],
                                         max_tokens=16, temperature=0, stream=True, user="u-stream")
    chunks = list(stream)
    ids = {c.id for c in chunks}
    assert len(ids) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    with service.client() as c:
        logged = c.get(f"/v1/completions/{ids.pop()}").json()
    assert logged["stream"] is True
    assert logged["output"] == text
    assert logged["usage"]["completion_tokens"] > 0


def test_streaming_with_usage_requested_returns_the_usage_chunk(oai: OpenAI) -> None:
    chunks = list(oai.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, stream=True,
        stream_options={"include_usage": True}))
    assert any(c.usage and c.usage.completion_tokens > 0 for c in chunks)


def test_text_completion(service, oai: OpenAI) -> None:
    resp = oai.completions.create(model="default", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert resp.choices[0].text
    with service.client() as c:
        logged = c.get(f"/v1/completions/{resp.id}").json()
    assert logged["kind"] == "text" and logged["prompt"] == "The capital of France is"


def test_unknown_deployment_is_404_problem(oai: OpenAI, service) -> None:
    with pytest.raises(NotFoundError):
        oai.chat.completions.create(model="nope", messages=[{"role": "user", "content": "Hi"}])
    with service.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404
    assert r.headers["content-type"].startswith("application/problem+json")
    assert r.json()["field"] == "model"


@pytest.mark.parametrize(("body", "field", "status"), [
    ({"model": "default", "messages": "hi"}, "messages", 422),
    ({"model": "default", "messages": [{"role": "user", "content": "x"}], "metadata": {"k": 5}}, "metadata.k", 422),
    ({"messages": [{"role": "user", "content": "x"}]}, "model", 422),
    # longer than completions.user (PostgreSQL would refuse the row after vLLM answered)
    ({"model": "default", "messages": [{"role": "user", "content": "x"}], "user": "u" * 257}, "user", 422),
])
def test_bad_requests_name_the_field(service, body, field, status) -> None:
    with service.client() as c:
        r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == status
    assert r.json()["field"] == field
    assert "Traceback" not in r.text


def test_invalid_json_is_a_clear_400(service) -> None:
    with service.client() as c:
        r = c.post("/v1/chat/completions", content=b'{"model": "default",', headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert "not valid JSON" in r.json()["detail"]


def test_upstream_rejection_is_a_400_not_a_500(service) -> None:
    with service.client() as c:
        r = c.post("/v1/chat/completions", json={"model": "default", "max_tokens": 10**7,
                                                 "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400, r.text
    assert r.headers["content-type"].startswith("application/problem+json")


def test_deployments_and_models(service) -> None:
    with service.client() as c:
        r = c.post("/v1/deployments", json={"name": "support"})
        assert r.status_code == 201, r.text
        assert c.post("/v1/deployments", json={"name": "support"}).status_code == 409
        assert c.post("/v1/deployments", json={"name": "Bad Name!"}).json()["field"] == "name"
        names = [d["name"] for d in c.get("/v1/deployments").json()["data"]]
        assert {"default", "support"} <= set(names)
        assert c.get("/v1/deployments/support").json()["serving"] == "base"
        assert c.get("/v1/deployments/missing").status_code == 404
        models = [m["id"] for m in c.get("/v1/models").json()["data"]]
        assert "support" in models
        r = c.post("/v1/chat/completions", json={"model": "support", "max_tokens": 3,
                                                 "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200 and r.headers["x-tuneloop-adapter"] == "base"


def test_health_ready_and_metrics(service) -> None:
    assert httpx.get(service.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(service.url + "/ready").json()
    assert ready == {"status": "ready", "database": True, "vllm": True}
    text = httpx.get(service.url + "/metrics").text
    assert 'tuneloop_requests_total{adapter="base",deployment="default"' in text
    assert "tuneloop_request_duration_seconds_bucket" in text
    assert "tuneloop_vllm_up 1.0" in text


def test_answer_choices_constrain_a_deployment(service) -> None:
    """config.answer_choices makes every answer of the deployment one of them (vLLM structured outputs);
    a request's own constraint wins, a bad list is a 422 naming the field, and null removes it."""
    labels = ["card_arrival", "lost_or_stolen_card", "exchange_rate"]
    chat = {"model": "router", "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "My new card still has not arrived, where is it?"}]}
    with service.client() as c:
        r = c.post("/v1/deployments", json={"name": "router", "config": {"answer_choices": labels}})
        assert r.status_code == 201, r.text
        r = c.post("/v1/chat/completions", json=chat)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] in labels
        cid = r.headers["x-tuneloop-completion-id"]
        assert c.get(f"/v1/completions/{cid}").json()["output"] in labels
        with c.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        streamed = "".join((ch["choices"][0]["delta"].get("content") or "") for ch in chunks if ch["choices"])
        assert streamed in labels
        # a correction must be an answer the deployment can give; the batch is refused whole, naming the item
        bad = c.post("/v1/feedback", json=[{"completion_id": cid, "rating": 0.0, "correction": "card_arrival"},
                                           {"completion_id": cid, "rating": 0.0, "correction": "Card arrival"}])
        assert bad.status_code == 422 and bad.json()["field"] == "[1].correction", bad.text
        assert c.get("/v1/feedback", params={"deployment": "router"}).json()["data"] == []
        ok = c.post("/v1/feedback", json={"completion_id": cid, "rating": 0.0, "correction": "card_arrival"})
        assert ok.status_code == 201, ok.text
        own = c.post("/v1/chat/completions", json={**chat, "structured_outputs": {"choice": ["yes", "no"]}})
        assert own.json()["choices"][0]["message"]["content"] in ("yes", "no")
        bad = c.patch("/v1/deployments/router", json={"config": {"answer_choices": ["card_arrival"]}})
        assert bad.status_code == 422 and bad.json()["field"] == "config.answer_choices"
        bad = c.patch("/v1/deployments/router", json={"config": {"triggers": {"corrections": 5, "job": [None]}}})
        assert bad.status_code == 422 and bad.json()["field"] == "config.triggers.job", bad.text
        assert c.get("/v1/deployments/router").json()["config"]["answer_choices"] == labels  # nothing lost
        off = c.patch("/v1/deployments/router", json={"config": {"answer_choices": None}})
        assert off.status_code == 200 and "answer_choices" not in off.json()["config"]
        prose = c.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
        assert prose not in labels
