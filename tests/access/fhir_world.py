"""A small world of FHIR records and users, built over HTTP by a service principal, for the
access-control HTTP tests (tests/access/test_fhir_access_*.py).

Organizations X and Y; practitioners dr-a (in A's CareTeam), dr-c (in A's CareTeam, but A's
Consent denies them), dr-other (no relationship), a nurse of organization X (in no CareTeam);
patient A (managed by X) and B (managed by Y, nobody's patient) with an Encounter, Observation
and Condition each; a PSY-labelled Observation of A; an Observation of A whose `encounter`
points at B's Encounter (an `_include` vehicle) and one whose `encounter` points at the PSY
Observation (the same, for labels). B's records carry the non-sensitive label
v3-Confidentiality N, so that `_security` can match B alone.

Every response through the harness client is checked: no 5xx, ever (`NoServerErrors`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
import pyotp

from carevault.identity.mfa.totp import STEP_SECONDS, TotpResult
from carevault.identity.roles import Role
from tests.conftest import STRONG_PASSWORD

FHIR = "application/fhir+json"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONF = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
OBS_CAT = "http://terminology.hl7.org/CodeSystem/observation-category"
COND_CAT = "http://terminology.hl7.org/CodeSystem/condition-category"
COND_CLIN = "http://terminology.hl7.org/CodeSystem/condition-clinical"
ENC_CLASS = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
MRN = "http://hospital.example/mrn"
PSY_LABEL = {"system": ACT, "code": "PSY"}
B_LABEL = {"system": CONF, "code": "N"}
MISSING = "no-such-record-42"

# names that must never reach a caller who may not see the patient (checked in response text)
A_FAMILY = "Alphaworldson"
B_FAMILY = "Betaworldsky"

# Headers that differ between any two responses and so say nothing about a record.
# ratelimit: what remains of the caller's budgets, which every request lowers.
VOLATILE_HEADERS = frozenset(
    {"date", "x-request-id", "x-correlation-id", "traceparent", "ratelimit"}
)


class ServerError(AssertionError):
    pass


class NoServerErrors:
    """An httpx response hook: any 5xx fails the test at the request that caused it."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def __call__(self, response: httpx.Response) -> None:
        if response.status_code >= 500:
            await response.aread()
            text = f"{response.request.method} {response.request.url} -> {response.status_code}"
            self.seen.append(text)
            raise ServerError(f"{text}: {response.text[:500]}")


def bearer(token: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **extra}


def coding(system: str, code: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code}]}


def patient_body(which: str, organization: str) -> dict[str, Any]:
    a = which == "A"
    body: dict[str, Any]
    body = {
        "resourceType": "Patient",
        "identifier": [{"system": MRN, "value": "MRN-A-1001" if a else "MRN-B-2002"}],
        "name": [
            {"family": A_FAMILY if a else B_FAMILY, "given": ["Aurelia" if a else "Bertrand"]}
        ],
        "gender": "female" if a else "male",
        "birthDate": "1971-02-03" if a else "1988-09-10",
        "telecom": [
            {"system": "phone", "value": "+15550001111" if a else "+15550002222"},
            {"system": "email", "value": "a@alpha.example" if a else "b@beta.example"},
        ],
        "address": [
            {
                "line": ["1 Alpha Road" if a else "2 Beta Street"],
                "city": "Alphaville" if a else "Betatown",
                "postalCode": "11111" if a else "22222",
            }
        ],
        "managingOrganization": {"reference": f"Organization/{organization}"},
    }
    if not a:
        body["meta"] = {"security": [B_LABEL]}
    return body


def encounter_body(which: str, patient: str) -> dict[str, Any]:
    a = which == "A"
    body: dict[str, Any]
    body = {
        "resourceType": "Encounter",
        "status": "in-progress" if a else "finished",
        "class": {"system": ENC_CLASS, "code": "AMB" if a else "IMP"},
        "type": [coding(SNOMED, "185349003" if a else "32485007")],
        "subject": {"reference": f"Patient/{patient}"},
        "period": {"start": "2024-05-01T09:00:00Z" if a else "2019-03-04T09:00:00Z"},
    }
    if not a:
        body["meta"] = {"security": [B_LABEL]}
    return body


def observation_body(
    which: str,
    patient: str,
    encounter: str | None = None,
    labels: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    a = which == "A"
    body: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final" if a else "amended",
        "category": [coding(OBS_CAT, "vital-signs" if a else "laboratory")],
        "code": coding(LOINC, "8867-4" if a else "2339-0"),
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": "2024-05-01T10:30:00Z" if a else "2019-03-04T10:30:00Z",
        "valueQuantity": {"value": 72 if a else 5.4, "unit": "1"},
    }
    if labels is not None:
        body["meta"] = {"security": labels}
    elif not a:
        body["meta"] = {"security": [B_LABEL]}
    if encounter is not None:
        body["encounter"] = {"reference": encounter}
    return body


