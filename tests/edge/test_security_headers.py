"""Security headers on every response, whoever answered it (edge/headers.py)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi.responses import JSONResponse

from carevault.edge.headers import API_CSP, HSTS, PERMISSIONS_POLICY
from carevault.identity.roles import Role

FHIR = "application/fhir+json"
FIXED = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "permissions-policy": PERMISSIONS_POLICY.decode(),
}


@pytest.fixture
def store() -> str:
    # The headers are added at the edge, whatever the store: one store is enough here.
    return "sqlite"


def assert_secured(response: httpx.Response, *, hsts: bool = False) -> None:
    for name, value in FIXED.items():
        assert response.headers.get(name) == value, (name, response.status_code)
    assert "camera=()" in response.headers["permissions-policy"]
    assert "server" not in response.headers
    assert "x-powered-by" not in response.headers
    assert response.headers.get_list("content-security-policy")
    assert len(response.headers.get_list("cache-control")) == 1
    if hsts:
        assert response.headers["strict-transport-security"] == HSTS.decode()
    else:
        assert "strict-transport-security" not in response.headers


def assert_api(response: httpx.Response, **kwargs: Any) -> None:
    assert_secured(response, **kwargs)
    assert response.headers["content-security-policy"] == API_CSP.decode()


async def service_token(harness) -> str:
    await harness.add_user("svc.headers", Role.service)
    return (await harness.login("svc.headers"))["access_token"]


async def test_every_route_class_carries_the_headers(harness):
    client = harness.client
    bearer = {"Authorization": f"Bearer {await service_token(harness)}"}
    patient = await client.post(
        "/fhir/Patient",
        json={"resourceType": "Patient", "gender": "female"},
        headers={**bearer, "content-type": FHIR},
    )
    assert patient.status_code == 201, patient.text
    answers = {
        "health": await client.get("/healthz"),
        "auth refused": await client.post(
            "/auth/login", json={"username": "nobody", "password": "wrong-password-123"}
        ),
        "auth unauthenticated": await client.get("/auth/me"),
        "fhir create": patient,
        "fhir read": await client.get(f"/fhir/Patient/{patient.json()['id']}", headers=bearer),
        "fhir search": await client.get("/fhir/Patient", headers=bearer),
        "fhir error": await client.get("/fhir/Patient/no-such-id", headers=bearer),
        "fhir unauthenticated": await client.get("/fhir/Patient"),
        "unknown path": await client.get("/no/such/path"),
        "wrong method": await client.delete("/healthz"),
        "too large": await client.post(
            "/fhir/Patient", content=b"{" + b" " * (2 * 1024 * 1024) + b"}", headers=bearer
        ),
        "wrong type": await client.post(
            "/auth/login", content=b"username=a", headers={"content-type": "text/plain"}
        ),
        "options": await client.options("/fhir/Patient"),
    }
    expected = {
        "health": 200,
        "auth refused": 401,
        "auth unauthenticated": 401,
        "fhir create": 201,
        "fhir read": 200,
        "fhir search": 200,
        "fhir error": 404,
        "fhir unauthenticated": 401,
        "unknown path": 404,
        "wrong method": 405,
        "too large": 413,
        "wrong type": 415,
        "options": 405,
    }
    assert {k: r.status_code for k, r in answers.items()} == expected
    for name, response in answers.items():
        assert_api(response)
        # Nothing of these may be kept by a browser or a shared cache.
        assert response.headers["cache-control"] == "no-store", name


async def test_public_documents_keep_their_own_caching(harness_factory, settings_factory):
    # Key sets and discovery documents are public and say so; everything else is no-store.
    # (Discovery documents need an https issuer: RFC 8414 §2.)
    h = await harness_factory(settings_factory(issuer_url="https://testserver"))
    for path in (
        "/.well-known/jwks.json",
        "/.well-known/openid-configuration",
        "/.well-known/smart-configuration",
    ):
        response = await h.client.get("https://testserver" + path)
        assert response.status_code == 200, path
        assert_api(response, hsts=True)
        assert response.headers["cache-control"] == "public, max-age=300"
        assert "access_token" not in response.text


async def test_headers_on_a_rate_limited_answer(harness_factory, settings_factory):
    h = await harness_factory(settings_factory(rate_limit_auth_per_address="2/minute"))
    statuses = []
    for _ in range(4):
        response = await h.client.post(
            "/auth/login", json={"username": "nobody", "password": "wrong-password-123"}
        )
        statuses.append(response.status_code)
        assert_api(response)
        assert response.headers["cache-control"] == "no-store"
    assert 429 in statuses


async def test_oauth_page_keeps_its_own_policy_and_https_issuer_gets_hsts(
    harness_factory, settings_factory
):
    h = await harness_factory(settings_factory(issuer_url="https://testserver"))
    page = await h.client.get("https://testserver/oauth/authorize?response_type=bogus")
    assert page.headers["content-type"].startswith("text/html")
    assert_secured(page, hsts=True)
    # The page's own CSP (it needs inline style), not the API's.
    assert page.headers["content-security-policy"].startswith("default-src 'none'; style-src")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"
    assert_api(await h.client.get("https://testserver/healthz"), hsts=True)


async def test_hsts_with_tls_and_not_without(harness_factory, settings_factory, tmp_path, harness):
    assert_api(await harness.client.get("/healthz"), hsts=False)
    assert_api(await harness.client.get("/no/such/path"), hsts=False)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("unused: the in-process transport does not speak TLS")
    key.write_text("unused")
    tls = await harness_factory(
        settings_factory(tls_cert=cert, tls_key=key, issuer_url="http://testserver")
    )
    assert tls.services.settings.tls_enabled
    for path in ("/healthz", "/no/such/path", "/.well-known/jwks.json"):
        assert_api(await tls.client.get(path), hsts=True)


async def test_a_route_cannot_weaken_the_fixed_headers_or_add_a_banner(harness):
    async def careless() -> JSONResponse:
        return JSONResponse(
            {"ok": True},
            headers={
                "X-Frame-Options": "ALLOWALL",
                "X-Content-Type-Options": "sniff",
                "Referrer-Policy": "unsafe-url",
                "Server": "carevault/0.1 Python/3.11",
                "X-Powered-By": "FastAPI",
            },
        )

    async def own_policy() -> JSONResponse:
        return JSONResponse(
            {"ok": True},
            headers={"Content-Security-Policy": "default-src 'self'", "Cache-Control": "private"},
        )

    harness.app.add_api_route("/test-only/careless", careless)
    harness.app.add_api_route("/test-only/own-policy", own_policy)
    response = await harness.client.get("/test-only/careless")
    assert_api(response)
    assert response.headers["cache-control"] == "no-store"
    # A route's own CSP and caching are kept, and only once.
    own = await harness.client.get("/test-only/own-policy")
    assert_secured(own)
    assert own.headers.get_list("content-security-policy") == ["default-src 'self'"]
    assert own.headers.get_list("cache-control") == ["private"]


async def test_a_crash_answers_a_generic_500_with_the_headers(harness):
    async def crash() -> None:
        raise RuntimeError("Quillfeatherstonehaugh 1937-04-19")  # PHI in a message

    harness.app.add_api_route("/test-only/crash", crash)
    transport = httpx.ASGITransport(app=harness.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/test-only/crash")
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 500
    assert "Quillfeatherstonehaugh" not in response.text
    assert_api(response)
    assert response.headers["cache-control"] == "no-store"
