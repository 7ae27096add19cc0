"""The patient access report over HTTP: `GET /fhir/Patient/{id}/$access-report`.

The patient sees who else looked at their record (role, organization; names only when the
instance allows it), when, what kind of record, why, and break-glass accesses highlighted;
never their own accesses, never another patient's ids, never record ids. Anyone but the
patient and auditors gets exactly the answer for a Patient that does not exist.
"""

from __future__ import annotations

from typing import Any

import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.operationoutcome import OperationOutcome

from carevault.identity.roles import Role
from tests.access.fhir_world import (
    A_FAMILY,
    B_FAMILY,
    MISSING,
    World,
    assert_like_missing,
    bearer,
    build_world,
    comparable,
)
from tests.audit.trail import audit_documents

REASON = "Unconscious in ED, no relatives reachable, allergy history needed now"
BTG_EXTENSION = "urn:carevault:fhir:StructureDefinition:break-glass"


async def scenario(w: World) -> None:
    """drA (A's CareTeam) reads A and an Observation of A; drOrg (same practitioner, with
    organization X) reads a Condition of A; drOther opens break-glass on A and reads an
    Observation under it; patA reads their own record; patB is refused A's record."""
    await w.user("aud", Role.auditor)
    await w.user(
        "drOrg", Role.physician, practitioner_id=w.ids["pracA"], organization_id=w.ids["orgX"]
    )
    a = w.ids["A"]
    assert (await w.get("drA", f"/fhir/Patient/{a}")).status_code == 200
    assert (await w.get("drA", f"/fhir/Observation/{w.ids['obsA']}")).status_code == 200
    assert (await w.get("drOrg", f"/fhir/Condition/{w.ids['condA']}")).status_code == 200
    token = await w.relogin("drOther")
    grant = await w.client.post(
        "/access/break-glass", json={"patient": a, "reason": REASON}, headers=bearer(token)
    )
    assert grant.status_code == 201, grant.text
    assert (await w.get("drOther", f"/fhir/Observation/{w.ids['obsA']}")).status_code == 200
    assert (await w.get("patA", f"/fhir/Patient/{a}")).status_code == 200
    assert (await w.get("patB", f"/fhir/Patient/{a}")).status_code == 404


@pytest.fixture
async def world(harness) -> World:
    w = await build_world(harness)
    await scenario(w)
    return w


def report_url(patient: str, query: str = "") -> str:
    return f"/fhir/Patient/{patient}/$access-report" + (f"?{query}" if query else "")


async def report(w: World, who: str, patient: str, query: str = "") -> dict[str, Any]:
    response = await w.get(who, report_url(patient, query))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    Bundle.model_validate(body)
    assert body["resourceType"] == "Bundle" and body["type"] == "collection"
    return body  # type: ignore[no-any-return]


