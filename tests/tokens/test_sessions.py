"""Refresh rotation, reuse detection, grace window, expiry, logout, logout-all, account changes."""

from __future__ import annotations

import asyncio

from sqlalchemy import func, select

from carevault.db.tables import refresh_tokens
from carevault.identity.roles import Role
from carevault.tokens.refresh import hash_token
from tests.audit.trail import audit_documents


async def _family_rows(services, refresh_token) -> int:
    family = await services.refresh.family_of(refresh_token)
    async with services.engine.connect() as conn:
        return (
            await conn.execute(
                select(func.count())
                .select_from(refresh_tokens)
                .where(refresh_tokens.c.family_id == family)
            )
        ).scalar_one()


async def _event_count(services, name) -> int:
    return len(await audit_documents(services.engine, f"security.{name}"))


async def test_rotation_issues_new_pair_and_old_token_is_single_use(clocked, clock):
    await clocked.add_user("rot.user")
    first = await clocked.login("rot.user")
    clock.advance(30)  # outside the grace window from here on
    rotated = await clocked.refresh(first["refresh_token"])
    assert rotated.status_code == 200
    second = rotated.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert (await clocked.me(second["access_token"])).status_code == 200
    # Only the hash is stored: the table never holds a usable token.
    async with clocked.services.engine.connect() as conn:
        stored = set((await conn.execute(select(refresh_tokens.c.token_hash))).scalars())
    assert first["refresh_token"] not in stored
    assert hash_token(first["refresh_token"]) in stored


async def test_reuse_revokes_the_whole_family_and_only_that_family(clocked, clock):
    await clocked.add_user("victim.user")
    stolen = await clocked.login("victim.user")
    other_session = await clocked.login("victim.user")
    clock.advance(10)
    legit = (await clocked.refresh(stolen["refresh_token"])).json()
    clock.advance(10)

    replay = await clocked.refresh(stolen["refresh_token"])  # the thief replays the old token
    assert replay.status_code == 401
    # Every token descended from that login is dead: refresh and access alike.
    assert (await clocked.refresh(legit["refresh_token"])).status_code == 401
    assert (await clocked.me(legit["access_token"])).status_code == 401
    assert (await clocked.me(stolen["access_token"])).status_code == 401
    # The user's other session lives on.
    assert (await clocked.me(other_session["access_token"])).status_code == 200
    assert (await clocked.refresh(other_session["refresh_token"])).status_code == 200
    assert await _event_count(clocked.services, "refresh_reuse") == 1


async def test_concurrent_refreshes_inside_grace_succeed_once_and_agree(harness):
    await harness.add_user("two.tabs")
    grant = await harness.login("two.tabs")
    results = await asyncio.gather(*(harness.refresh(grant["refresh_token"]) for _ in range(6)))
    assert [r.status_code for r in results] == [200] * 6
    assert len({r.json()["refresh_token"] for r in results}) == 1
    assert await _family_rows(harness.services, grant["refresh_token"]) == 2  # one rotation
    successor = results[0].json()["refresh_token"]
    assert (await harness.refresh(successor)).status_code == 200


async def test_retry_after_grace_window_is_reuse(clocked, clock):
    await clocked.add_user("late.tab")
    grant = await clocked.login("late.tab")
    first = await clocked.refresh(grant["refresh_token"])
    clock.advance(4.9)
    retry = await clocked.refresh(grant["refresh_token"])
    assert retry.status_code == 200
    assert retry.json()["refresh_token"] == first.json()["refresh_token"]
    clock.advance(0.2)  # 5.1 s after first use
    assert (await clocked.refresh(grant["refresh_token"])).status_code == 401
    assert (await clocked.refresh(first.json()["refresh_token"])).status_code == 401


async def test_same_second_replay_is_caught_with_grace_off(
    settings_factory, harness_factory, clock
):
    """Keycloak #50999: a replay inside the same second slipped through; it must not here."""
    h = await harness_factory(settings_factory(refresh_grace_seconds=0), clock)
    await h.add_user("same.second")
    grant = await h.login("same.second")
    assert (await h.refresh(grant["refresh_token"])).status_code == 200
    clock.advance(0.001)
    assert (await h.refresh(grant["refresh_token"])).status_code == 401
    assert (await h.me(grant["access_token"])).status_code == 401


async def test_grace_retry_from_another_client_is_refused(services):
    from carevault.tokens.refresh import RefreshError

    user = await services.accounts.add_user(
        "cli.ent", "correct-Horse-battery-staple-91", Role.nurse
    )
    _, token = await services.refresh.start_family(
        user_id=user.id, client_id="app-a", scope="openid", amr=["pwd"], auth_time=1
    )
    await services.refresh.rotate(token, "app-a")
    try:
        await services.refresh.rotate(token, "app-b")
    except RefreshError as err:
        assert err.reason == "wrong client"
    else:
        raise AssertionError("a token bound to app-a was accepted from app-b")


