"""WebAuthn over HTTP with a software authenticator: registration (the enrollment-scoped
token's login completes), the two-step login by both routes, origin / RP id / challenge /
user-verification refusals, a cloned authenticator, step-up, and removal, on SQLite and
PostgreSQL."""

from __future__ import annotations

import base64
import os
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import func, select
from webauthn.helpers import base64url_to_bytes, bytes_to_base64url

from carevault.db.tables import webauthn_credentials
from carevault.identity.roles import Role
from tests.audit.trail import audit_documents
from tests.conftest import FakeClock
from tests.identity.mfa.authenticator import SoftAuthenticator
from tests.identity.mfa.conftest import bearer

PROBLEM = "application/problem+json"
NOT_ACCEPTED = "The second factor was not accepted."
PAST_BACKOFF = 31  # after a refused factor: the login throttle backs off at most 30 s
PHR = "urn:carevault:mfa:phr"


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def _refused(response: httpx.Response, status: int = 401) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith(PROBLEM)
    body = response.json()
    assert body["status"] == status
    assert "access_token" not in body
    return body  # type: ignore[no-any-return]


async def _reasons(harness: Any, event: str) -> list[str | None]:
    """The reasons of the refusals recorded as `security.<event>`, oldest first."""
    documents = await audit_documents(harness.services.engine, f"security.{event}")
    return [(d["detail"] or {}).get("reason") for d in documents if d["outcome"] != "permit"]


async def _successes(harness: Any, event: str) -> list[dict[str, Any]]:
    documents = await audit_documents(harness.services.engine, f"security.{event}")
    return [d for d in documents if d["outcome"] == "permit"]


async def _rows(harness: Any) -> list[Any]:
    async with harness.services.engine.connect() as conn:
        query = select(webauthn_credentials).order_by(webauthn_credentials.c.created_at)
        return list((await conn.execute(query)).all())


async def _stored(harness: Any, device: SoftAuthenticator) -> Any:
    async with harness.services.engine.connect() as conn:
        return (
            await conn.execute(
                select(webauthn_credentials).where(
                    webauthn_credentials.c.credential_id == device.id
                )
            )
        ).one()


async def _register_options(harness: Any, token: str) -> dict[str, Any]:
    response = await harness.client.post("/auth/webauthn/register/options", headers=bearer(token))
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    return response.json()  # type: ignore[no-any-return]


async def register(
    harness: Any, token: str, device: SoftAuthenticator, label: str | None = None, **lie: Any
) -> httpx.Response:
    options = await _register_options(harness, token)
    body: dict[str, Any] = {"credential": device.create(options, **lie)}
    if label is not None:
        body["label"] = label
    return await harness.client.post(
        "/auth/webauthn/register/verify", json=body, headers=bearer(token)
    )


async def enroll_key(harness: Any, username: str, device: SoftAuthenticator) -> dict[str, Any]:
    """Password login of an account without a factor, then registration of `device` with the
    enrollment-scoped token. Returns the answer (the completed login's tokens among it)."""
    login = await harness.login(username)
    assert login["mfa_enrollment_required"] is True, login
    done = await register(harness, login["access_token"], device)
    assert done.status_code == 200, done.text
    return {"enrollment_token": login["access_token"], **done.json()}


async def login_options(harness: Any, mfa_token: str) -> dict[str, Any]:
    response = await harness.client.post(
        "/auth/webauthn/login/options", json={"mfa_token": mfa_token}
    )
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    return response.json()  # type: ignore[no-any-return]


async def verify(
    harness: Any, mfa_token: str, assertion: dict[str, Any], via: str = "webauthn"
) -> httpx.Response:
    if via == "webauthn":
        return await harness.client.post(
            "/auth/webauthn/login/verify", json={"mfa_token": mfa_token, "credential": assertion}
        )
    return await harness.client.post(
        "/auth/mfa/verify",
        json={"mfa_token": mfa_token, "method": "webauthn", "credential": assertion},
    )


