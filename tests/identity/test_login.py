"""Password login over HTTP: success, failures that look identical, lockout and backoff."""

from __future__ import annotations

import pytest

from carevault.identity.roles import Role
from tests.audit.trail import audit_documents
from tests.conftest import STRONG_PASSWORD


async def _events(services, name):
    return await audit_documents(services.engine, f"security.{name}")


async def test_login_returns_tokens_and_cookie(harness):
    await harness.add_user("dr.house", Role.physician, organization_id="org-1")
    response = await harness.client.post(
        "/auth/login", json={"username": "dr.house", "password": STRONG_PASSWORD}
    )
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "refresh_token"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 600
    assert response.headers["cache-control"] == "no-store"
    cookie = response.headers["set-cookie"]
    assert "__Secure-carevault-refresh=" + body["refresh_token"] in cookie
    for attribute in ("HttpOnly", "Secure", "SameSite=strict", "Path=/auth"):
        assert attribute.lower() in cookie.lower()

    me = await harness.me(body["access_token"])
    assert me.status_code == 200
    data = me.json()
    assert data["username"] == "dr.house"
    assert data["roles"] == ["physician"]
    assert data["organization"] == "org-1"
    assert data["expires_at"] > 0
    assert len(await _events(harness.services, "login")) == 1


async def test_unknown_user_and_wrong_password_are_byte_identical(harness):
    await harness.add_user("nurse.joy", Role.nurse)
    # Every response names its request (X-Request-ID, fresh unless the client sends one): the
    # same id on both requests, so that every header but Date must match too.
    same_id = {"X-Request-ID": "0b6c2a4e-5f1d-4c3b-9a8e-7d6f5e4c3b2a"}
    wrong = await harness.client.post(
        "/auth/login", json={"username": "nurse.joy", "password": "x" * 14}, headers=same_id
    )
    unknown = await harness.client.post(
        "/auth/login", json={"username": "nobody.here", "password": "x" * 14}, headers=same_id
    )
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.content == unknown.content
    # RateLimit counts down with every request from this address, whoever it names.
    strip = {"date", "ratelimit"}
    assert {k: v for k, v in wrong.headers.items() if k not in strip} == {
        k: v for k, v in unknown.headers.items() if k not in strip
    }
    assert "set-cookie" not in wrong.headers


async def test_disabled_user_cannot_log_in_and_looks_like_wrong_password(harness):
    await harness.add_user("gone.user", Role.billing)
    await harness.services.accounts.set_enabled("gone.user", False)
    disabled = await harness.client.post(
        "/auth/login", json={"username": "gone.user", "password": STRONG_PASSWORD}
    )
    unknown = await harness.client.post(
        "/auth/login", json={"username": "never.was", "password": STRONG_PASSWORD}
    )
    assert disabled.status_code == 401
    assert disabled.content == unknown.content


async def test_lockout_after_five_failures_refuses_correct_password(
    settings_factory, harness_factory, clock
):
    settings = settings_factory()
    h = await harness_factory(settings, clock)
    await h.add_user("target.user", Role.physician)
    for _ in range(5):
        clock.advance(60)  # past any backoff: only the lockout can stop the next attempt
        await h.login("target.user", "wrong-password-123", expect=401)
    clock.advance(1)
    locked = await h.client.post(
        "/auth/login", json={"username": "target.user", "password": STRONG_PASSWORD}
    )
    wrong = await h.client.post(
        "/auth/login", json={"username": "target.user", "password": "nope-nope-nope"}
    )
    assert locked.status_code == 401
    assert locked.content == wrong.content
    assert len(await _events(h.services, "account_locked")) == 1
    assert len(await _events(h.services, "login_locked")) >= 1

    clock.advance(15 * 60 + 1)
    await h.login("target.user")  # lockout over: the right password works again


