"""Rate limits through HTTP (edge/rate_limit.py): each test is an attack or a property that
would fail without the middleware.

The rate-limit store is the process's memory unless a test says Redis; nothing here touches the
database's data, so these run on SQLite alone. Requests from different client addresses are
simulated the way a deployment sees them: X-Forwarded-For from a trusted proxy (the test
client's peer is 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from carevault.edge.rate_limit import address_bucket, storage_uri
from tests.conftest import REDIS_SKIP, REDIS_URL

PROBLEM = "application/problem+json"
FHIR_JSON = "application/fhir+json"
UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1
PLAIN = "/.well-known/jwks.json"  # an ordinary, unauthenticated route outside /auth and /oauth
PROXY = "127.0.0.1"  # the test client's peer address


@pytest.fixture
def store() -> str:
    """The limits do not depend on the database: SQLite only (overrides tests/conftest.py)."""
    return "sqlite"


@pytest.fixture
def limited(settings_factory: Any, harness_factory: Any) -> Any:
    """`await limited(**settings)`: a harness whose settings are the overrides given."""

    async def start(**overrides: Any) -> Any:
        return await harness_factory(settings_factory(**overrides))

    return start


def rejected(limit: str) -> float:
    return REGISTRY.get_sample_value("carevault_rate_limited_total", {"limit": limit}) or 0.0


def fields(header: str) -> dict[str, dict[str, int]]:
    """A RateLimit / RateLimit-Policy structured-field List: {name: {param: int}}."""
    parsed: dict[str, dict[str, int]] = {}
    for member in header.split(","):
        name, *params = member.strip().split(";")
        assert re.fullmatch(r'"[a-z]+"', name), header
        parsed[name.strip('"')] = {k: int(v) for k, v in (p.split("=") for p in params)}
    return parsed


def forwarded(address: str) -> dict[str, str]:
    return {"X-Forwarded-For": address}


# --- the cut, the answer, the headers ---------------------------------------------------------


async def test_address_limit_cuts_at_exactly_the_quota(limited):
    h = await limited(rate_limit_per_address="3/minute")
    before = rejected("address")
    statuses = [(await h.client.get(PLAIN)).status_code for _ in range(3)]
    assert statuses == [200, 200, 200]
    for _ in range(2):
        refused = await h.client.get(PLAIN)
        assert refused.status_code == 429
        assert refused.headers["content-type"] == PROBLEM
        assert refused.json() == {
            "type": "about:blank",
            "title": "Too Many Requests",
            "status": 429,
            "detail": "Too many requests.",
        }
        assert refused.headers["cache-control"] == "no-store"
        retry_after = refused.headers["retry-after"]
        assert retry_after.isdigit() and 1 <= int(retry_after) <= 60
        state = fields(refused.headers["ratelimit"])
        assert state["address"] == {"r": 0, "t": int(retry_after)}
        assert fields(refused.headers["ratelimit-policy"]) == {"address": {"q": 3, "w": 60}}
    assert rejected("address") == before + 2


async def test_allowed_responses_carry_the_policy_and_what_remains(limited):
    h = await limited(rate_limit_per_address="5/minute")
    remaining = []
    for _ in range(5):
        response = await h.client.get(PLAIN)
        assert response.status_code == 200
        assert fields(response.headers["ratelimit-policy"]) == {"address": {"q": 5, "w": 60}}
        state = fields(response.headers["ratelimit"])["address"]
        assert 1 <= state["t"] <= 60
        remaining.append(state["r"])
    assert remaining == [4, 3, 2, 1, 0]


async def test_retry_after_is_when_a_slot_frees_in_the_moving_window(limited):
    """Moving window: two requests 1.4 s apart under 2 per 2 seconds; just after the first has
    left the window, only ONE more fits (the second still counts). A fixed window that started
    with the first request would have reset and let two through."""
    h = await limited(rate_limit_per_address="2/2 seconds")
    assert (await h.client.get(PLAIN)).status_code == 200
    await asyncio.sleep(1.4)
    assert (await h.client.get(PLAIN)).status_code == 200
    await asyncio.sleep(0.8)  # 2.2 s after the first: it has left the window
    assert (await h.client.get(PLAIN)).status_code == 200
    refused = await h.client.get(PLAIN)
    assert refused.status_code == 429
    retry_after = int(refused.headers["retry-after"])
    assert 1 <= retry_after <= 2
    await asyncio.sleep(retry_after + 0.05)
    assert (await h.client.get(PLAIN)).status_code == 200


async def test_fhir_gets_an_operation_outcome(limited):
    h = await limited(rate_limit_per_address="2/minute")
    for _ in range(2):
        assert (await h.client.get("/fhir/metadata")).status_code == 200
    refused = await h.client.get("/fhir/metadata")
    assert refused.status_code == 429
    assert refused.headers["content-type"] == FHIR_JSON
    assert refused.json() == {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": "throttled", "diagnostics": "Too many requests"}],
    }
    assert int(refused.headers["retry-after"]) >= 1


# --- addresses --------------------------------------------------------------------------------


async def test_each_address_has_its_own_budget(limited):
    h = await limited(rate_limit_per_address="3/minute", trusted_proxies=[PROXY])
    for address in ("203.0.113.5", "203.0.113.6"):
        for _ in range(3):
            assert (await h.client.get(PLAIN, headers=forwarded(address))).status_code == 200
        assert (await h.client.get(PLAIN, headers=forwarded(address))).status_code == 429
    # The proxy's own budget (requests without a forwarded address) is untouched.
    assert (await h.client.get(PLAIN)).status_code == 200


async def test_an_untrusted_peer_cannot_escape_by_rotating_x_forwarded_for(limited):
    h = await limited(rate_limit_per_address="3/minute", trusted_proxies=["10.0.0.1"])
    statuses = [
        (await h.client.get(PLAIN, headers=forwarded(f"198.51.100.{i}"))).status_code
        for i in range(6)
    ]
    assert statuses == [200, 200, 200, 429, 429, 429]


async def test_an_ipv6_client_cannot_escape_by_walking_its_slash_64(limited):
    h = await limited(rate_limit_per_address="3/minute", trusted_proxies=[PROXY])
    statuses = [
        (await h.client.get(PLAIN, headers=forwarded(f"2001:db8:0:7::{i:x}"))).status_code
        for i in range(1, 5)
    ]
    assert statuses == [200, 200, 200, 429]
    # Another /64 is another client.
    other = await h.client.get(PLAIN, headers=forwarded("2001:db8:0:8::1"))
    assert other.status_code == 200


def test_address_buckets():
    assert address_bucket("192.0.2.1") == "192.0.2.1"
    assert address_bucket("::ffff:192.0.2.1") == "192.0.2.1"
    assert address_bucket("2001:db8::1") == address_bucket("2001:db8::ffff:1") == "2001:db8::/64"
    assert address_bucket(None) == "unknown"
    assert address_bucket("testclient") == "testclient"


# --- principals -------------------------------------------------------------------------------


async def test_principal_limit_holds_across_addresses(limited):
    h = await limited(
        rate_limit_per_address="100/minute",
        rate_limit_auth_per_address="100/minute",
        rate_limit_per_principal="3/minute",
        trusted_proxies=[PROXY],
    )
    await h.add_user("rl.alice")
    await h.add_user("rl.bob")
    alice = (await h.login("rl.alice"))["access_token"]
    bob = (await h.login("rl.bob"))["access_token"]
    before = rejected("principal")

    def as_(token: str, address: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}", **forwarded(address)}

    for i in range(3):
        response = await h.client.get("/auth/me", headers=as_(alice, f"203.0.113.{i}"))
        assert response.status_code == 200
        assert fields(response.headers["ratelimit"])["principal"]["r"] == 2 - i
    refused = await h.client.get("/auth/me", headers=as_(alice, "203.0.113.99"))
    assert refused.status_code == 429
    assert fields(refused.headers["ratelimit"])["principal"]["r"] == 0
    assert rejected("principal") == before + 1
    # The same addresses serve another principal, and alice without her token (address only).
    assert (await h.client.get("/auth/me", headers=as_(bob, "203.0.113.0"))).status_code == 200
    anonymous = await h.client.get(PLAIN, headers=forwarded("203.0.113.99"))
    assert anonymous.status_code == 200
    assert "principal" not in fields(anonymous.headers["ratelimit"])


def _tampered(token: str) -> str:
    """The same header and claims with a different (invalid) signature."""
    header, payload, signature = token.split(".")
    middle = len(signature) // 2
    flipped = "A" if signature[middle] != "A" else "B"
    return f"{header}.{payload}.{signature[:middle]}{flipped}{signature[middle + 1 :]}"


async def test_a_forged_token_does_not_spend_the_victims_budget(limited):
    """An attacker who knows the victim's `sub` (or holds an expired or tampered copy of a
    token) sends tokens that name the victim but do not verify: they are limited by their
    address only, and the victim keeps every request of their own budget."""
    h = await limited(
        rate_limit_per_address="100/minute",
        rate_limit_auth_per_address="100/minute",
        rate_limit_per_principal="3/minute",
        trusted_proxies=[PROXY],
    )
    await h.add_user("rl.victim")
    victim = (await h.login("rl.victim"))["access_token"]
    forged = _tampered(victim)
    for i in range(10):
        response = await h.client.get(
            "/auth/me",
            headers={"Authorization": f"Bearer {forged}", **forwarded(f"198.51.100.{i}")},
        )
        assert response.status_code == 401
        assert "principal" not in fields(response.headers["ratelimit"])
    statuses = [(await h.me(victim)).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]


@pytest.mark.parametrize(
    "authorization",
    [
        "Bearer",
        "Bearer ",
        "Bearer  x",
        "Basic dXNlcjpwYXNz",
        "Bearer a.b.c",
        "Bearer " + "e30." * 3000,
        "DPoP \u00ff\u00fe.x.y",
        "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJ2aWN0aW0ifQ.",
    ],
)
async def test_odd_authorization_headers_are_counted_by_address_and_never_crash(
    limited, authorization
):
    h = await limited(rate_limit_per_address="2/minute")
    headers = {"Authorization": authorization.encode("latin-1")}
    first = await h.client.get(PLAIN, headers=headers)
    assert first.status_code == 200
    assert list(fields(first.headers["ratelimit"])) == ["address"]
    await h.client.get(PLAIN, headers=headers)
    assert (await h.client.get(PLAIN, headers=headers)).status_code == 429


# --- the sign-in class ------------------------------------------------------------------------


async def test_auth_and_oauth_share_a_stricter_class(limited):
    h = await limited(
        rate_limit_per_address="50/minute",
        rate_limit_auth_per_address="3/minute",
        issuer_url="https://testserver",
    )
    # OAuth endpoints answer over https only (authlib): the same app, an https base URL.
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=h.app), base_url="https://testserver"
    ) as client:
        before = rejected("auth")
        wrong = {"username": "nobody", "password": "not-the-password-123"}
        for _ in range(2):
            assert (await client.post("/auth/login", json=wrong)).status_code == 401
        token = await client.post("/oauth/token", data={"grant_type": "password"})
        assert token.status_code == 400  # /oauth counts in the same class
        refused = await client.post("/auth/login", json=wrong)
        assert refused.status_code == 429
        assert fields(refused.headers["ratelimit-policy"]) == {
            "address": {"q": 50, "w": 60},
            "auth": {"q": 3, "w": 60},
        }
        state = fields(refused.headers["ratelimit"])
        assert state["auth"]["r"] == 0
        assert refused.headers["retry-after"] == str(state["auth"]["t"])
        assert (await client.get("/oauth/authorize")).status_code == 429
        assert rejected("auth") == before + 2
        # The general class still has room: the rest of the API answers.
        assert (await client.get(PLAIN)).status_code == 200
        assert (await client.get("/fhir/metadata")).status_code == 200


# --- exempt and uncounted -----------------------------------------------------------------------


async def test_health_and_metrics_are_not_limited(limited):
    h = await limited(rate_limit_per_address="2/minute")
    for _ in range(5):
        assert (await h.client.get("/healthz")).status_code == 200
        assert (await h.client.get("/readyz")).status_code == 200
        assert (await h.client.get("/metrics")).status_code != 429
    # ...and spent nothing of the budget.
    assert [(await h.client.get(PLAIN)).status_code for _ in range(3)] == [200, 200, 429]


async def test_cors_preflights_spend_no_budget(limited):
    origin = "https://portal.example"
    h = await limited(rate_limit_per_address="2/minute", cors_origins=[origin])
    preflight = {"Origin": origin, "Access-Control-Request-Method": "GET"}
    for _ in range(10):
        assert (await h.client.options(PLAIN, headers=preflight)).status_code == 200
    assert [(await h.client.get(PLAIN)).status_code for _ in range(3)] == [200, 200, 429]
    # A 429 to a listed origin carries the CORS headers, so script can read Retry-After.
    refused = await h.client.get(PLAIN, headers={"Origin": origin})
    assert refused.status_code == 429
    assert refused.headers["access-control-allow-origin"] == origin
    assert "retry-after" in refused.headers["access-control-expose-headers"].lower()


async def test_disabled_limits_neither_count_nor_answer(limited):
    h = await limited(rate_limit_enabled=False, rate_limit_per_address="1/minute")
    for _ in range(3):
        response = await h.client.get(PLAIN)
        assert response.status_code == 200
        assert "ratelimit" not in response.headers


# --- the store: fail closed, Redis shared -----------------------------------------------------


async def test_unreachable_store_fails_closed(limited):
    h = await limited(rate_limit_storage_url=UNREACHABLE_REDIS)
    refused = await h.client.get(PLAIN)
    assert refused.status_code == 503
    assert refused.headers["content-type"] == PROBLEM
    assert refused.json()["detail"] == "Service temporarily unavailable."
    assert "127.0.0.1" not in refused.text and "redis" not in refused.text.lower()
    assert refused.headers["retry-after"] == "1"
    await h.add_user("rl.closed")
    login = await h.client.post(
        "/auth/login", json={"username": "rl.closed", "password": "correct-Horse-battery-staple-91"}
    )
    assert login.status_code == 503
    fhir = await h.client.get("/fhir/metadata")
    assert fhir.status_code == 503
    assert fhir.json()["issue"][0]["code"] == "transient"
    # Health checks keep answering: the process is up, only the limits cannot be checked.
    assert (await h.client.get("/healthz")).status_code == 200


def test_storage_follows_the_settings(settings_factory):
    assert storage_uri(settings_factory()) == "async+memory://"
    assert storage_uri(settings_factory(redis_url="redis://r:6379/2")) == "async+redis://r:6379/2"
    assert (
        storage_uri(
            settings_factory(redis_url="redis://r/2", rate_limit_storage_url="rediss://s:6380/0")
        )
        == "async+rediss://s:6380/0"
    )


def test_bad_settings_stop_the_start(settings_factory):
    from carevault.app import create_app
    from carevault.edge.rate_limit import RateLimit

    for overrides in (
        {"rate_limit_per_address": "lots"},
        {"rate_limit_auth_per_address": "0/minute"},
        {"rate_limit_storage_url": "nosuchstore://x"},
    ):
        settings = settings_factory(**overrides)
        app = create_app(settings)
        with pytest.raises(Exception):  # noqa: B017, PT011 - limits' ConfigurationError or ours
            app.build_middleware_stack()
        assert any(m.cls is RateLimit for m in app.user_middleware)


@pytest.mark.redis
@pytest.mark.skipif(REDIS_URL is None, reason=REDIS_SKIP)
@pytest.mark.parametrize("setting", ["rate_limit_storage_url", "redis_url"])
async def test_two_apps_on_one_redis_share_the_limit(settings_factory, harness_factory, setting):
    settings = settings_factory(rate_limit_per_address="4/minute", **{setting: REDIS_URL})
    # Two app instances with their own services and stores, one deployment (same keys).
    a = await harness_factory(settings)
    b = await harness_factory(settings)
    statuses = [(await (a if i % 2 == 0 else b).client.get(PLAIN)).status_code for i in range(6)]
    assert statuses == [200, 200, 200, 200, 429, 429]
    # Another deployment on the same Redis counts on its own.
    other = await harness_factory(
        settings_factory(rate_limit_per_address="4/minute", **{setting: REDIS_URL})
    )
    assert (await other.client.get(PLAIN)).status_code == 200


async def test_two_apps_with_memory_stores_count_apart(settings_factory, harness_factory):
    """What the docstring warns about: memory windows are per process (and per app)."""
    settings = settings_factory(rate_limit_per_address="2/minute")
    a = await harness_factory(settings)
    b = await harness_factory(settings)
    assert [(await a.client.get(PLAIN)).status_code for _ in range(3)] == [200, 200, 429]
    assert (await b.client.get(PLAIN)).status_code == 200


@pytest.mark.redis
@pytest.mark.skipif(REDIS_URL is None, reason=REDIS_SKIP)
async def test_redis_holds_no_address_token_or_user_id(settings_factory, harness_factory):
    import redis.asyncio as redis

    h = await harness_factory(
        settings_factory(rate_limit_storage_url=REDIS_URL, trusted_proxies=[PROXY])
    )
    user = await h.add_user("rl.keys")
    token = (await h.login("rl.keys"))["access_token"]
    marker = "203.0.113.77"
    response = await h.client.get(
        "/auth/me", headers={"Authorization": f"Bearer {token}", **forwarded(marker)}
    )
    assert response.status_code == 200
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = [k.decode() async for k in client.scan_iter("carevault-rate*", count=1000)]
        values = [str(await client.lrange(k, 0, -1)) for k in keys]
    finally:
        await client.aclose()
    assert keys
    joined = " ".join(keys + values)
    for secret in (marker, "127.0.0.1", token[:40], user.id, "rl.keys"):
        assert secret not in joined


async def test_signed_in_requests_leave_the_sign_in_budget_to_sign_ins(limited):
    """Many clinicians behind one NAT address: their /auth/me and the like are bounded per
    principal, and do not use up the per-address budget that bounds password guessing."""
    h = await limited(rate_limit_per_address="50/minute", rate_limit_auth_per_address="3/minute")
    await h.add_user("rl.nat")
    token = (await h.login("rl.nat"))["access_token"]  # sign-in 1 of 3
    for _ in range(6):
        me = await h.me(token)
        assert me.status_code == 200
        assert set(fields(me.headers["ratelimit"])) == {"address", "principal"}
    wrong = {"username": "rl.nat", "password": "not-the-password-123"}
    for _ in range(2):  # sign-ins 2 and 3
        assert (await h.client.post("/auth/login", json=wrong)).status_code == 401
    assert (await h.client.post("/auth/login", json=wrong)).status_code == 429
    # A forged token does not lift a request out of the sign-in class.
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    refused = await h.client.get("/auth/me", headers={"Authorization": f"Bearer {forged}"})
    assert refused.status_code == 429