async def key_login(
    harness: Any, username: str, device: SoftAuthenticator, via: str = "webauthn", **lie: Any
) -> tuple[str, httpx.Response]:
    first = await harness.login(username)
    assert first["mfa_required"] is True, first
    options = await login_options(harness, first["mfa_token"])
    response = await verify(harness, first["mfa_token"], device.get(options, **lie), via)
    return first["mfa_token"], response


async def test_registration_completes_the_waiting_login(mfa: Any) -> None:
    user = await mfa.add_user("dr.who", Role.physician)
    login = await mfa.login("dr.who")
    token = login["access_token"]
    options = await _register_options(mfa, token)
    assert options["rp"] == {"id": "localhost", "name": "carevault"}
    assert base64url_to_bytes(options["user"]["id"]) == user.id.encode()
    assert options["authenticatorSelection"]["userVerification"] == "required"
    assert options["authenticatorSelection"]["residentKey"] == "preferred"
    assert options["attestation"] == "none" and options["excludeCredentials"] == []
    assert len(base64url_to_bytes(options["challenge"])) == 64

    device = SoftAuthenticator()
    done = await mfa.client.post(
        "/auth/webauthn/register/verify",
        json={"credential": device.create(options), "label": "Desk key"},
        headers=bearer(token),
    )
    assert done.status_code == 200, done.text
    assert done.headers["cache-control"] == "no-store"
    body = done.json()
    assert body["credential"]["label"] == "Desk key"
    assert body["credential"]["flagged"] is False and body["credential"]["backed_up"] is False
    assert len(set(body["recovery_codes"])) == 10
    # the registration completed the login the enrollment token stood for
    claims = _claims(body["access_token"])
    assert claims["amr"] == ["pwd", "hwk"] and claims["acr"] == PHR
    assert (await mfa.me(body["access_token"])).status_code == 200
    assert body["refresh_token"]
    # and spent the enrollment token
    spent = await mfa.client.post("/auth/webauthn/register/options", headers=bearer(token))
    _refused(spent)

    row = await _stored(mfa, device)
    assert row.user_id == user.id and row.user_verified is True and row.backed_up is False
    assert row.sign_count == 0 and row.transports == ["usb", "nfc"]
    assert row.aaguid == "00000000-0000-0000-0000-000000000000"
    assert row.label == "Desk key" and row.flagged_at is None
    factors = await mfa.client.get("/auth/mfa/factors", headers=bearer(body["access_token"]))
    assert factors.json()["methods"] == ["webauthn", "recovery_code"]
    assert [k["id"] for k in factors.json()["webauthn"]] == [row.id]
    enrolled = await _successes(mfa, "mfa_enrolled")
    assert [e["detail"]["method"] for e in enrolled] == ["webauthn"]


async def test_two_step_login_with_a_key(mfa: Any, mfa_clock: FakeClock) -> None:
    await mfa.add_user("dr.who", Role.physician)
    device = SoftAuthenticator()
    await enroll_key(mfa, "dr.who", device)
    mfa_clock.advance(60)

    first = await mfa.login("dr.who")
    assert first["methods"] == ["webauthn", "recovery_code"]
    options = await login_options(mfa, first["mfa_token"])
    assert options["rpId"] == "localhost" and options["userVerification"] == "required"
    assert [c["id"] for c in options["allowCredentials"]] == [device.id]
    done = await verify(mfa, first["mfa_token"], device.get(options))
    assert done.status_code == 200, done.text
    claims = _claims(done.json()["access_token"])
    assert claims["amr"] == ["pwd", "hwk"] and claims["acr"] == PHR
    assert claims["auth_time"] == int(mfa_clock())
    assert "__Secure-carevault-refresh=" in done.headers["set-cookie"]
    row = await _stored(mfa, device)
    assert row.sign_count == 1 and row.last_used_at == mfa_clock()

    # the same through POST /auth/mfa/verify with method webauthn
    mfa_clock.advance(60)
    _, done = await key_login(mfa, "dr.who", device, via="mfa")
    assert done.status_code == 200, done.text
    assert _claims(done.json()["access_token"])["amr"] == ["pwd", "hwk"]
    assert (await _stored(mfa, device)).sign_count == 2
    verified = await _successes(mfa, "mfa_verify")
    assert [e["detail"]["method"] for e in verified] == ["webauthn", "webauthn"]