async def test_backoff_grows_exponentially(settings_factory, harness_factory, clock):
    h = await harness_factory(settings_factory(), clock)
    await h.add_user("slow.down", Role.nurse)
    await h.login("slow.down", "wrong-password-123", expect=401)  # failure 1 -> 1 s backoff
    clock.advance(0.5)
    await h.login("slow.down", expect=401)  # inside backoff: refused even though correct
    clock.advance(0.6)
    await h.login("slow.down", "wrong-password-123", expect=401)  # failure 2 -> 2 s
    clock.advance(1.5)
    await h.login("slow.down", expect=401)
    clock.advance(0.6)
    await h.login("slow.down")  # backoff passed: success resets the counter
    await h.login("slow.down", "wrong-password-123", expect=401)
    clock.advance(1.1)
    await h.login("slow.down")
    throttled = await _events(h.services, "login_throttled")
    assert len(throttled) == 2


async def test_unknown_usernames_lock_like_real_ones(settings_factory, harness_factory, clock):
    """Locking must not reveal existence: an unknown name is throttled the same way."""
    h = await harness_factory(settings_factory(), clock)
    for _ in range(5):
        clock.advance(60)
        await h.login("ghost.account", "wrong-password-123", expect=401)
    events = await _events(h.services, "account_locked")
    assert len(events) == 1 and events[0].get("user") is None
    assert "ghost.account" not in str(events[0])  # the attempted name only as a keyed hash


async def test_address_throttle_answers_429(settings_factory, harness_factory, clock):
    h = await harness_factory(settings_factory(login_max_failures_per_address=3), clock)
    for i in range(3):
        await h.login(f"spray{i}.user", "wrong-password-123", expect=401)
    response = await h.client.post(
        "/auth/login", json={"username": "other.user", "password": "whatever-123"}
    )
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) > 0
    assert response.headers["content-type"] == "application/problem+json"


async def test_rehash_on_login_when_parameters_change(settings_factory, harness_factory):
    settings = settings_factory()
    first = await harness_factory(settings)
    await first.add_user("rehash.me", Role.registrar)
    before = (await first.services.users.by_username("rehash.me")).password_hash
    assert "t=2" in before

    stronger = settings.model_copy(update={"argon2_time_cost": 3})
    second = await harness_factory(stronger)
    await second.login("rehash.me")
    after = (await second.services.users.by_username("rehash.me")).password_hash
    assert after != before and "t=3" in after and after.startswith("$argon2id$")
    await second.login("rehash.me")  # the new hash verifies


async def test_hashing_runs_off_the_event_loop(harness):
    """Requests keep being served while logins hash: /healthz must not wait for Argon2."""
    import asyncio
    import time

    await harness.add_user("busy.user", Role.nurse)
    logins = [asyncio.create_task(harness.login("busy.user")) for _ in range(4)]  # < lockout limit
    await asyncio.sleep(0.005)
    start = time.perf_counter()
    health = await harness.client.get("/healthz")
    waited = time.perf_counter() - start
    await asyncio.gather(*logins)
    assert health.status_code == 200
    # Four Argon2 hashes take >= 80 ms on one core; a blocked loop would make us wait for them.
    assert waited < 0.05, waited


@pytest.mark.parametrize(
    "payload",
    [
        {"username": "a"},
        {"username": "a", "password": "b", "extra": 1},
        {"username": 5, "password": "b"},
        [],
        "string",
    ],
)
async def test_malformed_login_bodies_are_4xx_problems(harness, payload):
    response = await harness.client.post("/auth/login", json=payload)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/problem+json"
    assert "b" not in [e.get("input") for e in response.json().get("errors", [])]


async def test_parallel_guesses_get_no_more_tries_than_the_limit(harness, settings):
    """A burst of guesses at one account, all in flight at once: no more of them may have
    their password checked than the limit allows one after another (the attempt is reserved
    under the account row's lock; PostgreSQL's READ COMMITTED would otherwise let every
    guess read the same count and each write it back plus one)."""
    import asyncio

    await harness.add_user("burst.target", Role.nurse)
    guesses = [
        harness.client.post(
            "/auth/login", json={"username": "burst.target", "password": f"wrong-guess-{i:04d}"}
        )
        for i in range(4 * settings.login_max_failures)
    ]
    responses = await asyncio.gather(*guesses)
    assert [r.status_code for r in responses] == [401] * len(guesses)
    checked = await _events(harness.services, "login")
    refused = await _events(harness.services, "login_throttled")
    refused += await _events(harness.services, "login_locked")
    assert len(checked) + len(refused) == len(guesses)
    assert 1 <= len(checked) <= settings.login_max_failures
