"""Bad input gets a clear 4xx problem+json, never a 500, never a hint of internals."""

from __future__ import annotations

import random

import pytest

PROBLEM = "application/problem+json"
LEAKS = ("Traceback", "sqlalchemy", "SELECT", "sqlite", "psycopg", "pydantic", 'File "')


def _assert_problem(response, status):
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM
    body = response.json()
    assert body["status"] == status and body["title"] and body["type"]
    for leak in LEAKS:
        assert leak not in response.text


async def test_malformed_json_is_400(harness):
    response = await harness.client.post(
        "/auth/login", content=b'{"username": "a", ', headers={"content-type": "application/json"}
    )
    _assert_problem(response, 400)


@pytest.mark.parametrize(
    "body",
    [
        {"username": "a", "password": "b", "admin": True},
        {"username": ["a"], "password": "b"},
        {"username": "a", "password": None},
        {"username": "a" * 300, "password": "b"},
        {"username": "a", "password": "b" * 2000},
        {},
    ],
)
async def test_invalid_login_shapes_are_422_without_echo(harness, body):
    response = await harness.client.post("/auth/login", json=body)
    _assert_problem(response, 422)
    assert "input" not in response.text


async def test_refresh_body_with_unknown_field_is_422(harness):
    response = await harness.client.post("/auth/refresh", json={"refresh_token": "x", "x": 1})
    _assert_problem(response, 422)


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""],
)
async def test_wrong_content_type_is_415(harness, content_type):
    headers = {"content-type": content_type} if content_type else {}
    response = await harness.client.post(
        "/auth/login", content=b'{"username":"a"}', headers=headers
    )
    _assert_problem(response, 415)


async def test_oversized_body_is_413_by_declared_length(harness):
    body = b'{"username":"' + b"a" * (2 * 1024 * 1024) + b'","password":"x"}'
    response = await harness.client.post(
        "/auth/login", content=body, headers={"content-type": "application/json"}
    )
    _assert_problem(response, 413)


async def test_oversized_streamed_body_is_413(harness):
    async def chunks():
        for _ in range(40):
            yield b"[" * 65536

    response = await harness.client.post(
        "/auth/login", content=chunks(), headers={"content-type": "application/json"}
    )
    _assert_problem(response, 413)


async def test_deeply_nested_json_is_400_not_500(harness):
    # Within /auth's 16 KiB body limit, so that the nesting is what gets judged.
    body = b"[" * 5_000 + b"]" * 5_000
    response = await harness.client.post(
        "/auth/login", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code in (400, 422)
    assert response.headers["content-type"] == PROBLEM


@pytest.mark.parametrize(
    "username",
    ["\x00admin", "ädmin\u202e", "' OR 1=1 --", "a\nb", "%00", "../../etc/passwd", "\ud7ff" * 10],
)
async def test_odd_usernames_are_plain_failures(harness, username):
    response = await harness.client.post(
        "/auth/login", json={"username": username, "password": "whatever-12345"}
    )
    _assert_problem(response, 401)


@pytest.mark.parametrize(
    "header",
    [
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Bearer a b",
        "bearer  x",
        "Token abc",
        "Bearer " + "A" * 9000,
        "Bearer \u00e9\u00e9".encode("latin-1"),
    ],
)
async def test_bad_authorization_headers_are_401(harness, header):
    response = await harness.client.get("/auth/me", headers={"Authorization": header})
    _assert_problem(response, 401)
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_missing_credentials_challenge_without_error_code(harness):
    response = await harness.client.get("/auth/me")
    _assert_problem(response, 401)
    assert response.headers["www-authenticate"] == 'Bearer realm="carevault"'


async def test_unknown_route_and_wrong_method_are_problems(harness):
    _assert_problem(await harness.client.get("/no/such/thing"), 404)
    _assert_problem(await harness.client.get("/auth/login"), 405)


async def test_random_bodies_never_produce_500(harness):
    rng = random.Random(20261123)
    for _ in range(150):
        size = rng.choice([0, 1, 5, 40, 400])
        body = bytes(rng.getrandbits(8) for _ in range(size))
        for path in ("/auth/login", "/auth/refresh", "/auth/logout"):
            response = await harness.client.post(
                path, content=body, headers={"content-type": "application/json"}
            )
            assert response.status_code < 500, (path, body, response.text)
            assert response.headers["content-type"] in (PROBLEM, "application/json")


async def test_health_readiness_and_openapi(harness):
    assert (await harness.client.get("/healthz")).json() == {"status": "ok"}
    assert (await harness.client.get("/readyz")).json() == {"status": "ready"}
    spec = (await harness.client.get("/openapi.json")).json()
    assert {
        "/auth/login",
        "/auth/refresh",
        "/auth/logout",
        "/auth/logout-all",
        "/auth/me",
        "/.well-known/jwks.json",
    } <= set(spec["paths"])


async def test_readiness_fails_when_the_database_is_gone(harness):
    await harness.services.engine.dispose()
    from sqlalchemy.ext.asyncio import create_async_engine

    original = harness.services.engine
    harness.services.engine = create_async_engine("sqlite+aiosqlite:////nonexistent/x.db")
    try:
        _assert_problem(await harness.client.get("/readyz"), 503)
    finally:
        await harness.services.engine.dispose()
        harness.services.engine = original