async def test_synced_passkey_is_a_software_key(mfa: Any, mfa_clock: FakeClock) -> None:
    await mfa.add_user("nurse.joy", Role.nurse)
    passkey = SoftAuthenticator(synced=True, counter=False)  # counter stays 0, as passkeys do
    enrolled = await enroll_key(mfa, "nurse.joy", passkey)
    assert _claims(enrolled["access_token"])["amr"] == ["pwd", "swk"]
    assert enrolled["credential"]["backed_up"] is True
    for _ in range(2):  # a counter that stays 0 is no regression
        mfa_clock.advance(60)
        _, done = await key_login(mfa, "nurse.joy", passkey)
        assert done.status_code == 200, done.text
        claims = _claims(done.json()["access_token"])
        assert claims["amr"] == ["pwd", "swk"] and claims["acr"] == PHR
    row = await _stored(mfa, passkey)
    assert row.sign_count == 0 and row.flagged_at is None and row.backed_up is True


async def test_wrong_origin_and_rp_id_are_refused(mfa: Any, mfa_clock: FakeClock) -> None:
    await mfa.add_user("dr.who", Role.physician)
    device = SoftAuthenticator()
    await enroll_key(mfa, "dr.who", device)
    mfa_clock.advance(60)

    first = await mfa.login("dr.who")
    token = first["mfa_token"]
    options = await login_options(mfa, token)
    phished = await verify(mfa, token, device.get(options, origin="https://evil.example"))
    assert _refused(phished)["detail"] == NOT_ACCEPTED
    assert (await _reasons(mfa, "mfa_verify"))[-1] == "webauthn_origin"
    # that attempt used the challenge up: a right answer to it is refused now
    mfa_clock.advance(PAST_BACKOFF)
    late = await verify(mfa, token, device.get(options))
    assert _refused(late)["detail"] == NOT_ACCEPTED
    assert (await _reasons(mfa, "mfa_verify"))[-1] == "webauthn_challenge_missing"

    mfa_clock.advance(PAST_BACKOFF)
    options = await login_options(mfa, token)
    other_rp = await verify(mfa, token, device.get(options, rp_id="evil.example"))
    assert _refused(other_rp)["detail"] == NOT_ACCEPTED
    assert (await _reasons(mfa, "mfa_verify"))[-1] == "webauthn_rp_id"
    row = await _stored(mfa, device)
    assert row.sign_count == 0 and row.last_used_at is None  # nothing was accepted

    # the mfa_token survived the refusals: a right assertion finishes the login
    mfa_clock.advance(PAST_BACKOFF)
    options = await login_options(mfa, token)
    done = await verify(mfa, token, device.get(options))
    assert done.status_code == 200, done.text
    assert (await _stored(mfa, device)).sign_count == device.sign_count == 4


async def test_registration_refusals(mfa: Any) -> None:
    await mfa.add_user("dr.who", Role.physician)
    token = (await mfa.login("dr.who"))["access_token"]
    lies: list[tuple[dict[str, Any], str]] = [
        ({"origin": "https://evil.example"}, "origin"),
        ({"rp_id": "evil.example"}, "rp_id"),
        ({"challenge": os.urandom(64)}, "challenge_mismatch"),
        ({"uv": False}, "user_verification"),  # a physician's key must verify the user
    ]
    for lie, _ in lies:
        response = await register(mfa, token, SoftAuthenticator(), **lie)
        assert _refused(response)["detail"] == NOT_ACCEPTED
    assert await _reasons(mfa, "mfa_enrolled") == [reason for _, reason in lies]
    assert await _rows(mfa) == []

    # a challenge answers once: after a refused response, the right one is refused too
    options = await _register_options(mfa, token)
    device = SoftAuthenticator()
    wrong = device.create(options, origin="https://evil.example")
    right = device.create(options)
    for credential in (wrong, right):
        response = await mfa.client.post(
            "/auth/webauthn/register/verify", json={"credential": credential}, headers=bearer(token)
        )
        _refused(response)
    assert (await _reasons(mfa, "mfa_enrolled"))[-2:] == ["origin", "challenge_missing"]
    assert await _rows(mfa) == []

    # the enrollment token still works, and a key registers once only
    device = SoftAuthenticator()
    done = await register(mfa, token, device)
    assert done.status_code == 200, done.text
    fresh = done.json()["access_token"]
    options = await _register_options(mfa, fresh)
    assert [c["id"] for c in options["excludeCredentials"]] == [device.id]
    with pytest.raises(ValueError, match="InvalidStateError"):
        device.create(options)  # a well-behaved authenticator stops here
    again = await mfa.client.post(
        "/auth/webauthn/register/verify",
        json={"credential": device.create(options, again=True)},
        headers=bearer(fresh),
    )
    assert _refused(again)["detail"] == NOT_ACCEPTED
    assert (await _reasons(mfa, "mfa_enrolled"))[-1] == "duplicate"
    assert [r.credential_id for r in await _rows(mfa)] == [device.id]


