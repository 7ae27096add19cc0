"""Two-step login with TOTP over HTTP: enrollment, confirmation, the mfa_token, replay, the
window, brute force, and the enrollment-scoped token, on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
from typing import Any

import orjson
from sqlalchemy import select

from carevault.db.tables import mfa_totp
from carevault.identity.roles import Role
from tests.audit.trail import audit_documents
from tests.conftest import STRONG_PASSWORD
from tests.identity.mfa.conftest import bearer, code_at, enroll_totp, mfa_login


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


async def test_staff_without_factor_gets_enrollment_token_only(mfa: Any) -> None:
    await mfa.add_user("dr.who", Role.physician)
    body = await mfa.login("dr.who")
    assert set(body) == {"mfa_enrollment_required", "access_token", "token_type", "expires_in"}
    token = body["access_token"]
    assert _claims(token)["scope"] == "carevault:mfa-enroll" and _claims(token)["roles"] == []
    # nothing but enrollment: FHIR, /auth/me, audit, break-glass, step-up all refuse it
    for method, path in (
        ("GET", "/fhir/Patient"),
        ("GET", "/auth/me"),
        ("GET", "/audit"),
        ("POST", "/access/break-glass"),
        ("POST", "/auth/step-up"),
        ("POST", "/auth/mfa/recovery-codes"),
    ):
        response = await mfa.client.request(method, path, headers=bearer(token), json={})
        assert response.status_code == 403, (path, response.text)
        assert "insufficient_scope" in response.headers["www-authenticate"]
    factors = await mfa.client.get("/auth/mfa/factors", headers=bearer(token))
    assert factors.status_code == 200 and factors.json()["methods"] == []


async def test_enrollment_then_two_step_login(mfa: Any, mfa_clock: Any) -> None:
    await mfa.add_user("dr.who", Role.physician)
    enrolled = await enroll_totp(mfa, "dr.who", mfa_clock)
    assert len(enrolled["recovery_codes"]) == 10
    assert len(set(enrolled["recovery_codes"])) == 10
    # confirmation completed the waiting login: a full session with amr pwd + otp
    claims = _claims(enrolled["access_token"])
    assert claims["amr"] == ["pwd", "otp"] and claims["acr"] == "urn:carevault:mfa"
    assert (await mfa.me(enrolled["access_token"])).status_code == 200
    # the enrollment token is spent
    again = await mfa.client.post(
        "/auth/mfa/totp/enroll", headers=bearer(enrolled["enrollment_token"])
    )
    assert again.status_code == 401

    first = await mfa.login("dr.who")
    assert first["mfa_required"] is True and first["methods"] == ["totp", "recovery_code"]
    assert "access_token" not in first
    # the mfa_token is no access token
    assert (await mfa.me(first["mfa_token"])).status_code == 401
    mfa_clock.advance(30)
    done = await mfa.client.post(
        "/auth/mfa/verify",
        json={
            "mfa_token": first["mfa_token"],
            "method": "totp",
            "code": code_at(enrolled["secret"], mfa_clock()),
        },
    )
    assert done.status_code == 200, done.text
    claims = _claims(done.json()["access_token"])
    assert claims["amr"] == ["pwd", "otp"] and claims["auth_time"] == int(mfa_clock())
    assert "__Secure-carevault-refresh=" in done.headers["set-cookie"]
    # single use: the same mfa_token cannot finish a second login
    mfa_clock.advance(30)
    reuse = await mfa.client.post(
        "/auth/mfa/verify",
        json={
            "mfa_token": first["mfa_token"],
            "method": "totp",
            "code": code_at(enrolled["secret"], mfa_clock()),
        },
    )
    assert reuse.status_code == 401
    assert reuse.headers["content-type"].startswith("application/problem+json")


async def test_totp_code_replay_is_refused(mfa: Any, mfa_clock: Any) -> None:
    await mfa.add_user("nurse.joy", Role.nurse)
    enrolled = await enroll_totp(mfa, "nurse.joy", mfa_clock)
    # the confirmation's own code is spent: same step, refused
    same = code_at(enrolled["secret"], mfa_clock())
    await mfa_login(mfa, "nurse.joy", same, expect=401)
    mfa_clock.advance(30)
    fresh = code_at(enrolled["secret"], mfa_clock())
    await mfa_login(mfa, "nurse.joy", fresh)
    mfa_clock.advance(2)
    await mfa_login(mfa, "nurse.joy", fresh, expect=401)  # replay within its window
    events = await audit_documents(mfa.services.engine, "security.mfa_verify")
    assert [e["detail"].get("reason") for e in events if e["outcome"] != "permit"][-1] == (
        "totp_replayed"
    )


async def test_totp_window_is_one_step_either_side(mfa: Any, mfa_clock: Any) -> None:
    await mfa.add_user("dr.who", Role.physician)
    enrolled = await enroll_totp(mfa, "dr.who", mfa_clock)
    secret = enrolled["secret"]
    mfa_clock.advance(300)
    now = mfa_clock()  # the start of a step; each attempt below is 2 s later (throttle backoff)
    for offset, expect in ((-60, 401), (60, 401), (-30, 200), (30, 200)):
        mfa_clock.advance(2)
        await mfa_login(mfa, "dr.who", code_at(secret, now + offset), expect=expect)


async def test_code_of_another_user_is_refused(mfa: Any, mfa_clock: Any) -> None:
    await mfa.add_user("dr.a", Role.physician)
    await mfa.add_user("dr.b", Role.physician)
    a = await enroll_totp(mfa, "dr.a", mfa_clock)
    await enroll_totp(mfa, "dr.b", mfa_clock)
    mfa_clock.advance(30)
    await mfa_login(mfa, "dr.b", code_at(a["secret"], mfa_clock()), expect=401)


async def test_brute_force_locks_the_factor(mfa: Any, mfa_clock: Any) -> None:
    await mfa.add_user("dr.who", Role.physician)
    enrolled = await enroll_totp(mfa, "dr.who", mfa_clock)
    first = await mfa.login("dr.who")
    statuses = []
    for guess in range(6):
        mfa_clock.advance(31)  # past the login throttle's backoff (at most 30 s)
        response = await mfa.client.post(
            "/auth/mfa/verify",
            json={"mfa_token": first["mfa_token"], "method": "totp", "code": f"{guess:06d}"},
        )
        statuses.append(response.status_code)
    assert statuses == [401, 401, 401, 401, 429, 429], statuses
    # locked: even the right code is refused now, and the trail says so
    mfa_clock.advance(30)
    right = await mfa.client.post(
        "/auth/mfa/verify",
        json={
            "mfa_token": first["mfa_token"],
            "method": "totp",
            "code": code_at(enrolled["secret"], mfa_clock()),
        },
    )
    assert right.status_code == 429
    assert await audit_documents(mfa.services.engine, "security.mfa_factor_locked")


async def test_secret_is_stored_encrypted(mfa: Any, mfa_clock: Any) -> None:
    await mfa.add_user("dr.who", Role.physician)
    enrolled = await enroll_totp(mfa, "dr.who", mfa_clock)
    async with mfa.services.engine.connect() as conn:
        stored = (await conn.execute(select(mfa_totp.c.secret))).scalar_one()
    assert enrolled["secret"].encode() not in stored
    assert base64.b32decode(enrolled["secret"]) not in stored


async def test_recovery_code_single_use_raises_event(mfa: Any, mfa_clock: Any) -> None:
    await mfa.add_user("dr.who", Role.physician)
    enrolled = await enroll_totp(mfa, "dr.who", mfa_clock)
    code = enrolled["recovery_codes"][0]
    done = await mfa_login(mfa, "dr.who", code, method="recovery_code")
    assert _claims(done.json()["access_token"])["amr"] == ["pwd", "otp"]
    mfa_clock.advance(2)
    await mfa_login(mfa, "dr.who", code, method="recovery_code", expect=401)
    used = await audit_documents(mfa.services.engine, "security.recovery_code_used")
    assert len(used) == 1 and used[0]["detail"]["remaining"] == 9
    # regenerating (after step-up: this login is fresh and has otp) voids the old set
    mfa_clock.advance(4)
    fresh = await mfa_login(mfa, "dr.who", enrolled["recovery_codes"][1], method="recovery_code")
    token = fresh.json()["access_token"]
    regenerated = await mfa.client.post("/auth/mfa/recovery-codes", headers=bearer(token))
    assert regenerated.status_code == 200, regenerated.text
    mfa_clock.advance(2)
    await mfa_login(mfa, "dr.who", enrolled["recovery_codes"][2], "recovery_code", expect=401)
    mfa_clock.advance(4)
    await mfa_login(mfa, "dr.who", regenerated.json()["recovery_codes"][0], "recovery_code")


async def test_patient_without_factor_logs_in_with_password(mfa: Any) -> None:
    await mfa.add_user("pat.one", Role.patient)
    body = await mfa.login("pat.one", STRONG_PASSWORD)
    assert set(body) == {"access_token", "token_type", "expires_in", "refresh_token"}
    assert _claims(body["access_token"])["amr"] == ["pwd"]


async def test_replacing_a_factor_needs_a_fresh_second_factor(mfa: Any, mfa_clock: Any) -> None:
    """A stolen access token must not plant the thief's authenticator."""
    await mfa.add_user("dr.who", Role.physician)
    enrolled = await enroll_totp(mfa, "dr.who", mfa_clock)
    token = enrolled["access_token"]
    mfa_clock.advance(301)  # the login's second factor is now too old
    refused = await mfa.client.post("/auth/mfa/totp/enroll", headers=bearer(token))
    assert refused.status_code == 401
    challenge = refused.headers["www-authenticate"]
    assert 'error="insufficient_user_authentication"' in challenge and "max_age=300" in challenge
    stepped = await mfa.client.post(
        "/auth/step-up",
        json={"method": "totp", "code": code_at(enrolled["secret"], mfa_clock())},
        headers=bearer(token),
    )
    assert stepped.status_code == 200, stepped.text
    fresh = stepped.json()["access_token"]
    assert _claims(fresh)["auth_time"] == int(mfa_clock()) and "otp" in _claims(fresh)["amr"]
    assert (
        await mfa.client.post("/auth/mfa/totp/enroll", headers=bearer(fresh))
    ).status_code == 200