def events_of(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    events = []
    for entry in bundle.get("entry", []):
        resource = entry["resource"]
        if resource["resourceType"] == "AuditEvent":
            AuditEvent.model_validate(resource)
            events.append(resource)
        else:
            OperationOutcome.model_validate(resource)
    return events


def roles_of(event: dict[str, Any]) -> set[str]:
    return {c["code"] for r in event["agent"][0].get("role", []) for c in r["coding"]}


def kinds_of(event: dict[str, Any]) -> set[str]:
    return {
        x["type"]["code"]
        for x in event.get("entity", [])
        if x["type"]["system"] == "http://hl7.org/fhir/resource-types"
    }


def action_of(event: dict[str, Any]) -> str:
    return next(c["code"] for c in event["subtype"] if c["system"] == "urn:carevault:audit-action")


def is_break_glass(event: dict[str, Any]) -> bool:
    flagged = any(
        x["url"] == BTG_EXTENSION and x["valueBoolean"] for x in event.get("extension", [])
    )
    btg = any(c["code"] == "BTG" for p in event.get("purposeOfEvent", []) for c in p["coding"])
    assert flagged == btg
    return flagged


async def test_patient_sees_who_else_looked(world: World) -> None:
    w = world
    a = w.ids["A"]
    body = await report(w, "patA", a)
    events = events_of(body)
    reads = [e for e in events if action_of(e) == "fhir.read"]

    # drA's reads: a physician, treatment, the kinds of record, no name
    physician_reads = [e for e in reads if roles_of(e) == {"physician"} and not is_break_glass(e)]
    assert {k for e in physician_reads for k in kinds_of(e)} >= {"Patient", "Observation"}
    for event in physician_reads:
        assert event["action"] == "R" and event["outcome"] == "0"
        assert event["purposeOfEvent"][0]["coding"][0]["code"] == "TREAT"
        assert event["entity"][0]["what"] == {"reference": f"Patient/{a}"}
        assert "who" not in event["agent"][0]
    # drOrg's read shows the organization
    (condition,) = [e for e in reads if "Condition" in kinds_of(e)]
    (org,) = [x for x in condition["agent"][1:] if x["who"]["reference"].startswith("Organ")]
    assert org["who"] == {"reference": f"Organization/{w.ids['orgX']}", "display": "Org X"}

    # the break-glass read is highlighted, and summarised on top
    glass = [e for e in events if is_break_glass(e)]
    assert any(action_of(e) == "fhir.read" and "Observation" in kinds_of(e) for e in glass)
    assert any(action_of(e) == "security.break_glass_opened" for e in glass)
    assert all(roles_of(e) == {"physician"} for e in glass)
    (tag,) = body["meta"]["tag"]
    assert tag["code"] == "break-glass" and f"{len(glass)} accesses" in tag["display"]
    summary = body["entry"][0]["resource"]
    assert summary["resourceType"] == "OperationOutcome"
    assert summary["issue"][0]["severity"] == "warning"
    assert "break-glass" in summary["issue"][0]["diagnostics"]

    # the patient's own accesses are not in it (nor this request); others' records are
    assert not any("patient" in roles_of(e) for e in events)
    assert any("service" in roles_of(e) for e in events)  # the records' creation
    recorded = [e["recorded"] for e in events]
    assert recorded == sorted(recorded, reverse=True)

    # no one else's ids, no record ids, no user ids, no names
    text = (await w.get("patA", report_url(a))).text
    for name in ("B", "encB", "obsB", "condB", "obsA", "condA", "encA", "pracA", "pracOther"):
        assert w.ids[name] not in text, name
    for user in ("drA", "drOrg", "drOther", "svc", "patB"):
        assert w.users[user].id not in text, user
        assert user not in text
    for name in (A_FAMILY, B_FAMILY, "DocpracA", "DocpracOther"):
        assert name not in text


async def test_entries_of_the_report_itself_are_recorded(world: World) -> None:
    w = world
    a = w.ids["A"]
    await report(w, "patA", a)
    await report(w, "aud", a)
    documents = await audit_documents(w.h.services.engine, "fhir.access-report")
    by_user = {(d.get("user"), d.get("patient"), d["outcome"]) for d in documents}
    assert (w.users["patA"].id, a, "permit") in by_user
    assert (w.users["aud"].id, a, "permit") in by_user
    # the auditor's look is an access by someone else: the patient sees it
    events = events_of(await report(w, "patA", a))
    assert any(action_of(e) == "fhir.access-report" and roles_of(e) == {"auditor"} for e in events)


async def test_anyone_else_gets_the_answer_for_an_unknown_patient(world: World) -> None:
    w = world
    a, b = w.ids["A"], w.ids["B"]
    for who in ("patB", "drA", "drOther", "nurseX", "admin", "billing", "registrar", "svc"):
        denied = await w.get(who, report_url(a))
        missing = await w.get(who, report_url(MISSING))
        assert_like_missing(denied, missing)
        assert denied.headers["content-type"].startswith("application/fhir+json")
        assert denied.json()["resourceType"] == "OperationOutcome"
        # bad parameters do not tell either
        assert_like_missing(await w.get(who, report_url(a, "_count=0")), missing)
    # a patient asking about another patient: the same
    assert_like_missing(
        await w.get("patA", report_url(b)), await w.get("patA", report_url(MISSING))
    )
    # auditors may read anyone's; an unknown patient is 404 for them too, byte for byte
    await report(w, "aud", b)
    unknown = await w.get("aud", report_url(MISSING))
    assert comparable(unknown) == comparable(await w.get("patB", report_url(a)))
    # an id that is no FHIR id at all
    odd = await w.get("aud", report_url("a" * 65))
    assert comparable(odd) == comparable(unknown)
    # without a token: 401
    assert (await w.client.get(report_url(a))).status_code == 401


async def test_auditor_sees_the_patients_report(world: World) -> None:
    w = world
    a = w.ids["A"]
    patient = events_of(await report(w, "patA", a))
    auditor = events_of(await report(w, "aud", a))
    assert patient and auditor == patient  # the same report, whoever of the two asks


async def test_paging(world: World) -> None:
    w = world
    a = w.ids["A"]
    whole = events_of(await report(w, "patA", a, "_count=500"))
    assert len(whole) > 3
    paged: list[dict[str, Any]] = []
    body = await report(w, "patA", a, "_count=2")
    while True:
        page = events_of(body)
        assert len(page) <= 2
        paged.extend(page)
        nexts = [x["url"] for x in body["link"] if x["relation"] == "next"]
        if not nexts:
            break
        assert nexts[0].startswith(f"/fhir/Patient/{a}/$access-report?")
        response = await w.get("patA", nexts[0])
        assert response.status_code == 200, response.text
        body = response.json()
    assert paged == whole


BAD_QUERIES = ["_count=0", "_count=501", "_count=x", "_cursor=0", "_cursor=abc", "foo=1"]


async def test_bad_parameters_are_400(world: World) -> None:
    w = world
    for who, query in ((who, q) for who in ("patA", "aud") for q in BAD_QUERIES):
        response = await w.get(who, report_url(w.ids["A"], query))
        assert response.status_code == 400, (query, response.text)
        assert response.headers["content-type"].startswith("application/fhir+json")
        assert response.json()["resourceType"] == "OperationOutcome"


async def test_names_only_when_the_instance_allows(settings_factory, harness_factory) -> None:
    h = await harness_factory(settings_factory(access_report_names=True))
    w = await build_world(h)
    await scenario(w)
    a = w.ids["A"]
    events = events_of(await report(w, "patA", a))
    (condition,) = [e for e in events if action_of(e) == "fhir.read" and "Condition" in kinds_of(e)]
    assert condition["agent"][0]["who"] == {
        "display": "DocpracA",
        "reference": f"Practitioner/{w.ids['pracA']}",
    }
    # an account with no Practitioner is named by its user name
    created = [e for e in events if action_of(e) == "fhir.create"]
    assert created and all(e["agent"][0]["who"] == {"display": "svc"} for e in created)
    text = (await w.get("patA", report_url(a))).text
    assert w.ids["B"] not in text and B_FAMILY not in text