async def test_wrong_and_replayed_challenge_are_refused(mfa: Any, mfa_clock: FakeClock) -> None:
    await mfa.add_user("dr.who", Role.physician)
    device = SoftAuthenticator()
    await enroll_key(mfa, "dr.who", device)
    mfa_clock.advance(60)

    first = await mfa.login("dr.who")
    options = await login_options(mfa, first["mfa_token"])
    wrong = await verify(mfa, first["mfa_token"], device.get(options, challenge=os.urandom(64)))
    _refused(wrong)
    assert (await _reasons(mfa, "mfa_verify"))[-1] == "webauthn_challenge_mismatch"
    mfa_clock.advance(PAST_BACKOFF)
    options = await login_options(mfa, first["mfa_token"])
    assertion = device.get(options)
    done = await verify(mfa, first["mfa_token"], assertion)
    assert done.status_code == 200, done.text

    # replayed into a new login attempt: no challenge was issued for it, then another one was
    mfa_clock.advance(60)
    second = await mfa.login("dr.who")
    replay = await verify(mfa, second["mfa_token"], assertion)
    _refused(replay)
    assert (await _reasons(mfa, "mfa_verify"))[-1] == "webauthn_challenge_missing"
    mfa_clock.advance(PAST_BACKOFF)
    await login_options(mfa, second["mfa_token"])
    replay = await verify(mfa, second["mfa_token"], assertion)
    _refused(replay)
    assert (await _reasons(mfa, "mfa_verify"))[-1] == "webauthn_challenge_mismatch"
    # and with its own, spent mfa_token
    spent = await verify(mfa, first["mfa_token"], assertion, via="mfa")
    assert "log in again" in _refused(spent)["detail"]
    assert (await _stored(mfa, device)).sign_count == 2  # the accepted one only


async def test_cloned_authenticator_is_flagged(mfa: Any, mfa_clock: FakeClock) -> None:
    user = await mfa.add_user("dr.who", Role.physician)
    device = SoftAuthenticator()
    enrolled = await enroll_key(mfa, "dr.who", device)
    backup = SoftAuthenticator()
    added = await register(mfa, enrolled["access_token"], backup, label="Backup")
    assert added.status_code == 200, added.text
    assert added.json()["recovery_codes"] == [] and "access_token" not in added.json()

    mfa_clock.advance(60)
    assert (await key_login(mfa, "dr.who", device))[1].status_code == 200
    clone = device.clone()  # the key extracted after its first use
    mfa_clock.advance(60)
    assert (await key_login(mfa, "dr.who", device))[1].status_code == 200  # counter 2
    mfa_clock.advance(60)
    _, cloned = await key_login(mfa, "dr.who", clone)  # counter 2 again
    assert _refused(cloned)["detail"] == NOT_ACCEPTED
    assert (await _reasons(mfa, "mfa_verify"))[-1] == "webauthn_counter_regression"
    row = await _stored(mfa, device)
    assert row.flagged_at == mfa_clock() and row.sign_count == 2
    alerts = await audit_documents(mfa.services.engine, "security.webauthn_counter_regression")
    assert len(alerts) == 1
    assert alerts[0]["user"] == user.id and alerts[0]["detail"]["alert"] is True
    assert alerts[0]["detail"]["credential"] == row.id
    assert alerts[0]["detail"]["stored_count"] == 2
    assert alerts[0]["detail"]["presented_count"] == 2

    # refused from now on, the original as much as the clone; the backup key still works
    mfa_clock.advance(PAST_BACKOFF)
    first = await mfa.login("dr.who")
    options = await login_options(mfa, first["mfa_token"])
    assert [c["id"] for c in options["allowCredentials"]] == [backup.id]
    for key in (device, clone):
        response = await verify(mfa, first["mfa_token"], key.get(options))
        _refused(response)
        assert (await _reasons(mfa, "mfa_verify"))[-1] == "webauthn_flagged"
        mfa_clock.advance(PAST_BACKOFF)
        options = await login_options(mfa, first["mfa_token"])
    done = await verify(mfa, first["mfa_token"], backup.get(options))
    assert done.status_code == 200, done.text
    listed = await mfa.client.get("/auth/mfa/factors", headers=bearer(done.json()["access_token"]))
    flags = {k["id"]: k["flagged"] for k in listed.json()["webauthn"]}
    assert flags == {row.id: True, (await _stored(mfa, backup)).id: False}
    assert len(alerts) == len(
        await audit_documents(mfa.services.engine, "security.webauthn_counter_regression")
    )