def test_shipped_default_requires_mfa_for_staff() -> None:
    from carevault.config import Settings
    from carevault.identity.mfa.policy import mfa_required

    settings = Settings()
    assert sorted(settings.mfa_required_roles) == ["admin", "auditor", "nurse", "physician"]
    for role in Role:
        expected = role in (Role.admin, Role.auditor, Role.nurse, Role.physician)
        assert mfa_required(settings, [role]) is expected


async def test_expired_mfa_token_is_refused(mfa: Any, mfa_clock: Any) -> None:
    await mfa.add_user("dr.who", Role.physician)
    enrolled = await enroll_totp(mfa, "dr.who", mfa_clock)
    first = await mfa.login("dr.who")
    mfa_clock.advance(301)  # the mfa_token lives 300 s
    late = await mfa.client.post(
        "/auth/mfa/verify",
        json={
            "mfa_token": first["mfa_token"],
            "method": "totp",
            "code": code_at(enrolled["secret"], mfa_clock()),
        },
    )
    assert late.status_code == 401
    assert late.headers["content-type"].startswith("application/problem+json")
    assert "access_token" not in late.text and "set-cookie" not in late.headers
    events = await audit_documents(mfa.services.engine, "security.mfa_verify")
    assert events[-1]["outcome"] == "deny" and events[-1]["detail"]["reason"] == "mfa_token"
    for forged in ("x" * 43, "", "a" * 500):
        response = await mfa.client.post(
            "/auth/mfa/verify", json={"mfa_token": forged, "method": "totp", "code": "123456"}
        )
        assert response.status_code in (401, 422), response.text


