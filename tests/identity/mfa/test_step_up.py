"""Step-up on the high-risk actions: Patient erasure, break-glass, $everything by staff, the
admin API. Each refuses a password-only login and an MFA login older than 300 s with 401 and
`WWW-Authenticate: Bearer error="insufficient_user_authentication", max_age=300,
acr_values="urn:carevault:mfa"` (an OperationOutcome on FHIR routes, a problem document
elsewhere), records the refusal, and lets the same session through after `POST /auth/step-up`
with a TOTP code. A patient reading their own record needs none. On SQLite and PostgreSQL.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pyotp
import pytest

from carevault.config import Settings
from carevault.identity.mfa.totp import STEP_SECONDS, TotpResult
from carevault.identity.roles import Role
from tests.audit.trail import audit_documents
from tests.conftest import STRONG_PASSWORD, FakeClock
from tests.fhir.samples import care_team
from tests.identity.mfa.conftest import bearer

MAX_AGE = 300
REASON = "Unconscious in ED, no relatives reachable, allergy history needed now"


@dataclass
class Caller:
    """A signed-in user whose token does not pass step-up, and their authenticator app."""

    h: Any
    clock: FakeClock
    user: Any
    token: str
    authenticator: pyotp.TOTP

    async def step_up(self) -> str:
        response = await self.h.client.post(
            "/auth/step-up",
            json={"method": "totp", "code": self.authenticator.at(self.clock())},
            headers=bearer(self.token),
        )
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])


async def enroll(h: Any, user: Any, clock: FakeClock) -> pyotp.TOTP:
    """A confirmed TOTP factor, confirmed with the previous step's code (the current one is
    left for the next proof)."""
    enrollment = await h.services.mfa.totp.enroll(user.id, user.username)
    authenticator = pyotp.parse_uri(enrollment.otpauth_uri)
    confirmed = await h.services.mfa.totp.confirm(user.id, authenticator.at(clock() - STEP_SECONDS))
    assert confirmed is TotpResult.ok
    return authenticator


@pytest.fixture(params=["password_only", "stale"])
async def scene(
    request: pytest.FixtureRequest,
    harness_factory: Any,
    settings_factory: Any,
    mfa_clock: FakeClock,
) -> Any:
    """`password_only`: MFA required of no role, a login with the password alone (the factor
    is enrolled after it). `stale`: the shipped default, a two-step login 301 s ago."""
    if request.param == "password_only":
        settings = settings_factory()
    else:
        settings = settings_factory(mfa_required_roles=list(Settings().mfa_required_roles))
    h = await harness_factory(settings, mfa_clock)

    async def caller(username: str, role: Role, **links: Any) -> Caller:
        user = await h.add_user(username, role, **links)
        if request.param == "password_only":
            token = (await h.login(username))["access_token"]
            authenticator = await enroll(h, user, mfa_clock)
        else:
            authenticator = await enroll(h, user, mfa_clock)
            first = await h.login(username)
            done = await h.client.post(
                "/auth/mfa/verify",
                json={
                    "mfa_token": first["mfa_token"],
                    "method": "totp",
                    "code": authenticator.at(mfa_clock()),
                },
            )
            assert done.status_code == 200, done.text
            token = done.json()["access_token"]
            assert await usable(h, token)
            mfa_clock.advance(MAX_AGE + 1)
        assert await usable(h, token)  # the token itself is valid: only the login is not
        return Caller(h, mfa_clock, user, token, authenticator)

    return caller


async def usable(h: Any, token: str) -> bool:
    return bool((await h.me(token)).status_code == 200)


def challenge_params(response: Any) -> dict[str, str]:
    header = response.headers["www-authenticate"]
    assert header.startswith("Bearer ")
    return {k: v.strip('"') for k, v in re.findall(r'(\w+)=("[^"]*"|[^,\s]+)', header)}


def assert_step_up_required(response: Any, *, fhir: bool) -> None:
    assert response.status_code == 401, response.text
    params = challenge_params(response)
    assert params["error"] == "insufficient_user_authentication"
    assert params["max_age"] == str(MAX_AGE)
    assert params["acr_values"] == "urn:carevault:mfa"
    if fhir:
        assert response.headers["content-type"].startswith("application/fhir+json")
        body = response.json()
        assert body["resourceType"] == "OperationOutcome"
        assert body["issue"][0]["code"] == "login"
    else:
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["status"] == 401


async def refusals(h: Any, action: str, user_id: str) -> list[dict[str, Any]]:
    return [d for d in await audit_documents(h.services.engine, action) if d["user"] == user_id]


async def new_patient(h: Any) -> str:
    stored = await h.services.store.create(
        {
            "resourceType": "Patient",
            "name": [{"family": "Stepupson"}],
            "gender": "female",
            "managingOrganization": {"reference": "Organization/org-1"},
        }
    )
    return str(stored.body["id"])


async def test_patient_erasure(scene: Any) -> None:
    admin = await scene("erase.admin", Role.admin)
    h = admin.h
    patient = await new_patient(h)
    url = f"/fhir/Patient/{patient}?_erase=true"

    refused = await h.client.delete(url, headers=bearer(admin.token))

    assert_step_up_required(refused, fhir=True)
    assert (await h.services.store.read("Patient", patient)).body["id"] == patient
    (event,) = await refusals(h, "security.step_up_required", admin.user.id)
    assert event["outcome"] == "deny" and event["detail"]["route"] == "/fhir/Patient/{resource_id}"
    assert await refusals(h, "security.patient_erased", admin.user.id) == []

    stepped = await admin.step_up()
    erased = await h.client.delete(url, headers=bearer(stepped))
    assert erased.status_code == 200, erased.text
    assert await refusals(h, "security.patient_erased", admin.user.id)
    # the step-up is itself time-boxed
    admin.clock.advance(MAX_AGE + 1)
    assert_step_up_required(await h.client.delete(url, headers=bearer(stepped)), fhir=True)


async def test_break_glass(scene: Any) -> None:
    doctor = await scene("bg.doctor", Role.physician)
    h = doctor.h
    patient = await new_patient(h)
    body = {"patient": patient, "reason": REASON}

    refused = await h.client.post("/access/break-glass", json=body, headers=bearer(doctor.token))

    assert_step_up_required(refused, fhir=False)
    assert refused.json()["type"] == "urn:carevault:problem:reauthentication-required"
    assert await h.services.break_glass.active_patients(doctor.user.id) == frozenset()
    (event,) = await refusals(h, "security.break_glass_denied", doctor.user.id)
    assert event["detail"]["why"] == "StaleAuthentication"

    opened = await h.client.post(
        "/access/break-glass", json=body, headers=bearer(await doctor.step_up())
    )
    assert opened.status_code == 201, opened.text
    assert await h.services.break_glass.active_patients(doctor.user.id) == {patient}


@pytest.mark.parametrize("role", [Role.physician, Role.billing])
async def test_everything_by_staff(scene: Any, role: Role) -> None:
    links = {"practitioner_id": "prac-step-up"} if role is Role.physician else {}
    staff = await scene(f"everything.{role}", role, organization_id="org-1", **links)
    h = staff.h
    patient = await new_patient(h)
    await h.services.store.create(care_team(patient, "prac-step-up"))
    url = f"/fhir/Patient/{patient}/$everything"
    headers = {"X-Purpose-Of-Use": "HPAYMT"} if role is Role.billing else {}

    refused = await h.client.get(url, headers={**bearer(staff.token), **headers})

    assert_step_up_required(refused, fhir=True)
    assert "Stepupson" not in refused.text
    (event,) = await refusals(h, "security.step_up_required", staff.user.id)
    assert event["detail"]["route"] == "/fhir/Patient/{resource_id}/$everything"
    # asked before the record is looked at: a missing patient is refused the same way
    missing = await h.client.get(
        "/fhir/Patient/no-such-patient/$everything", headers={**bearer(staff.token), **headers}
    )
    assert (missing.status_code, missing.content) == (refused.status_code, refused.content)

    found = await h.client.get(url, headers={**bearer(await staff.step_up()), **headers})
    assert found.status_code == 200, found.text
    assert found.json()["entry"][0]["resource"]["id"] == patient


async def test_admin_role_change_and_mfa_reset(scene: Any) -> None:
    admin = await scene("api.admin", Role.admin)
    h = admin.h
    target = await h.add_user("api.target", Role.physician)
    requests = [
        ("PUT", "/admin/users/api.target/roles", {"roles": ["nurse"]}),
        ("POST", "/admin/users/api.target/mfa-reset", None),
    ]

    for method, path, body in requests:
        refused = await h.client.request(method, path, json=body, headers=bearer(admin.token))
        assert_step_up_required(refused, fhir=False)
    assert len(await refusals(h, "security.step_up_required", admin.user.id)) == 2
    assert (await h.services.users.by_id(target.id)).roles == ("physician",)
    assert await audit_documents(h.services.engine, "security.mfa_reset") == []

    stepped = await admin.step_up()
    for method, path, body in requests:
        done = await h.client.request(method, path, json=body, headers=bearer(stepped))
        assert done.status_code == 200, done.text
    assert (await h.services.users.by_id(target.id)).roles == ("nurse",)
    (reset,) = await audit_documents(h.services.engine, "security.mfa_reset")
    assert reset["user"] == target.id and reset["detail"]["by"] == admin.user.id


async def test_patient_reads_own_everything_without_step_up(mfa: Any, mfa_clock: FakeClock) -> None:
    patient = await new_patient(mfa)
    user = await mfa.add_user("own.record", Role.patient, patient_id=patient)
    token = (await mfa.login("own.record", STRONG_PASSWORD))["access_token"]  # password alone
    url = f"/fhir/Patient/{patient}/$everything"

    first = await mfa.client.get(url, headers=bearer(token))
    mfa_clock.advance(MAX_AGE + 1)
    later = await mfa.client.get(url, headers=bearer(token))

    for response in (first, later):
        assert response.status_code == 200, response.text
        assert response.json()["entry"][0]["resource"]["id"] == patient
    assert await refusals(mfa, "security.step_up_required", user.id) == []
    # someone else's record is no right of access: as missing as no record, no step-up asked
    other = await new_patient(mfa)
    refused = await mfa.client.get(f"/fhir/Patient/{other}/$everything", headers=bearer(token))
    missing = await mfa.client.get("/fhir/Patient/no-such/$everything", headers=bearer(token))
    assert refused.status_code == missing.status_code == 404
    assert refused.json() == missing.json()
    assert "www-authenticate" not in refused.headers