def condition_body(which: str, patient: str, encounter: str | None = None) -> dict[str, Any]:
    a = which == "A"
    body: dict[str, Any] = {
        "resourceType": "Condition",
        "clinicalStatus": coding(COND_CLIN, "active" if a else "resolved"),
        "category": [coding(COND_CAT, "problem-list-item" if a else "encounter-diagnosis")],
        "code": coding(SNOMED, "38341003" if a else "44054006"),
        "subject": {"reference": f"Patient/{patient}"},
        "onsetDateTime": "2023-01-15" if a else "2018-01-15",
        "recordedDate": "2023-02-01" if a else "2018-06-01",
    }
    if not a:
        body["meta"] = {"security": [B_LABEL]}
    if encounter is not None:
        body["encounter"] = {"reference": encounter}
    return body


def care_team_body(patient: str, practitioners: list[str], status: str = "active") -> dict:
    return {
        "resourceType": "CareTeam",
        "status": status,
        "subject": {"reference": f"Patient/{patient}"},
        "participant": [{"member": {"reference": f"Practitioner/{p}"}} for p in practitioners],
    }


def consent_body(patient: str, actor: str | None, status: str = "active") -> dict[str, Any]:
    provision: dict[str, Any] = {"type": "deny"}
    if actor is not None:
        provision["actor"] = [
            {
                "role": coding(
                    "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "PRCP"
                ),
                "reference": {"reference": actor},
            }
        ]
    return {
        "resourceType": "Consent",
        "status": status,
        "scope": coding("http://terminology.hl7.org/CodeSystem/consentscope", "patient-privacy"),
        "category": [coding(LOINC, "59284-0")],
        "patient": {"reference": f"Patient/{patient}"},
        "policyRule": coding(ACT, "OPTIN"),
        "provision": provision,
    }