async def test_user_verification_required_of_staff_only(mfa: Any, mfa_clock: FakeClock) -> None:
    await mfa.add_user("dr.who", Role.physician)
    device = SoftAuthenticator()
    await enroll_key(mfa, "dr.who", device)
    mfa_clock.advance(60)
    _, response = await key_login(mfa, "dr.who", device, uv=False)
    assert _refused(response)["detail"] == NOT_ACCEPTED
    assert (await _reasons(mfa, "mfa_verify"))[-1] == "webauthn_user_verification"
    assert (await _stored(mfa, device)).sign_count == 0

    # a patient's key need not verify the user; the login is MFA, not phishing-resistant
    await mfa.add_user("pat.one", Role.patient)
    token = (await mfa.login("pat.one"))["access_token"]
    options = await _register_options(mfa, token)
    assert options["authenticatorSelection"]["userVerification"] == "preferred"
    key = SoftAuthenticator(user_verification=False)
    done = await mfa.client.post(
        "/auth/webauthn/register/verify",
        json={"credential": key.create(options)},
        headers=bearer(token),
    )
    assert done.status_code == 200, done.text
    assert "access_token" not in done.json() and len(done.json()["recovery_codes"]) == 10
    assert (await _stored(mfa, key)).user_verified is False
    mfa_clock.advance(60)
    _, response = await key_login(mfa, "pat.one", key)
    assert response.status_code == 200, response.text
    claims = _claims(response.json()["access_token"])
    assert claims["amr"] == ["pwd", "hwk"] and claims["acr"] == "urn:carevault:mfa"


