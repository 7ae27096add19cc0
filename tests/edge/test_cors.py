"""CORS for the listed browser origins only (edge/cors.py, config.cors_origin)."""

from __future__ import annotations

import httpx
import pytest
from pydantic import ValidationError
from starlette.applications import Starlette

from carevault.config import Settings, cors_origin
from carevault.edge.cors import ListedOriginsCORS
from carevault.identity.roles import Role

LISTED = "https://app.example"
MAX_AGE = 123


@pytest.fixture
def store() -> str:
    # CORS is decided at the edge, whatever the store: one store is enough here.
    return "sqlite"


@pytest.fixture
async def h(harness_factory, settings_factory):
    return await harness_factory(
        settings_factory(
            cors_origins=[LISTED, "http://localhost:3000"], cors_max_age_seconds=MAX_AGE
        )
    )


def cors_headers(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("access-control-")}


def varies_on_origin(response: httpx.Response) -> bool:
    values = ",".join(response.headers.get_list("vary"))
    return "origin" in [v.strip().lower() for v in values.split(",")]


def preflight(origin: str, method: str = "POST", headers: str | None = None) -> dict[str, str]:
    sent = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers is not None:
        sent["Access-Control-Request-Headers"] = headers
    return sent


UNLISTED = [
    "https://evil.example",
    "null",
    "http://app.example",  # another scheme
    "https://app.example:8443",  # another port
    "https://app.example.evil.example",  # a suffix
    "https://evil.example/https://app.example",
    "https://APP.example",  # browsers send origins in lower case; this is not one of them
    "https://app.example, https://evil.example",
    "*",
]


@pytest.mark.parametrize("origin", UNLISTED)
async def test_unlisted_origin_gets_no_cors_headers_on_simple_requests(h, origin):
    for response in (
        await h.client.get("/healthz", headers={"Origin": origin}),
        await h.client.get("/auth/me", headers={"Origin": origin}),
        await h.client.get("/no/such/path", headers={"Origin": origin}),
        await h.client.post(
            "/auth/login",
            json={"username": "x", "password": "wrong-password-123"},
            headers={"Origin": origin},
        ),
    ):
        assert cors_headers(response) == {}, (origin, response.request.url)
        assert varies_on_origin(response)


@pytest.mark.parametrize("origin", UNLISTED)
async def test_unlisted_origin_preflight_is_refused_without_cors_headers(h, origin):
    for path in ("/auth/me", "/fhir/Patient", "/no/such/path"):
        response = await h.client.options(
            path, headers=preflight(origin, "POST", "authorization,content-type")
        )
        assert response.status_code == 403
        assert cors_headers(response) == {}, (origin, path)
        assert varies_on_origin(response)
        assert response.headers["cache-control"] == "no-store"
        assert origin not in response.text
        if path.startswith("/fhir"):
            assert response.json()["resourceType"] == "OperationOutcome"
        else:
            assert response.headers["content-type"] == "application/problem+json"


async def test_listed_origin_is_echoed_with_credentials(h):
    await h.add_user("svc.cors", Role.service)
    token = (await h.login("svc.cors"))["access_token"]
    for origin in (LISTED, "http://localhost:3000"):
        for response in (
            await h.client.get("/healthz", headers={"Origin": origin}),
            await h.client.get(
                "/fhir/Patient", headers={"Origin": origin, "Authorization": f"Bearer {token}"}
            ),
            await h.client.get("/auth/me", headers={"Origin": origin}),  # errors too
        ):
            assert response.headers["access-control-allow-origin"] == origin
            assert response.headers["access-control-allow-credentials"] == "true"
            assert "X-Request-ID" in response.headers["access-control-expose-headers"]
            assert varies_on_origin(response)


async def test_listed_origin_preflight_is_allowed_and_cached_briefly(h):
    response = await h.client.options(
        "/fhir/Patient", headers=preflight(LISTED, "PUT", "authorization, content-type, dpop")
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == LISTED
    assert response.headers["access-control-allow-credentials"] == "true"
    assert response.headers["access-control-max-age"] == str(MAX_AGE)
    assert "PUT" in response.headers["access-control-allow-methods"]
    assert "authorization" in response.headers["access-control-allow-headers"].lower()
    assert varies_on_origin(response)


@pytest.mark.parametrize(
    "method, headers", [("TRACE", None), ("CONNECT", None), ("POST", "x-evil"), ("GET", "cookie")]
)
async def test_listed_origin_preflight_for_what_is_not_allowed_is_refused(h, method, headers):
    response = await h.client.options("/fhir/Patient", headers=preflight(LISTED, method, headers))
    assert response.status_code == 403
    assert cors_headers(response) == {}


async def test_no_origins_configured_means_no_cross_origin_access(harness):
    assert harness.services.settings.cors_origins == []
    simple = await harness.client.get("/healthz", headers={"Origin": LISTED})
    assert cors_headers(simple) == {}
    refused = await harness.client.options("/healthz", headers=preflight(LISTED, "GET"))
    assert refused.status_code == 403 and cors_headers(refused) == {}


@pytest.mark.parametrize(
    "value",
    [
        "*",
        "https://*.example.org",
        "https://app.example/",
        "https://app.example/path",
        "https://app.example?x=1",
        "https://user@app.example",
        "app.example",
        "null",
        "ftp://app.example",
        "https://app.example:99999",
        "https://",
        "https://app.example,*",
    ],
)
def test_settings_refuse_anything_but_exact_origins(tmp_path, value, monkeypatch):
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path, cors_origins=[value])
    monkeypatch.setenv("CAREVAULT_CORS_ORIGINS", value)
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path)


def test_settings_store_origins_as_browsers_send_them(tmp_path, monkeypatch):
    monkeypatch.setenv(
        "CAREVAULT_CORS_ORIGINS", "HTTPS://App.Example:443, http://localhost:3000,http://[::1]:80"
    )
    assert Settings(data_dir=tmp_path).cors_origins == [
        "https://app.example",
        "http://localhost:3000",
        "http://[::1]",
    ]
    assert cors_origin("https://app.example:8443") == "https://app.example:8443"


def test_the_middleware_refuses_a_wildcard_even_without_settings():
    with pytest.raises(ValueError):
        ListedOriginsCORS(Starlette(), allow_origins=["*"], allow_credentials=True)