@dataclass
class World:
    h: Any
    svc: str = ""  # service token
    ids: dict[str, str] = field(default_factory=dict)  # name -> resource id
    refs: dict[str, str] = field(default_factory=dict)  # name -> "Type/id"
    users: dict[str, Any] = field(default_factory=dict)  # name -> User
    tokens: dict[str, str] = field(default_factory=dict)  # name -> access token
    hook: NoServerErrors = field(default_factory=NoServerErrors)

    @property
    def client(self) -> httpx.AsyncClient:
        return self.h.client  # type: ignore[no-any-return]

    # --- requests ------------------------------------------------------------------------

    async def get(self, who: str, url: str, **headers: str) -> httpx.Response:
        return await self.client.get(url, headers=bearer(self.tokens[who], **headers))

    async def post(
        self, who: str, url: str, body: Any, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        return await self.client.post(
            url,
            json=body,
            headers=bearer(self.tokens[who], **{"Content-Type": FHIR, **(headers or {})}),
        )

    async def put(
        self, who: str, url: str, body: Any, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        return await self.client.put(
            url,
            json=body,
            headers=bearer(self.tokens[who], **{"Content-Type": FHIR, **(headers or {})}),
        )

    async def delete(self, who: str, url: str) -> httpx.Response:
        return await self.client.delete(url, headers=bearer(self.tokens[who]))

    async def create(self, body: dict[str, Any], name: str | None = None) -> str:
        response = await self.post("svc", f"/fhir/{body['resourceType']}", body)
        assert response.status_code == 201, response.text
        rid = str(response.json()["id"])
        if name is not None:
            self.ids[name] = rid
            self.refs[name] = f"{body['resourceType']}/{rid}"
        return rid

    async def replace(self, name: str, body: dict[str, Any]) -> httpx.Response:
        resource_type = body["resourceType"]
        body = {**body, "id": self.ids[name]}
        response = await self.put("svc", f"/fhir/{resource_type}/{self.ids[name]}", body)
        assert response.status_code == 200, response.text
        return response

    async def search(self, who: str, url: str, **headers: str) -> dict[str, Any]:
        response = await self.get(who, url, **headers)
        assert response.status_code == 200, (url, response.text)
        return response.json()  # type: ignore[no-any-return]

    async def user(self, name: str, role: Role, **links: Any) -> None:
        self.users[name] = await self.h.add_user(name, role, **links)
        await self.relogin(name)

    async def relogin(self, name: str) -> str:
        """A fresh login: with a second factor for staff (every role but patient), so that
        step-up actions ($everything, break-glass) are open to them for the next 5 minutes."""
        if Role.patient in self.users[name].roles:
            self.tokens[name] = (await self.h.login(name))["access_token"]
        else:
            self.tokens[name] = (await mfa_login(self.h, name))["access_token"]
        return self.tokens[name]

    def ref(self, name: str) -> str:
        return self.refs[name]


async def mfa_login(h: Any, username: str, password: str = STRONG_PASSWORD) -> dict[str, Any]:
    """A fresh two-step login (amr pwd + otp, auth_time now) of an existing account, whatever
    `mfa_required_roles` says: a new TOTP factor is enrolled and confirmed for it on the spot
    (replacing any earlier one, so repeated logins never replay a code). Returns the tokens."""
    services = h.services
    user = await services.users.by_username(username)
    enrollment = await services.mfa.totp.enroll(user.id, user.username)
    authenticator = pyotp.parse_uri(enrollment.otpauth_uri)
    now = services.clock()
    # this step's code confirms, the next one's logs in: each step is used once, and both stay
    # inside the server's window even when the clock crosses a step boundary meanwhile
    confirmed = await services.mfa.totp.confirm(user.id, authenticator.at(now))
    assert confirmed is TotpResult.ok
    first = await h.login(username, password)
    assert first.get("mfa_required") is True, first
    response = await h.client.post(
        "/auth/mfa/verify",
        json={
            "mfa_token": first["mfa_token"],
            "method": "totp",
            "code": authenticator.at(now + STEP_SECONDS),
        },
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def build_world(h: Any) -> World:
    w = World(h)
    h.client.event_hooks["response"].append(w.hook)
    await w.user("svc", Role.service)
    w.svc = w.tokens["svc"]
    await w.create({"resourceType": "Organization", "name": "Org X"}, "orgX")
    await w.create({"resourceType": "Organization", "name": "Org Y"}, "orgY")
    for name in ("pracA", "pracC", "pracOther", "pracNurse"):
        await w.create({"resourceType": "Practitioner", "name": [{"family": f"Doc{name}"}]}, name)
    await w.create(patient_body("A", w.ids["orgX"]), "A")
    await w.create(patient_body("B", w.ids["orgY"]), "B")
    a, b = w.ids["A"], w.ids["B"]
    await w.create(encounter_body("A", a), "encA")
    await w.create(encounter_body("B", b), "encB")
    await w.create(observation_body("A", a, f"Encounter/{w.ids['encA']}"), "obsA")
    await w.create(observation_body("B", b, f"Encounter/{w.ids['encB']}"), "obsB")
    await w.create(condition_body("A", a, f"Encounter/{w.ids['encA']}"), "condA")
    await w.create(condition_body("B", b, f"Encounter/{w.ids['encB']}"), "condB")
    # the default policy shows sensitive labels to no role, the service included (it may not
    # write what it may not read): the PSY record goes straight into the store
    stored = await h.services.store.create(observation_body("A", a, labels=[PSY_LABEL]))
    w.ids["obsPsy"] = str(stored.body["id"])
    w.refs["obsPsy"] = f"Observation/{w.ids['obsPsy']}"
    # A's records pointing at what A's readers may not see: _include vehicles
    await w.create(observation_body("A", a, f"Encounter/{w.ids['encB']}"), "obsCross")
    await w.create(observation_body("A", a, f"Observation/{w.ids['obsPsy']}"), "obsToPsy")
    # a deleted record of B
    gone = await w.create(observation_body("B", b), "obsBGone")
    assert (await w.delete("svc", f"/fhir/Observation/{gone}")).status_code == 204
    await w.create(care_team_body(a, [w.ids["pracA"], w.ids["pracC"]]), "teamA")
    await w.create(consent_body(a, f"Practitioner/{w.ids['pracC']}"), "consentA")

    await w.user("patA", Role.patient, patient_id=a)
    await w.user("patB", Role.patient, patient_id=b)
    await w.user("drA", Role.physician, practitioner_id=w.ids["pracA"])
    await w.user("drC", Role.physician, practitioner_id=w.ids["pracC"])
    await w.user("drOther", Role.physician, practitioner_id=w.ids["pracOther"])
    await w.user(
        "nurseX", Role.nurse, practitioner_id=w.ids["pracNurse"], organization_id=w.ids["orgX"]
    )
    await w.user("registrar", Role.registrar)
    await w.user("admin", Role.admin)
    await w.user("billing", Role.billing)
    return w


# --- comparisons -----------------------------------------------------------------------------


def comparable(response: httpx.Response) -> tuple[int, bytes, dict[str, str]]:
    headers = {k: v for k, v in response.headers.items() if k.lower() not in VOLATILE_HEADERS}
    return response.status_code, response.content, headers


def assert_like_missing(denied: httpx.Response, missing: httpx.Response) -> None:
    """A denial must be indistinguishable from a request for a record that does not exist."""
    assert missing.status_code == 404, missing.text
    assert comparable(denied) == comparable(missing)


def entry_ids(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if "resource" in e]


def entry_refs(bundle: dict[str, Any]) -> list[str]:
    return [
        f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in bundle.get("entry", [])
        if "resource" in e
    ]


def next_link(bundle: dict[str, Any]) -> str | None:
    return next((x["url"] for x in bundle.get("link", []) if x["relation"] == "next"), None)