async def test_step_up_with_a_key(mfa: Any, mfa_clock: FakeClock) -> None:
    await mfa.add_user("dr.who", Role.physician)
    await mfa.add_user("dr.other", Role.physician)
    device = SoftAuthenticator()
    enrolled = await enroll_key(mfa, "dr.who", device)
    other_key = SoftAuthenticator()
    await enroll_key(mfa, "dr.other", other_key)
    stale = enrolled["access_token"]
    mfa_clock.advance(mfa.services.settings.step_up_max_age_seconds + 1)
    row = await _stored(mfa, device)

    path = f"/auth/webauthn/credentials/{row.id}"
    needs = await mfa.client.delete(path, headers=bearer(stale))
    assert _refused(needs)["type"].endswith("/step-up-required")
    # adding a key to an account that has one needs a recent factor too
    _refused(await mfa.client.post("/auth/webauthn/register/options", headers=bearer(stale)))

    options = await mfa.client.post("/auth/webauthn/step-up/options", headers=bearer(stale))
    assert options.status_code == 200, options.text
    assert [c["id"] for c in options.json()["allowCredentials"]] == [device.id]
    assertion = device.get(options.json())
    stepped = await mfa.client.post(
        "/auth/step-up", json={"method": "webauthn", "credential": assertion}, headers=bearer(stale)
    )
    assert stepped.status_code == 200, stepped.text
    assert stepped.headers["cache-control"] == "no-store"
    fresh = stepped.json()["access_token"]
    claims = _claims(fresh)
    assert claims["auth_time"] == int(mfa_clock()) and claims["acr"] == PHR
    assert "hwk" in claims["amr"] and claims["sid"] == _claims(stale)["sid"]
    # the assertion answered its challenge once
    replay = await mfa.client.post(
        "/auth/step-up", json={"method": "webauthn", "credential": assertion}, headers=bearer(stale)
    )
    assert _refused(replay)["detail"] == NOT_ACCEPTED
    assert (await _reasons(mfa, "step_up"))[-1] == "webauthn_challenge_missing"

    # the last factor of a physician stays
    last = await mfa.client.delete(path, headers=bearer(fresh))
    _refused(last, 409)
    assert await _stored(mfa, device)
    # another user's key is not found, whatever its id
    other = await _stored(mfa, other_key)
    _refused(
        await mfa.client.delete(f"/auth/webauthn/credentials/{other.id}", headers=bearer(fresh)),
        404,
    )
    assert await _stored(mfa, other_key)
    # with a second key, the first can go
    backup = SoftAuthenticator()
    added = await register(mfa, fresh, backup)
    assert added.status_code == 200, added.text
    gone = await mfa.client.delete(path, headers=bearer(fresh))
    assert gone.status_code == 204, gone.text
    assert {r.credential_id for r in await _rows(mfa)} == {backup.id, other_key.id}
    removed = await _successes(mfa, "mfa_factor_removed")
    assert [e["detail"]["method"] for e in removed] == ["webauthn"]
    _refused(await mfa.client.delete(path, headers=bearer(fresh)), 404)


@pytest.fixture
async def lenient(harness_factory: Any, settings_factory: Any, mfa_clock: FakeClock) -> Any:
    """MFA on, and a login throttle that lets a test send many bad responses in a row."""
    settings = settings_factory(
        mfa_required_roles=["physician"],
        login_max_failures=100,
        login_backoff_base_seconds=0,
        login_max_failures_per_address=1000,
        rate_limit_auth_per_address="1000/minute",
    )
    return await harness_factory(settings, mfa_clock)


def _b64(value: bytes) -> str:
    return bytes_to_base64url(value)


def _in_response(**changes: Any) -> Any:
    return lambda good: {**good, "response": {**good["response"], **changes}}


def _in_client_data(**changes: Any) -> Any:
    def change(good: dict[str, Any]) -> dict[str, Any]:
        client_data = orjson.loads(base64url_to_bytes(good["response"]["clientDataJSON"]))
        encoded = _b64(orjson.dumps({**client_data, **changes}))
        return _in_response(clientDataJSON=encoded)(good)

    return change


# Assertions broken in the ways a client might break one: each takes a right one.
ASSERTION_BREAKAGES = [
    lambda good: {},
    lambda good: "not an object",
    lambda good: {**good, "rawId": "!!!"},
    lambda good: {**good, "rawId": _b64(os.urandom(32))},  # id and rawId differ
    lambda good: {**good, "id": _b64(os.urandom(32)), "rawId": None},
    lambda good: {**good, "id": (other := _b64(os.urandom(32))), "rawId": other},  # unknown
    lambda good: {**good, "type": "password"},
    lambda good: {**good, "response": "nope"},
    _in_response(clientDataJSON=_b64(b"not json")),
    _in_response(clientDataJSON=_b64(b"\xff\xfe")),
    _in_response(clientDataJSON="%%%"),
    _in_client_data(challenge=12),
    _in_client_data(challenge="***"),
    _in_client_data(type="webauthn.create"),
    _in_client_data(origin=["https://localhost:8000"]),
    _in_response(authenticatorData=_b64(b"short")),
    _in_response(authenticatorData=""),
    _in_response(signature=_b64(b"\x30\x02\x00\x00")),
    _in_response(signature=_b64(os.urandom(80))),
    _in_response(userHandle=5),
    _in_response(clientDataJSON=None),
]


