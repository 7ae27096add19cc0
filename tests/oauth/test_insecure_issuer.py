"""OAuth 2.0 needs TLS: a server whose issuer is http:// on a non-loopback name offers no OAuth.

authlib refuses such request URLs by raising; before this rule every OAuth endpoint and the
OAuth/OpenID discovery documents answered 500 for a server configured that way (a plain-HTTP
development bind on 0.0.0.0, or a forgotten CAREVAULT_ISSUER behind a proxy).
"""

from __future__ import annotations

from typing import Any

import pytest

OAUTH_REQUESTS = [
    ("GET", "/oauth/authorize?client_id=x&response_type=code", None),
    ("POST", "/oauth/token", {"grant_type": "client_credentials"}),
    ("POST", "/oauth/revoke", {"token": "x"}),
    ("POST", "/oauth/introspect", {"token": "x"}),
    ("GET", "/oauth/userinfo", None),
    ("GET", "/.well-known/oauth-authorization-server", None),
    ("GET", "/.well-known/openid-configuration", None),
    ("GET", "/.well-known/smart-configuration", None),
]


@pytest.fixture
def store() -> str:  # answered before any store is read
    return "sqlite"


@pytest.mark.parametrize(("method", "path", "form"), OAUTH_REQUESTS)
async def test_http_issuer_offers_no_oauth(
    harness_factory: Any, settings_factory: Any, method: str, path: str, form: Any
) -> None:
    h = await harness_factory(settings_factory(issuer_url="http://carevault.test"))
    response = await h.client.request(method, path, data=form)
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/problem+json"


async def test_http_issuer_capability_statement_names_no_smart(
    harness_factory: Any, settings_factory: Any
) -> None:
    h = await harness_factory(settings_factory(issuer_url="http://carevault.test"))
    security = (await h.client.get("/fhir/metadata")).json()["rest"][0]["security"]
    assert "service" not in security and "extension" not in security
    assert security["cors"] is False


@pytest.mark.parametrize("issuer", ["https://carevault.test", "http://127.0.0.1:8000"])
async def test_https_or_loopback_issuer_offers_oauth(
    harness_factory: Any, settings_factory: Any, issuer: str
) -> None:
    h = await harness_factory(
        settings_factory(issuer_url=issuer, cors_origins=["https://app.example.org"])
    )
    discovery = await h.client.get("/.well-known/oauth-authorization-server")
    assert discovery.status_code == 200
    assert discovery.json()["issuer"] == issuer
    token = await h.client.post("/oauth/token", data={"grant_type": "client_credentials"})
    assert token.status_code == 401  # no client: an OAuth error, not a 404
    security = (await h.client.get("/fhir/metadata")).json()["rest"][0]["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    assert security["cors"] is True