async def test_idle_and_absolute_lifetimes(settings_factory, harness_factory, clock):
    h = await harness_factory(
        settings_factory(refresh_idle_ttl_seconds=600, refresh_absolute_ttl_seconds=3600), clock
    )
    await h.add_user("idle.user")
    grant = await h.login("idle.user")
    clock.advance(601)
    assert (await h.refresh(grant["refresh_token"])).status_code == 401  # idle

    token = (await h.login("idle.user"))["refresh_token"]
    for _ in range(6):  # keep it busy: 6 x 590 s = 59 min
        clock.advance(590)
        response = await h.refresh(token)
        assert response.status_code == 200
        token = response.json()["refresh_token"]
    clock.advance(100)  # past the absolute lifetime, however active
    assert (await h.refresh(token)).status_code == 401


async def test_refresh_from_cookie(harness):
    await harness.add_user("cookie.user")
    login = await harness.client.post(
        "/auth/login",
        json={"username": "cookie.user", "password": "correct-Horse-battery-staple-91"},
    )
    # httpx keeps Secure cookies only for https; send it as a browser on https would.
    cookie = login.cookies.get("__Secure-carevault-refresh") or login.json()["refresh_token"]
    response = await harness.client.post(
        "/auth/refresh", headers={"Cookie": f"__Secure-carevault-refresh={cookie}"}
    )
    assert response.status_code == 200
    assert "__Secure-carevault-refresh=" in response.headers["set-cookie"]
    missing = await harness.client.post("/auth/refresh")
    assert missing.status_code == 401


async def test_logout_ends_only_that_session(harness):
    await harness.add_user("bye.user")
    one = await harness.login("bye.user")
    two = await harness.login("bye.user")
    response = await harness.client.post(
        "/auth/logout", headers={"Authorization": f"Bearer {one['access_token']}"}
    )
    assert response.status_code == 204
    assert (await harness.me(one["access_token"])).status_code == 401
    assert (await harness.refresh(one["refresh_token"])).status_code == 401
    assert (await harness.me(two["access_token"])).status_code == 200


async def test_logout_all_kills_tokens_issued_a_second_earlier_at_once(clocked, clock):
    await clocked.add_user("all.out")
    one = await clocked.login("all.out")
    clock.advance(1)
    two = await clocked.login("all.out")  # issued a second before logout-all
    response = await clocked.client.post(
        "/auth/logout-all", headers={"Authorization": f"Bearer {two['access_token']}"}
    )
    assert response.status_code == 204
    for grant in (one, two):
        assert (await clocked.me(grant["access_token"])).status_code == 401
        assert (await clocked.refresh(grant["refresh_token"])).status_code == 401
    # A login in the very same second afterwards is a new session and works.
    fresh = await clocked.login("all.out")
    assert (await clocked.me(fresh["access_token"])).status_code == 200
    assert await _event_count(clocked.services, "logout_all") == 1


async def test_disable_user_revokes_everything_at_once(clocked, clock):
    await clocked.add_user("to.disable", Role.nurse)
    grant = await clocked.login("to.disable")
    await clocked.services.accounts.set_enabled("to.disable", False)
    assert (await clocked.me(grant["access_token"])).status_code == 401
    assert (await clocked.refresh(grant["refresh_token"])).status_code == 401
    await clocked.login("to.disable", expect=401)
    await clocked.services.accounts.set_enabled("to.disable", True)
    clock.advance(2)  # past the backoff that the refused login started
    await clocked.login("to.disable")


async def test_role_change_revokes_and_new_login_carries_new_role(harness):
    await harness.add_user("role.change", Role.nurse, organization_id="org-1")
    grant = await harness.login("role.change")
    await harness.services.accounts.set_role("role.change", Role.billing)
    assert (await harness.me(grant["access_token"])).status_code == 401
    assert (await harness.refresh(grant["refresh_token"])).status_code == 401
    fresh = await harness.login("role.change")
    assert (await harness.me(fresh["access_token"])).json()["roles"] == ["billing"]


async def test_password_reset_revokes_sessions(clocked, clock):
    await clocked.add_user("reset.me", Role.registrar)
    grant = await clocked.login("reset.me")
    await clocked.services.accounts.reset_password("reset.me", "another-Long-passphrase-77")
    assert (await clocked.me(grant["access_token"])).status_code == 401
    await clocked.login("reset.me", expect=401)
    clock.advance(2)
    await clocked.login("reset.me", "another-Long-passphrase-77")


async def test_revocation_is_seen_by_another_process_view(settings, harness_factory):
    """Two app instances on one data dir (two workers): a logout on one is denied by the other."""
    a = await harness_factory(settings)
    b = await harness_factory(settings)
    await a.add_user("multi.worker")
    grant = await a.login("multi.worker")
    assert (await b.me(grant["access_token"])).status_code == 200
    await a.client.post(
        "/auth/logout-all", headers={"Authorization": f"Bearer {grant['access_token']}"}
    )
    assert (await b.me(grant["access_token"])).status_code == 401


async def test_revocation_check_fails_closed(harness):
    await harness.add_user("fail.closed")
    grant = await harness.login("fail.closed")
    harness.services.signal.bump()  # force a re-read of the revocation list ...
    await harness.services.engine.dispose()
    broken = harness.services.revocations
    original = broken._engine  # ... from a database that cannot answer

    from sqlalchemy.ext.asyncio import create_async_engine

    broken._engine = create_async_engine("sqlite+aiosqlite:////nonexistent/dir/x.db")
    try:
        response = await harness.me(grant["access_token"])
        assert response.status_code == 503
        assert "access" not in response.text
    finally:
        await broken._engine.dispose()
        broken._engine = original