async def test_malformed_responses_are_refused_not_500(lenient: Any, mfa_clock: FakeClock) -> None:
    await lenient.add_user("dr.who", Role.physician)
    device = SoftAuthenticator()
    await enroll_key(lenient, "dr.who", device)
    first = await lenient.login("dr.who")
    token = first["mfa_token"]
    for via in ("mfa", "webauthn"):
        for breakage in ASSERTION_BREAKAGES:
            bad = breakage(device.get(await login_options(lenient, token)))
            response = await verify(lenient, token, bad, via=via)
            # the typed route refuses a wrong shape before the ceremony (422): problems both
            assert response.status_code in (401, 422), (bad, response.text)
            assert response.headers["content-type"].startswith(PROBLEM)
            assert response.status_code == 401 or via == "webauthn" or not isinstance(bad, dict)
    reasons = set(await _reasons(lenient, "mfa_verify"))
    assert reasons <= {
        "webauthn_malformed",
        "webauthn_invalid",
        "webauthn_unknown_credential",
        "webauthn_signature",
        "webauthn_client_data_type",
        "webauthn_origin",
        "webauthn_challenge_mismatch",
    }, reasons
    assert {"webauthn_malformed", "webauthn_signature", "webauthn_unknown_credential"} <= reasons
    assert (await _stored(lenient, device)).sign_count == 0

    # registration likewise
    done = await verify(lenient, token, device.get(await login_options(lenient, token)))
    assert done.status_code == 200, done.text
    fresh = done.json()["access_token"]

    breakages = [
        _in_response(attestationObject=_b64(b"\xa1\x01")),  # a truncated CBOR map
        _in_response(attestationObject="%%%"),
        _in_response(attestationObject=_b64(os.urandom(64))),
        _in_response(clientDataJSON=_b64(b"[]")),
        lambda good: {**good, "rawId": _b64(os.urandom(16))},
    ]
    for breakage in breakages:
        options = await _register_options(lenient, fresh)
        bad = breakage(SoftAuthenticator().create(options))
        response = await lenient.client.post(
            "/auth/webauthn/register/verify", json={"credential": bad}, headers=bearer(fresh)
        )
        _refused(response)
    assert set(await _reasons(lenient, "mfa_enrolled")) <= {"invalid", "malformed"}
    shapeless = await lenient.client.post(
        "/auth/webauthn/register/verify", json={"credential": {}}, headers=bearer(fresh)
    )
    _refused(shapeless, 422)
    count = select(func.count()).select_from(webauthn_credentials)
    async with lenient.services.engine.connect() as conn:
        assert (await conn.execute(count)).scalar_one() == 1


async def test_an_account_whose_only_key_was_flagged_cannot_enroll_anew(
    mfa: Any, mfa_clock: FakeClock
) -> None:
    """Whoever cloned the key may hold the password too: the password must not lead to an
    enrollment token; only a recovery code (or an admin's reset) gets back in."""
    await mfa.add_user("dr.who", Role.physician)
    device = SoftAuthenticator()
    enrolled = await enroll_key(mfa, "dr.who", device)
    mfa_clock.advance(60)
    assert (await key_login(mfa, "dr.who", device))[1].status_code == 200
    clone = device.clone()
    mfa_clock.advance(60)
    assert (await key_login(mfa, "dr.who", device))[1].status_code == 200
    mfa_clock.advance(60)
    _refused((await key_login(mfa, "dr.who", clone))[1])
    assert (await _stored(mfa, device)).flagged_at is not None

    mfa_clock.advance(PAST_BACKOFF)
    first = await mfa.login("dr.who")
    assert "mfa_enrollment_required" not in first and "access_token" not in first
    assert first["mfa_required"] is True and first["methods"] == ["recovery_code"]
    done = await mfa.client.post(
        "/auth/mfa/verify",
        json={
            "mfa_token": first["mfa_token"],
            "method": "recovery_code",
            "code": enrolled["recovery_codes"][0],
        },
    )
    assert done.status_code == 200, done.text
