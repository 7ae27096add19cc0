"""Break-glass emergency access through HTTP as a client would use it, plus the service itself.

Opening needs step-up: a second factor proved within `step_up_max_age_seconds` (or
`break_glass_max_auth_age_seconds` if shorter), for every role, whatever `mfa_required_roles`
says (these tests run with it empty). Attack cases: no reason, a stale login, a password-only
login, a role that may not (also when a policy file tries to let admin in), after expiry, after
revocation, revoking someone else's grant, a reason moved between grants, the reason in logs or
in the database in plaintext.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyotp
import pytest
import structlog
from sqlalchemy import select, update

from carevault.access.break_glass import (
    GrantNotFound,
    InvalidRequest,
    NotEligible,
    PatientNotFound,
    StaleAuthentication,
)
from carevault.access.policy import DEFAULT_POLICY
from carevault.db.engine import read_connection, write_transaction
from carevault.db.tables import audit_entries, break_glass_grants
from carevault.fhir.erasure import erase_patient
from carevault.identity.mfa.totp import TotpResult
from carevault.identity.principal import Principal
from carevault.identity.roles import Role
from tests.access.fhir_world import mfa_login
from tests.audit.trail import audit_documents

REASON = "Unconscious in ED, no relatives reachable, allergy history needed now"
URL = "/access/break-glass"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def new_patient(h: Any, family: str = "Breakglass") -> str:
    stored = await h.services.store.create(
        {"resourceType": "Patient", "name": [{"family": family}], "gender": "female"}
    )
    return str(stored.body["id"])


async def user_token(h: Any, name: str, role: Role = Role.physician) -> tuple[str, str]:
    """A new account and the access token of a fresh two-step login (password and TOTP)."""
    user = await h.add_user(name, role)
    return user.id, (await mfa_login(h, name))["access_token"]


async def open_grant(h: Any, token: str, patient: str, reason: str = REASON, **extra: Any) -> Any:
    return await h.client.post(
        URL, json={"patient": patient, "reason": reason, **extra}, headers=bearer(token)
    )


def files_holding(directory: Path, needle: bytes) -> list[str]:
    """Every file under the data directory (database, WAL, keys) that holds `needle`."""
    return [p.name for p in directory.rglob("*") if p.is_file() and needle in p.read_bytes()]


def problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status
    assert "Traceback" not in response.text
    return body


# --- opening -----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", [Role.physician, Role.nurse])
async def test_clinician_opens_grant_for_patient(harness, role: Role) -> None:
    h = harness
    patient = await new_patient(h)
    user_id, token = await user_token(h, "bg.clin", role)
    before = await h.services.access_generation.current()

    response = await open_grant(h, token, patient, minutes=30)

    assert response.status_code == 201, response.text
    body = response.json()
    assert body["patient"] == patient and body["user"] == user_id
    assert body["purpose"] == "ETREAT" and body["active"] is True
    assert body["revoked_at"] is None
    assert "reason" not in body and REASON not in response.text
    assert response.headers["cache-control"] == "no-store"
    assert await h.services.break_glass.active_patients(user_id) == {patient}
    grants = await h.services.break_glass.active_grants(user_id)
    assert len(grants) == 1 and 30 * 60 - 5 < grants[0][1] - h.services.break_glass.now() <= 1800
    assert await h.services.access_generation.current() > before  # caches of the facts drop


async def test_default_duration_is_the_setting(clocked, clock) -> None:
    h = clocked
    patient = await new_patient(h)
    user_id, token = await user_token(h, "bg.default")
    response = await open_grant(h, token, patient)
    assert response.status_code == 201
    ((_, expires_at),) = await h.services.break_glass.active_grants(user_id)
    assert expires_at == pytest.approx(clock.now + 60 * 60)


async def test_without_token_is_401(harness) -> None:
    patient = await new_patient(harness)
    response = await harness.client.post(URL, json={"patient": patient, "reason": REASON})
    problem(response, 401)


@pytest.mark.parametrize(
    "payload",
    [
        {},  # nothing
        {"patient": "PLACEHOLDER"},  # no reason
        {"patient": "PLACEHOLDER", "reason": ""},
        {"patient": "PLACEHOLDER", "reason": "too short reason"},  # 16 characters
        {"patient": "PLACEHOLDER", "reason": "   nineteen chars!!    "},  # 19 after stripping
        {"patient": "PLACEHOLDER", "reason": " " * 40},
        {"patient": "PLACEHOLDER", "reason": "x" * 2001},
        {"patient": "PLACEHOLDER", "reason": 12345678901234567890123},
        {"patient": "PLACEHOLDER", "reason": ["a" * 30]},
        {"patient": "PLACEHOLDER", "reason": REASON, "minutes": 0},
        {"patient": "PLACEHOLDER", "reason": REASON, "minutes": 241},
        {"patient": "PLACEHOLDER", "reason": REASON, "minutes": -5},
        {"patient": "PLACEHOLDER", "reason": REASON, "minutes": "60"},
        {"patient": "PLACEHOLDER", "reason": REASON, "minutes": 1.5},
        {"patient": "PLACEHOLDER", "reason": REASON, "minutes": True},
        {"patient": "PLACEHOLDER", "reason": REASON, "minutes": 10**30},
        {"patient": "PLACEHOLDER", "reason": REASON, "purpose": "TREAT"},  # extra field
        {"patient": "../../etc/passwd", "reason": REASON},
        {"patient": "a" * 65, "reason": REASON},
        {"patient": "", "reason": REASON},
        {"patient": "p\u0000x", "reason": REASON},
        {"patient": 17, "reason": REASON},
        {"patient": None, "reason": REASON},
    ],
)
async def test_malformed_requests_are_refused_and_change_nothing(harness, payload) -> None:
    h = harness
    patient = await new_patient(h)
    user_id, token = await user_token(h, "bg.bad")
    payload = {k: (patient if v == "PLACEHOLDER" else v) for k, v in payload.items()}
    before = await h.services.access_generation.current()

    response = await h.client.post(URL, json=payload, headers=bearer(token))

    body = problem(response, 422)
    assert "errors" in body
    if isinstance(payload.get("reason"), str) and payload["reason"].strip():
        assert payload["reason"].strip() not in response.text  # input is never echoed
    assert await h.services.break_glass.active_patients(user_id) == frozenset()
    assert await h.services.access_generation.current() == before
    async with read_connection(h.services.engine) as conn:
        assert (await conn.execute(select(break_glass_grants))).first() is None


@pytest.mark.parametrize(
    "raw", [b"{", b"not json", b'{"patient": "x", "reason": "' + b"\xff" * 30 + b'"}']
)
async def test_unparseable_body_is_400(harness, raw: bytes) -> None:
    _, token = await user_token(harness, "bg.raw")
    response = await harness.client.post(
        URL, content=raw, headers={**bearer(token), "Content-Type": "application/json"}
    )
    assert response.status_code in (400, 422), response.text
    problem(response, response.status_code)


async def test_unknown_or_deleted_patient_is_404(harness) -> None:
    h = harness
    user_id, token = await user_token(h, "bg.unknown")
    problem(await open_grant(h, token, "no-such-patient"), 404)

    gone = await new_patient(h)
    await h.services.store.delete("Patient", gone)
    problem(await open_grant(h, token, gone), 404)

    observation = await h.services.store.create(
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "x"},
        }
    )
    # an id of another type is no Patient
    problem(await open_grant(h, token, str(observation.body["id"])), 404)
    assert await h.services.break_glass.active_patients(user_id) == frozenset()


async def test_erased_patient_is_404(harness) -> None:
    h = harness
    patient = await new_patient(h)
    await erase_patient(h.services, patient)
    _, token = await user_token(h, "bg.erased")
    problem(await open_grant(h, token, patient), 404)


@pytest.mark.parametrize(
    "role",
    [Role.registrar, Role.billing, Role.admin, Role.auditor, Role.patient, Role.service],
)
async def test_forbidden_roles_get_403_whatever_the_body(harness, role: Role) -> None:
    h = harness
    patient = await new_patient(h)
    user_id, token = await user_token(h, f"bg.{role}", role)

    problem(await open_grant(h, token, patient), 403)
    # a malformed body teaches such a role nothing more than "403" either
    problem(await h.client.post(URL, json={"x": 1}, headers=bearer(token)), 403)

    assert await h.services.break_glass.active_patients(user_id) == frozenset()
    async with read_connection(h.services.engine) as conn:
        assert (await conn.execute(select(break_glass_grants))).first() is None
    actions = [
        d["action"] for d in await audit_documents(h.services.engine) if d.get("user") == user_id
    ]
    assert "security.break_glass_denied" in actions


def assert_step_up_challenge(response: Any, max_age: int) -> None:
    body = problem(response, 401)
    assert body["type"] == "urn:carevault:problem:reauthentication-required"
    assert body["max_age"] == max_age and body["acr_values"] == "urn:carevault:mfa"
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert 'error="insufficient_user_authentication"' in challenge
    assert f"max_age={max_age}," in challenge
    assert 'acr_values="urn:carevault:mfa"' in challenge


async def test_stale_authentication_is_401_asking_for_a_new_login(clocked, clock) -> None:
    h = clocked
    patient = await new_patient(h)
    user_id, token = await user_token(h, "bg.stale")
    max_age = h.services.settings.break_glass_max_auth_age_seconds
    assert max_age == h.services.settings.step_up_max_age_seconds == 300  # the defaults
    clock.advance(max_age + 1)  # the access token (600 s) is still valid; the login is not
    assert (await h.me(token)).status_code == 200

    response = await open_grant(h, token, patient)

    assert_step_up_challenge(response, max_age)
    assert await h.services.break_glass.active_patients(user_id) == frozenset()

    # a refreshed access token keeps the old auth_time: refreshing is not re-authenticating
    tokens = await mfa_login(h, "bg.stale")  # a new login is
    assert (await open_grant(h, tokens["access_token"], patient)).status_code == 201


@pytest.mark.parametrize("role", [Role.physician, Role.nurse])
async def test_password_only_login_is_401_for_every_role(harness, role: Role) -> None:
    """No role is exempt, MFA required of it or not (mfa_required_roles is empty here)."""
    h = harness
    assert h.services.settings.mfa_required_roles == []
    patient = await new_patient(h)
    user = await h.add_user(f"bg.pwd.{role}", role)
    token = (await h.login(f"bg.pwd.{role}"))["access_token"]  # fresh, but a password only

    response = await open_grant(h, token, patient)

    assert_step_up_challenge(response, 300)
    assert await h.services.break_glass.active_patients(user.id) == frozenset()
    denied = [
        d
        for d in await audit_documents(h.services.engine, "security.break_glass_denied")
        if d.get("user") == user.id
    ]
    assert denied, "the refusal is on the record"


async def test_step_up_opens_break_glass(clocked, clock) -> None:
    """A password login, then POST /auth/step-up with a TOTP code: the new token opens it."""
    h = clocked
    patient = await new_patient(h)
    user = await h.add_user("bg.stepup")
    token = (await h.login("bg.stepup"))["access_token"]
    enrollment = await h.services.mfa.totp.enroll(user.id, user.username)
    authenticator = pyotp.parse_uri(enrollment.otpauth_uri)
    confirmed = await h.services.mfa.totp.confirm(user.id, authenticator.at(clock() - 30))
    assert confirmed is TotpResult.ok
    assert (await open_grant(h, token, patient)).status_code == 401

    stepped = await h.client.post(
        "/auth/step-up",
        json={"method": "totp", "code": authenticator.at(clock())},
        headers=bearer(token),
    )

    assert stepped.status_code == 200, stepped.text
    assert (await open_grant(h, stepped.json()["access_token"], patient)).status_code == 201


async def test_refresh_does_not_make_authentication_fresh(clocked, clock) -> None:
    h = clocked
    patient = await new_patient(h)
    await h.add_user("bg.refresh")
    tokens = await mfa_login(h, "bg.refresh")
    assert (await open_grant(h, tokens["access_token"], patient)).status_code == 201
    clock.advance(h.services.settings.break_glass_max_auth_age_seconds + 1)
    refreshed = await h.refresh(tokens["refresh_token"])
    assert refreshed.status_code == 200, refreshed.text
    problem(await open_grant(h, refreshed.json()["access_token"], patient), 401)


async def test_auth_time_in_the_future_is_not_fresh(harness) -> None:
    h = harness
    patient = await new_patient(h)
    user = await h.add_user("bg.future")
    now = int(h.services.break_glass.now())
    token, _ = h.services.issuer.issue(
        subject=user.id,
        session_id="s",
        client_id="carevault-web",
        scope="",
        roles=["physician"],
        amr=["pwd", "otp"],
        auth_time=now + 3600,
    )
    problem(await open_grant(h, token, patient), 401)


# --- expiry, revocation ------------------------------------------------------------------------


async def test_grant_ends_after_its_minutes(clocked, clock) -> None:
    h = clocked
    patient = await new_patient(h)
    user_id, token = await user_token(h, "bg.expiry")
    assert (await open_grant(h, token, patient, minutes=5)).status_code == 201
    bg = h.services.break_glass

    clock.advance(5 * 60 - 1)
    assert await bg.active_patients(user_id) == {patient}
    clock.advance(1)
    assert await bg.active_patients(user_id) == frozenset()
    assert await bg.active_grants(user_id) == []

    _, auditor = await user_token(h, "bg.expiry.auditor", Role.auditor)
    active = await h.client.get(URL, params={"active": "true"}, headers=bearer(auditor))
    assert active.status_code == 200 and active.json()["grants"] == []
    everything = (await h.client.get(URL, headers=bearer(auditor))).json()["grants"]
    assert len(everything) == 1 and everything[0]["active"] is False
    # an expired grant is no longer revocable: there is nothing to end
    gid = everything[0]["id"]
    problem(await h.client.post(f"{URL}/{gid}/revoke", headers=bearer(auditor)), 404)


async def test_auditor_revokes_at_once_and_twice_is_404(harness) -> None:
    h = harness
    patient = await new_patient(h)
    user_id, token = await user_token(h, "bg.rev")
    gid = (await open_grant(h, token, patient)).json()["id"]
    auditor_id, auditor = await user_token(h, "bg.rev.auditor", Role.auditor)
    before = await h.services.access_generation.current()

    response = await h.client.post(f"{URL}/{gid}/revoke", headers=bearer(auditor))

    assert response.status_code == 200, response.text
    assert await h.services.break_glass.active_patients(user_id) == frozenset()
    assert await h.services.access_generation.current() > before
    listed = (await h.client.get(URL, headers=bearer(auditor))).json()["grants"]
    assert listed[0]["revoked_by"] == auditor_id and listed[0]["active"] is False
    assert listed[0]["revoked_at"] is not None

    after = await h.services.access_generation.current()
    problem(await h.client.post(f"{URL}/{gid}/revoke", headers=bearer(auditor)), 404)
    assert await h.services.access_generation.current() == after  # the failed write: nothing


async def test_own_user_and_admin_may_revoke_others_may_not(harness) -> None:
    h = harness
    patient = await new_patient(h)
    owner_id, owner = await user_token(h, "bg.owner")
    _, colleague = await user_token(h, "bg.colleague")
    _, nurse = await user_token(h, "bg.nurse2", Role.nurse)
    _, registrar = await user_token(h, "bg.registrar2", Role.registrar)
    _, admin = await user_token(h, "bg.admin2", Role.admin)
    first = (await open_grant(h, owner, patient)).json()["id"]
    second = (await open_grant(h, owner, patient)).json()["id"]

    for token in (colleague, nurse, registrar):  # someone else's grant looks like no grant
        problem(await h.client.post(f"{URL}/{first}/revoke", headers=bearer(token)), 404)
    assert await h.services.break_glass.active_patients(owner_id) == {patient}

    assert (await h.client.post(f"{URL}/{first}/revoke", headers=bearer(owner))).status_code == 200
    assert await h.services.break_glass.active_patients(owner_id) == {patient}  # second holds
    assert (await h.client.post(f"{URL}/{second}/revoke", headers=bearer(admin))).status_code == 200
    assert await h.services.break_glass.active_patients(owner_id) == frozenset()


@pytest.mark.parametrize(
    "grant_id",
    ["00000000-0000-4000-8000-000000000000", "not-a-uuid", "x" * 300, "%00", "..%2F..%2Fx"],
)
async def test_revoking_unknown_or_malformed_id_is_404(harness, grant_id: str) -> None:
    _, auditor = await user_token(harness, "bg.rev.unknown", Role.auditor)
    response = await harness.client.post(f"{URL}/{grant_id}/revoke", headers=bearer(auditor))
    assert response.status_code == 404, response.text
    problem(response, 404)


async def test_revoke_without_token_is_401(harness) -> None:
    problem(await harness.client.post(f"{URL}/00000000-0000-4000-8000-000000000000/revoke"), 401)


# --- listing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", [Role.auditor, Role.admin])
async def test_auditors_list_grants_with_reasons(harness, role: Role) -> None:
    h = harness
    patient = await new_patient(h)
    other = await new_patient(h, "Second")
    user_id, token = await user_token(h, "bg.listed")
    await open_grant(h, token, patient)
    await open_grant(h, token, other, reason="  Second emergency: cardiac arrest in ward 3  ")
    _, auditor = await user_token(h, "bg.lister", role)

    response = await h.client.get(URL, headers=bearer(auditor))

    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    grants = response.json()["grants"]
    assert [g["patient"] for g in grants] == [other, patient]  # newest first
    assert grants[0]["reason"] == "Second emergency: cardiac arrest in ward 3"  # stripped
    assert grants[1]["reason"] == REASON
    assert all(g["user"] == user_id and g["active"] for g in grants)
    limited = await h.client.get(URL, params={"limit": 1}, headers=bearer(auditor))
    assert len(limited.json()["grants"]) == 1
    problem(await h.client.get(URL, params={"limit": 0}, headers=bearer(auditor)), 422)
    problem(await h.client.get(URL, params={"active": "maybe"}, headers=bearer(auditor)), 422)


@pytest.mark.parametrize(
    "role",
    [Role.physician, Role.nurse, Role.registrar, Role.billing, Role.patient, Role.service],
)
async def test_listing_is_403_for_everyone_else(harness, role: Role) -> None:
    h = harness
    patient = await new_patient(h)
    _, clinician = await user_token(h, "bg.someone")
    await open_grant(h, clinician, patient)
    _, token = await user_token(h, f"bg.list.{role}", role)
    response = await h.client.get(URL, headers=bearer(token))
    problem(response, 403)
    assert REASON not in response.text and patient not in response.text


async def test_listing_without_token_is_401(harness) -> None:
    problem(await harness.client.get(URL), 401)


# --- where the reason is (not) -----------------------------------------------------------------


async def test_reason_is_never_in_logs_events_or_database_plaintext(harness) -> None:
    h = harness
    patient = await new_patient(h)
    marker = "Marker-Qz7Kx reason text of a real emergency"
    _, token = await user_token(h, "bg.leak")
    _, auditor = await user_token(h, "bg.leak.auditor", Role.auditor)

    with structlog.testing.capture_logs() as logs:
        gid = (await open_grant(h, token, patient, reason=marker)).json()["id"]
        listed = await h.client.get(URL, headers=bearer(auditor))
        await h.client.post(f"{URL}/{gid}/revoke", headers=bearer(auditor))
        await h.services.alerts.drain()

    assert marker in listed.text  # the auditor sees it...
    assert logs and marker not in repr(logs)  # ...the log never does
    async with read_connection(h.services.engine) as conn:
        row = (await conn.execute(select(break_glass_grants))).one()
        assert marker.encode() not in bytes(row.reason)
        assert all(marker not in str(value) for value in row)
        for entry in (await conn.execute(select(audit_entries))).all():
            assert marker not in repr(tuple(entry))
    if h.services.engine.dialect.name == "sqlite":
        assert files_holding(Path(h.services.settings.data_dir), marker.encode()) == []


async def test_erasing_the_patient_erases_the_reason(harness) -> None:
    h = harness
    patient = await new_patient(h)
    kept = await new_patient(h, "Kept")
    _, token = await user_token(h, "bg.erase")
    await open_grant(h, token, patient)
    await open_grant(h, token, kept)
    await erase_patient(h.services, patient)
    _, auditor = await user_token(h, "bg.erase.auditor", Role.auditor)

    response = await h.client.get(URL, headers=bearer(auditor))

    assert response.status_code == 200
    reasons = {g["patient"]: g["reason"] for g in response.json()["grants"]}
    assert reasons == {patient: None, kept: REASON}


async def test_reason_ciphertext_is_bound_to_its_grant(harness) -> None:
    h = harness
    patient = await new_patient(h)
    _, token = await user_token(h, "bg.swap")
    await open_grant(h, token, patient, reason="First reason of at least twenty chars")
    await open_grant(h, token, patient, reason="Second reason of at least twenty chars")
    async with write_transaction(h.services.engine) as conn:
        rows = await conn.execute(select(break_glass_grants.c.id, break_glass_grants.c.reason))
        (a_id, a), (b_id, b) = rows.all()
        for gid, value in ((a_id, b), (b_id, a)):  # swap the ciphertexts
            await conn.execute(
                update(break_glass_grants)
                .where(break_glass_grants.c.id == gid)
                .values(reason=value)
            )
    grants = await h.services.break_glass.list_grants()
    assert [g.reason for g in grants] == [None, None]


# --- the service itself ------------------------------------------------------------------------


def principal(
    user_id: str, *roles: str, auth_time: float, amr: tuple[str, ...] = ("pwd", "otp")
) -> Any:
    return Principal(
        user_id=user_id,
        client_id="carevault-web",
        roles=tuple(roles),
        scopes=(),
        amr=amr,
        auth_time=int(auth_time),
        session_id="s",
        token_id="t",
        token_expires_at=int(auth_time) + 600,
    )


async def test_service_checks_without_http(services) -> None:
    bg = services.break_glass
    patient = str(
        (await services.store.create({"resourceType": "Patient", "gender": "male"})).body["id"]
    )
    doctor = await services.accounts.add_user(
        "svc.doctor", "correct-Horse-battery-staple-91", Role.physician
    )
    now = bg.now()
    fresh = principal(doctor.id, "physician", auth_time=now)

    with pytest.raises(NotEligible):
        await bg.open(principal(doctor.id, "billing", auth_time=now), patient, REASON)
    with pytest.raises(NotEligible):
        await bg.open(principal(doctor.id, "nobody", auth_time=now), patient, REASON)
    with pytest.raises(NotEligible):  # only emergency treatment is a purpose for it
        await bg.open(fresh, patient, REASON, purpose="HPAYMT")
    with pytest.raises(StaleAuthentication):
        await bg.open(principal(doctor.id, "physician", auth_time=now - 301), patient, REASON)
    with pytest.raises(StaleAuthentication):
        await bg.open(
            principal(doctor.id, "physician", auth_time=now, amr=("pwd",)), patient, REASON
        )
    with pytest.raises(InvalidRequest):
        await bg.open(fresh, patient, "short")
    with pytest.raises(InvalidRequest):
        await bg.open(fresh, patient, REASON, minutes=241)
    with pytest.raises(InvalidRequest):
        await bg.open(fresh, "bad/id", REASON)
    with pytest.raises(PatientNotFound):
        await bg.open(fresh, "missing", REASON)
    assert await bg.active_patients(doctor.id) == frozenset()

    grant = await bg.open(fresh, patient, REASON, minutes=1)
    assert grant.reason is None  # the returned grant never carries the reason
    assert await bg.active_patients(doctor.id) == {patient}
    assert await bg.active_patients(doctor.id, now=grant.expires_at) == frozenset()
    await bg.revoke(grant.id, doctor.id, only_own=True)
    with pytest.raises(GrantNotFound):
        await bg.revoke(grant.id, doctor.id)


async def test_policy_file_cannot_open_break_glass_to_admin_or_billing(
    settings_factory, tmp_path
) -> None:
    text = DEFAULT_POLICY.read_text()
    text = text.replace(
        'purposes = ["HOPERAT", "TREAT"]',
        'purposes = ["HOPERAT", "TREAT", "ETREAT"]\nbreak_glass = true',
    )
    text = text.replace(
        'purposes = ["HPAYMT", "HOPERAT"]',
        'purposes = ["HPAYMT", "HOPERAT", "ETREAT"]\nbreak_glass = true',
    )
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(text)
    settings = settings_factory(access_policy_file=policy_file)
    from carevault.runtime import build_services

    # the server refuses to start on such a policy, naming the role
    with pytest.raises(ValueError, match="break_glass may never"):
        build_services(settings)


async def test_a_role_without_break_glass_in_policy_may_not(settings_factory, tmp_path) -> None:
    text = DEFAULT_POLICY.read_text().replace("break_glass = true", "break_glass = false")
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(text)
    settings = settings_factory(access_policy_file=policy_file)
    from carevault.runtime import build_services

    services = build_services(settings)
    try:
        with pytest.raises(NotEligible):
            services.break_glass.check_principal(
                principal("u", "physician", auth_time=services.break_glass.now())
            )
    finally:
        await services.close()


async def test_a_second_factor_is_required_of_every_eligible_role(services) -> None:
    bg = services.break_glass
    now = bg.now()
    for role in ("physician", "nurse"):
        for amr in (("pwd",), (), ("pwd", "sms"), ("pwd", "fpt")):  # none is a second factor here
            with pytest.raises(StaleAuthentication) as caught:
                bg.check_principal(principal("u", role, auth_time=now, amr=amr))
            assert caught.value.max_age == 300
        for amr in (("pwd", "otp"), ("pwd", "hwk"), ("swk",)):
            bg.check_principal(principal("u", role, auth_time=now, amr=amr))
        # auth_time is whole seconds and this clock runs: a second's margin either side
        bg.check_principal(principal("u", role, auth_time=now - 299))
        with pytest.raises(StaleAuthentication):
            bg.check_principal(principal("u", role, auth_time=now - 302))


@pytest.mark.parametrize(("step_up", "break_glass", "expected"), [(600, 120, 120), (60, 300, 60)])
async def test_max_age_is_the_shorter_of_the_two_settings(
    settings_factory, step_up: int, break_glass: int, expected: int
) -> None:
    from carevault.runtime import build_services

    services = build_services(
        settings_factory(
            step_up_max_age_seconds=step_up, break_glass_max_auth_age_seconds=break_glass
        )
    )
    try:
        bg = services.break_glass
        now = bg.now()
        assert bg.max_age == expected
        bg.check_principal(principal("u", "physician", auth_time=now - expected + 1))
        with pytest.raises(StaleAuthentication) as caught:
            bg.check_principal(principal("u", "physician", auth_time=now - expected - 2))
        assert caught.value.max_age == expected
    finally:
        await services.close()
