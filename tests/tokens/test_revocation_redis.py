"""The Redis revocation backend: shared by instances that share nothing else, durable through a
Redis restart (re-published from the database), and failing closed when Redis is gone.

Runs on both stores. Keys are named by random ids (jti, sid, user id), so parallel runs on one
Redis database do not collide; a test only ever deletes the keys of its own tokens.
"""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis
from sqlalchemy import func, select

from carevault.config import Settings
from carevault.db.tables import revocations
from carevault.tokens.revocation import RedisRevocationList, RevocationUnavailable
from tests.conftest import REDIS_SKIP, REDIS_URL, copy_tree, make_settings

pytestmark = [pytest.mark.redis, pytest.mark.skipif(REDIS_URL is None, reason=REDIS_SKIP)]

UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"  # nothing listens on port 1
PREFIX = RedisRevocationList.PREFIX


def _claims(access_token: str) -> dict[str, Any]:
    payload = access_token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def _key(kind: str, value: str) -> str:
    return f"{PREFIX}{kind}:{value}"


@pytest.fixture
async def redis_client():
    assert REDIS_URL
    client = redis.Redis.from_url(REDIS_URL, decode_responses=True)
    yield client
    await client.aclose()


def _second_instance_settings(first: Settings, data_dir: Path, **overrides: Any) -> Settings:
    """Settings for another instance on the same database and Redis, in its own data directory
    (so no shared ChangeSignal), with the first instance's keys (so tokens verify on both)."""
    copy_tree(first.keys_dir, data_dir / "keys")
    database_url = first.database_url or f"sqlite:///{first.data_dir.resolve() / 'carevault.db'}"
    values: dict[str, Any] = {"redis_url": first.redis_url, **overrides}
    return make_settings(data_dir, database_url, **values)


async def _logout(harness, access_token: str, path: str = "/auth/logout") -> None:
    response = await harness.client.post(path, headers={"Authorization": f"Bearer {access_token}"})
    assert response.status_code == 204, response.text


async def test_logout_revokes(settings_factory, harness_factory, redis_client):
    h = await harness_factory(settings_factory(redis_url=REDIS_URL))
    assert isinstance(h.services.revocations, RedisRevocationList)
    await h.add_user("redis.logout")
    session = await h.login("redis.logout")
    other = await h.login("redis.logout")
    assert (await h.me(session["access_token"])).status_code == 200

    await _logout(h, session["access_token"])

    assert (await h.me(session["access_token"])).status_code == 401
    assert (await h.refresh(session["refresh_token"])).status_code == 401
    assert (await h.me(other["access_token"])).status_code == 200
    claims = _claims(session["access_token"])
    assert await redis_client.exists(_key("sid", claims["sid"]), _key("jti", claims["jti"])) == 2
    ttl = await redis_client.pttl(_key("sid", claims["sid"]))
    assert 0 < ttl <= (3600 + h.services.settings.clock_leeway_seconds) * 1000


async def test_logout_all_revokes_all_sessions(settings_factory, harness_factory):
    h = await harness_factory(settings_factory(redis_url=REDIS_URL))
    await h.add_user("redis.all")
    await h.add_user("redis.bystander")
    sessions = [await h.login("redis.all") for _ in range(3)]
    bystander = await h.login("redis.bystander")

    await _logout(h, sessions[0]["access_token"], "/auth/logout-all")

    for session in sessions:
        assert (await h.me(session["access_token"])).status_code == 401
        assert (await h.refresh(session["refresh_token"])).status_code == 401
    assert (await h.me(bystander["access_token"])).status_code == 200
    fresh = await h.login("redis.all")  # a login after logout-all is a new, live session
    assert (await h.me(fresh["access_token"])).status_code == 200


async def test_revocation_on_one_instance_is_honoured_by_another_at_once(
    settings_factory, harness_factory, tmp_path
):
    settings_a = settings_factory(redis_url=REDIS_URL)
    settings_b = _second_instance_settings(settings_a, tmp_path / f"b-{uuid.uuid4().hex[:8]}")
    a = await harness_factory(settings_a)
    b = await harness_factory(settings_b)
    # Nothing shared but the database and Redis: not the data directory, not the signal file.
    assert settings_a.data_dir.resolve() != settings_b.data_dir.resolve()
    assert a.services.signal is not b.services.signal
    await a.add_user("redis.shared")
    first = await a.login("redis.shared")
    second = await b.login("redis.shared")
    for token in (first["access_token"], second["access_token"]):
        assert (await a.me(token)).status_code == 200
        assert (await b.me(token)).status_code == 200

    await _logout(a, first["access_token"])
    assert (await b.me(first["access_token"])).status_code == 401
    assert (await b.me(second["access_token"])).status_code == 200

    await _logout(b, second["access_token"], "/auth/logout-all")
    assert (await a.me(second["access_token"])).status_code == 401
    assert (await a.refresh(second["refresh_token"])).status_code == 401


