"""The admin API (`/admin/users/{username}/...`) with MFA as shipped (staff must have it): who
may call it (admins, with step-up), what a reset and a role change do to the user's sessions
and factors, and what every refusal looks like. On SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest

from carevault.config import Settings
from carevault.identity.roles import Role
from tests.audit.trail import audit_documents
from tests.conftest import FakeClock
from tests.identity.mfa.conftest import bearer, code_at, enroll_totp, mfa_login

ROUTES = [
    ("POST", "/admin/users/{}/mfa-reset", None),
    ("PUT", "/admin/users/{}/roles", {"roles": ["nurse"]}),
    ("POST", "/admin/users/{}/disable", None),
    ("POST", "/admin/users/{}/enable", None),
]


@pytest.fixture
def admin_clock() -> FakeClock:
    return FakeClock(1_800_000_000.0)


@pytest.fixture
async def h(harness_factory: Any, settings_factory: Any, admin_clock: FakeClock) -> Any:
    settings = settings_factory(mfa_required_roles=list(Settings().mfa_required_roles))
    return await harness_factory(settings, admin_clock)


async def staff(h: Any, username: str, role: Role, clock: FakeClock) -> dict[str, Any]:
    """A staff account with TOTP, signed in a moment ago (its token passes step-up)."""
    await h.add_user(username, role)
    enrolled = await enroll_totp(h, username, clock)
    return {"user": await h.services.users.by_username(username), **enrolled}


def problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers["cache-control"] == "no-store"
    body: dict[str, Any] = response.json()
    assert body["status"] == status and "Traceback" not in response.text
    return body


async def call(h: Any, token: str | None, method: str, path: str, body: Any) -> Any:
    headers = bearer(token) if token else {}
    return await h.client.request(method, path, json=body, headers=headers)


async def test_non_admins_get_403_and_are_recorded(h: Any, admin_clock: FakeClock) -> None:
    target = await h.add_user("the.target", Role.physician)
    doctor = await staff(h, "not.admin", Role.physician, admin_clock)  # fresh MFA, still no
    await h.add_user("front.desk", Role.registrar)  # no MFA required of it: a password login
    desk = (await h.login("front.desk"))["access_token"]
    for token in (doctor["access_token"], desk):
        for method, path, body in ROUTES:
            problem(await call(h, token, method, path.format("the.target"), body), 403)
            # an unknown user answers the same: a non-admin learns nothing of the accounts
            problem(await call(h, token, method, path.format("no.such.user"), body), 403)
    denied = await audit_documents(h.services.engine, "security.admin_api")
    assert {d["user"] for d in denied} == {doctor["user"].id, (await by_name(h, "front.desk")).id}
    assert len(denied) == 2 * 2 * len(ROUTES)
    assert (await h.services.users.by_id(target.id)).roles == ("physician",)


async def test_without_token_401(h: Any) -> None:
    for method, path, body in ROUTES:
        problem(await call(h, None, method, path.format("the.target"), body), 401)


async def test_admin_without_step_up_gets_401(h: Any, admin_clock: FakeClock) -> None:
    await h.add_user("the.target", Role.physician)
    admin = await staff(h, "the.admin", Role.admin, admin_clock)
    admin_clock.advance(301)  # the token is still valid (600 s), its MFA is not recent
    assert (await h.me(admin["access_token"])).status_code == 200
    for method, path, body in ROUTES:
        response = await call(h, admin["access_token"], method, path.format("the.target"), body)
        refused = problem(response, 401)
        assert refused["max_age"] == 300 and refused["acr_values"] == "urn:carevault:mfa"
        challenge = response.headers["www-authenticate"]
        assert 'error="insufficient_user_authentication"' in challenge
        assert "max_age=300" in challenge and 'acr_values="urn:carevault:mfa"' in challenge
    assert len(await audit_documents(h.services.engine, "security.step_up_required")) == 4
    # an enrollment-scoped token of an admin without a factor is no way in either
    await h.add_user("new.admin", Role.admin)
    enrolling = await h.login("new.admin")
    assert enrolling["mfa_enrollment_required"] is True
    response = await call(
        h, enrolling["access_token"], "POST", "/admin/users/the.target/mfa-reset", None
    )
    assert response.status_code == 403, response.text


async def test_mfa_reset_forces_re_enrollment(h: Any, admin_clock: FakeClock) -> None:
    doctor = await staff(h, "lost.phone", Role.physician, admin_clock)
    admin_clock.advance(30)
    second = await mfa_login(h, "lost.phone", code_at(doctor["secret"], admin_clock()))
    sessions = [doctor, second.json()]
    admin = await staff(h, "the.admin", Role.admin, admin_clock)

    response = await call(
        h, admin["access_token"], "POST", "/admin/users/lost.phone/mfa-reset", None
    )

    assert response.status_code == 200, response.text
    assert response.json()["username"] == "lost.phone" and response.json()["mfa_reset"] is True
    assert response.headers["cache-control"] == "no-store"
    for session in sessions:  # every session is dead, access and refresh tokens alike
        assert (await h.me(session["access_token"])).status_code == 401
        assert (await h.refresh(session["refresh_token"])).status_code == 401
    user_id = doctor["user"].id
    assert await h.services.mfa.totp.factors(user_id) == []
    assert await h.services.mfa.recovery.remaining(user_id) == 0
    # the next login enrolls a factor again; the old authenticator is worth nothing
    admin_clock.advance(30)
    again = await h.login("lost.phone")
    assert again["mfa_enrollment_required"] is True and "refresh_token" not in again
    (event,) = await audit_documents(h.services.engine, "security.mfa_reset")
    assert event["user"] == user_id and event["detail"]["by"] == admin["user"].id
    assert event["detail"]["sessions"] == 2
    # and a new factor works as the first one did
    admin_clock.advance(30)
    renewed = await enroll_totp(h, "lost.phone", admin_clock)
    assert (await h.me(renewed["access_token"])).status_code == 200


async def test_role_change_ends_sessions(h: Any, admin_clock: FakeClock) -> None:
    doctor = await staff(h, "moving.on", Role.physician, admin_clock)
    admin = await staff(h, "the.admin", Role.admin, admin_clock)
    assert (await h.me(doctor["access_token"])).json()["roles"] == ["physician"]

    response = await call(
        h, admin["access_token"], "PUT", "/admin/users/moving.on/roles", {"roles": ["nurse"]}
    )

    assert response.status_code == 200, response.text
    assert response.json()["roles"] == ["nurse"]
    assert (await h.me(doctor["access_token"])).status_code == 401
    assert (await h.refresh(doctor["refresh_token"])).status_code == 401
    # the factor stays: the next login is two-step, with the new role
    admin_clock.advance(30)
    fresh = await mfa_login(h, "moving.on", code_at(doctor["secret"], admin_clock()))
    assert (await h.me(fresh.json()["access_token"])).json()["roles"] == ["nurse"]
    (event,) = await audit_documents(h.services.engine, "security.user_role_changed")
    assert event["user"] == doctor["user"].id and event["detail"]["by"] == admin["user"].id
    assert event["detail"]["roles"] == ["nurse"] and event["detail"]["previous"] == ["physician"]


async def test_disable_and_enable(h: Any, admin_clock: FakeClock) -> None:
    doctor = await staff(h, "on.leave", Role.physician, admin_clock)
    admin = await staff(h, "the.admin", Role.admin, admin_clock)
    token = admin["access_token"]

    disabled = await call(h, token, "POST", "/admin/users/on.leave/disable", None)

    assert disabled.status_code == 200 and disabled.json()["enabled"] is False
    assert (await h.me(doctor["access_token"])).status_code == 401
    assert (await h.refresh(doctor["refresh_token"])).status_code == 401
    await h.login("on.leave", expect=401)
    enabled = await call(h, token, "POST", "/admin/users/on.leave/enable", None)
    assert enabled.status_code == 200 and enabled.json()["enabled"] is True
    admin_clock.advance(h.services.settings.login_backoff_max_seconds)  # the refused login's
    assert (await h.login("on.leave"))["mfa_required"] is True
    actions = [
        d["action"]
        for d in await audit_documents(h.services.engine)
        if d["action"] in ("security.user_disabled", "security.user_enabled")
    ]
    assert actions == ["security.user_disabled", "security.user_enabled"]
    # an admin cannot lock themself out over HTTP
    problem(await call(h, token, "POST", "/admin/users/the.admin/disable", None), 409)
    problem(await call(h, token, "PUT", "/admin/users/the.admin/roles", {"roles": ["nurse"]}), 409)
    assert (await h.me(token)).status_code == 200


@pytest.mark.parametrize(
    "username", ["NO.SUCH.USER", "x", "a" * 300, "bad name", "%00", "%C3%A9t%C3%A9"]
)
async def test_unknown_users_are_404_alike(h: Any, admin_clock: FakeClock, username: str) -> None:
    """A name no account has, and one no account could have, answer exactly as any other."""
    admin = await staff(h, "the.admin", Role.admin, admin_clock)
    for method, path, body in ROUTES:
        known = await call(h, admin["access_token"], method, path.format("no.such.user"), body)
        response = await call(h, admin["access_token"], method, path.format(username), body)
        assert problem(response, 404) == problem(known, 404)
        assert response.json()["title"] == "Not Found"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"roles": []},
        {"roles": ["superuser"]},
        {"roles": "nurse"},
        {"roles": ["nurse"], "extra": 1},
        {"roles": [None]},
        {"roles": ["nurse"] * 20},
        {"roles": ["patient"]},  # a patient account must link to its Patient
    ],
)
async def test_bad_roles_are_422_and_change_nothing(
    h: Any, admin_clock: FakeClock, body: Any
) -> None:
    target = await h.add_user("the.target", Role.physician)
    admin = await staff(h, "the.admin", Role.admin, admin_clock)
    response = await call(h, admin["access_token"], "PUT", "/admin/users/the.target/roles", body)
    problem(response, 422)
    assert "superuser" not in response.text
    assert (await h.services.users.by_id(target.id)).roles == ("physician",)


async def by_name(h: Any, username: str) -> Any:
    return await h.services.users.by_username(username)