async def test_removing_the_last_factor(mfa: Any, mfa_clock: Any) -> None:
    """A physician must keep a factor (409); a patient may remove theirs, and with it their
    recovery codes and the second step of their login."""
    await mfa.add_user("dr.who", Role.physician)
    doctor = await enroll_totp(mfa, "dr.who", mfa_clock)
    factors = await mfa.client.get("/auth/mfa/factors", headers=bearer(doctor["access_token"]))
    factor_id = factors.json()["totp"][0]["id"]
    kept = await mfa.client.delete(
        f"/auth/mfa/totp/{factor_id}", headers=bearer(doctor["access_token"])
    )
    assert kept.status_code == 409, kept.text
    assert (
        await mfa.client.get("/auth/mfa/factors", headers=bearer(doctor["access_token"]))
    ).json()["methods"] == ["totp", "recovery_code"]

    await mfa.add_user("pat.one", Role.patient)
    token = (await mfa.login("pat.one"))["access_token"]
    enroll = await mfa.client.post("/auth/mfa/totp/enroll", headers=bearer(token))
    secret = enroll.json()["otpauth_uri"].split("secret=")[1].split("&")[0]
    confirm = await mfa.client.post(
        "/auth/mfa/totp/confirm",
        json={"code": code_at(secret, mfa_clock())},
        headers=bearer(token),
    )
    assert confirm.status_code == 200 and len(confirm.json()["recovery_codes"]) == 10
    assert "access_token" not in confirm.json()  # a full token: no login was waiting
    mfa_clock.advance(30)
    done = await mfa_login(mfa, "pat.one", code_at(secret, mfa_clock()))
    fresh = done.json()["access_token"]
    listed = await mfa.client.get("/auth/mfa/factors", headers=bearer(fresh))
    removed = await mfa.client.delete(
        f"/auth/mfa/totp/{listed.json()['totp'][0]['id']}", headers=bearer(fresh)
    )
    assert removed.status_code == 204, removed.text
    assert (await mfa.client.get("/auth/mfa/factors", headers=bearer(fresh))).json() == {
        "totp": [],
        "webauthn": [],
        "recovery_codes_remaining": 0,
        "methods": [],
    }
    mfa_clock.advance(2)
    assert "refresh_token" in await mfa.login("pat.one")  # password alone again
    events = await audit_documents(mfa.services.engine, "security.mfa_factor_removed")
    assert len(events) == 1 and events[0]["detail"]["method"] == "totp"