async def test_redis_restart_is_repaired_from_the_database_on_start(
    settings_factory, harness_factory, redis_client
):
    settings = settings_factory(redis_url=REDIS_URL)
    h = await harness_factory(settings)
    await h.add_user("redis.flush")
    logged_out = await h.login("redis.flush")
    everywhere = await h.login("redis.flush")
    await _logout(h, logged_out["access_token"])
    await _logout(h, everywhere["access_token"], "/auth/logout-all")
    live = await h.login("redis.flush")
    one, every = _claims(logged_out["access_token"]), _claims(everywhere["access_token"])
    ours = [
        _key("jti", one["jti"]),
        _key("sid", one["sid"]),
        _key("sid", every["sid"]),
        _key("user", every["sub"]),
    ]
    assert await redis_client.exists(*ours) == len(ours)

    # A Redis restart without persistence: our revocation keys are gone.
    assert await redis_client.delete(*ours) == len(ours)

    restarted = await harness_factory(settings)  # a new instance re-publishes from the database
    assert await redis_client.exists(*ours) == len(ours)
    assert float(await redis_client.get(_key("user", every["sub"]))) >= every["iat"]
    for instance in (restarted, h):
        assert (await instance.me(logged_out["access_token"])).status_code == 401
        assert (await instance.me(everywhere["access_token"])).status_code == 401
        assert (await instance.me(live["access_token"])).status_code == 200


async def test_unreachable_redis_fails_closed(settings_factory, harness_factory):
    # Rate limits in memory: this is the revocation list's refusal (the rate limiter on the
    # same dead Redis refuses too: tests/edge/test_rate_limit.py).
    h = await harness_factory(
        settings_factory(redis_url=UNREACHABLE_REDIS, rate_limit_storage_url="memory://")
    )
    await h.add_user("redis.down")
    session = await h.login("redis.down")  # login does not consult the revocation list
    for _ in range(3):
        response = await h.me(session["access_token"])
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
    response = await h.client.post(
        "/auth/logout", headers={"Authorization": f"Bearer {session['access_token']}"}
    )
    assert response.status_code == 503


async def test_instance_with_revocations_serves_nothing_without_redis(
    settings_factory, harness_factory, tmp_path
):
    """It starts (Redis may come back), but it cannot load the denials, so it must deny."""
    settings = settings_factory(redis_url=REDIS_URL)
    h = await harness_factory(settings)
    await h.add_user("redis.start")
    revoked = (await h.login("redis.start"))["access_token"]
    live = (await h.login("redis.start"))["access_token"]
    await _logout(h, revoked)
    async with h.services.engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(revocations))).scalar_one() > 0

    broken = _second_instance_settings(
        settings, tmp_path / f"c-{uuid.uuid4().hex[:8]}", redis_url=UNREACHABLE_REDIS
    )
    b = await harness_factory(broken)
    for token in (revoked, live):
        assert (await b.me(token)).status_code == 503
    with pytest.raises(RevocationUnavailable):
        await b.services.revocations._load()


async def test_redis_data_loss_while_running_does_not_resurrect_revoked_tokens(
    settings_factory, harness_factory
):
    """Redis restarts without persistence: a running instance must re-load denials first."""
    h = await harness_factory(settings_factory(redis_url=REDIS_URL))
    await h.add_user("lost.redis")
    grant = await h.login("lost.redis")
    await h.client.post(
        "/auth/logout", headers={"Authorization": f"Bearer {grant['access_token']}"}
    )
    assert (await h.me(grant["access_token"])).status_code == 401

    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter("carevault:revoked:*")]
        assert keys
        await client.delete(*keys)
    finally:
        await client.aclose()
    assert (await h.me(grant["access_token"])).status_code == 401


async def test_a_denial_redis_did_not_take_reaches_every_instance(
    settings_factory, harness_factory, tmp_path, monkeypatch
):
    """The database took a denial, Redis did not (a blip): the revoking instance answers
    nothing until it has made every instance re-read the database, and then the other
    instance refuses the token too, though Redis never got the key."""
    settings_a = settings_factory(redis_url=REDIS_URL)
    settings_b = _second_instance_settings(settings_a, tmp_path / f"b-{uuid.uuid4().hex[:8]}")
    a = await harness_factory(settings_a)
    b = await harness_factory(settings_b)
    await a.add_user("redis.blip")
    tokens = await a.login("redis.blip")
    claims = a.services.verifier.verify(tokens["access_token"])
    revocations_a = a.services.revocations

    async def redis_down(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError("blip")

    monkeypatch.setattr(revocations_a, "_publish", _failing_publish)
    monkeypatch.setattr(revocations_a._redis, "delete", redis_down)
    with pytest.raises(RevocationUnavailable):
        await revocations_a.revoke_sessions([claims.sid], claims.exp + 60)
    # while Redis stays unreachable for it, instance a denies every check
    with pytest.raises(RevocationUnavailable):
        await revocations_a.is_revoked(claims)
    monkeypatch.undo()
    # Redis answers again: a's next check makes every instance reload from the database
    assert await revocations_a.is_revoked(claims) is True
    assert (await b.me(tokens["access_token"])).status_code == 401


async def _failing_publish(rows: Any) -> None:
    raise RevocationUnavailable
