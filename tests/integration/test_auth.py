"""API keys and scopes against the real service."""

from __future__ import annotations

import httpx
import pytest

CHAT = {"model": "default", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def test_missing_or_invalid_key_is_401(service) -> None:
    r = httpx.post(service.url + "/v1/chat/completions", json=CHAT)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.headers["content-type"].startswith("application/problem+json")
    r = httpx.post(service.url + "/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401
    r = httpx.get(service.url + "/v1/deployments", headers={"Authorization": "Basic abc"})
    assert r.status_code == 401


def test_app_key_can_infer_but_not_administer(service) -> None:
    with service.client() as admin:
        r = admin.post("/v1/api-keys", json={"name": "shop frontend", "scope": "app"})
    assert r.status_code == 201
    created = r.json()
    key = created["key"]
    assert created["scope"] == "app" and key.startswith("tl-")
    with service.client(key) as app:
        assert app.post("/v1/chat/completions", json=CHAT).status_code == 200
        r = app.post("/v1/api-keys", json={"name": "x", "scope": "admin"})
        assert r.status_code == 403
        assert app.post("/v1/deployments", json={"name": "forbidden"}).status_code == 403
    # The key is shown once, never again, and never written to the logs.
    logs = service.log_text() + "".join(p.read_text(errors="replace") for p in (service.data_dir / "logs").glob("*.log"))
    assert key not in logs
    assert service.admin_key not in logs


@pytest.mark.parametrize("scope", ["root", ""])
def test_bad_scope_is_rejected(service, scope: str) -> None:
    with service.client() as admin:
        r = admin.post("/v1/api-keys", json={"name": "x", "scope": scope})
    assert r.status_code == 422 and r.json()["field"] == "scope"


@pytest.mark.parametrize(("body", "field"), [({"name": 5}, "name"), ({"name": ["a"]}, "name"), ({"name": ""}, "name"),
                                             ({"name": "x", "scopes": "app"}, "scopes")])
def test_bad_key_body_is_a_422_naming_the_field(service, body: dict, field: str) -> None:
    """A non-string name was a 500 (len() of an int); a misspelt field was silently ignored."""
    with service.client() as admin:
        r = admin.post("/v1/api-keys", json=body)
    assert r.status_code == 422 and r.json()["field"] == field, r.text
