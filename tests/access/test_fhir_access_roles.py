"""Roles other than the patient over HTTP: nurse at the organization boundary, registrar,
admin, billing (purpose of use, redaction), sensitive labels and their grants, Consent deny,
CareTeam changes and break-glass taking effect on the next request, and writes. Every denied
read must look exactly like a missing record; no response may be a 5xx."""

from __future__ import annotations

from typing import Any

import pytest

from carevault.access.label_grants import grant_label
from carevault.access.policy import DEFAULT_POLICY
from tests.access.fhir_world import (
    A_FAMILY,
    B_FAMILY,
    MISSING,
    MRN,
    World,
    assert_like_missing,
    build_world,
    care_team_body,
    consent_body,
    entry_ids,
    observation_body,
)
from tests.audit.trail import audit_documents

REASON = "Unconscious in ED, no relatives reachable, allergy history needed now"


@pytest.fixture
async def world(harness) -> World:
    return await build_world(harness)


async def like_missing(w: World, who: str, path: str, **headers: str) -> None:
    """`path` is /fhir/Type/<id>...: compare it with the same path for a missing id."""
    parts = path.split("/")
    missing_path = "/".join(parts[:3] + [MISSING] + parts[4:])
    assert_like_missing(
        await w.get(who, path, **headers), await w.get(who, missing_path, **headers)
    )


# --- nurse and the organization boundary -----------------------------------------------------


async def test_nurse_of_x_reads_x_patients_not_y(
    settings_factory, harness_factory, tmp_path
) -> None:
    policy = tmp_path / "policy.toml"
    text = DEFAULT_POLICY.read_text()
    assert "organization_boundary = false" in text
    policy.write_text(text.replace("organization_boundary = false", "organization_boundary = true"))
    h = await harness_factory(settings_factory(access_policy_file=policy))
    w = await build_world(h)
    assert (await w.get("nurseX", f"/fhir/Patient/{w.ids['A']}")).status_code == 200
    assert (await w.get("nurseX", f"/fhir/Observation/{w.ids['obsA']}")).status_code == 200
    for name, rtype in (("B", "Patient"), ("obsB", "Observation"), ("encB", "Encounter")):
        await like_missing(w, "nurseX", f"/fhir/{rtype}/{w.ids[name]}")
        await like_missing(w, "nurseX", f"/fhir/{rtype}/{w.ids[name]}/_history")
    patients = await w.search("nurseX", "/fhir/Patient?_total=accurate")
    assert entry_ids(patients) == [w.ids["A"]] and patients["total"] == 1
    obs = await w.search("nurseX", "/fhir/Observation?_total=accurate")
    assert w.ids["obsB"] not in entry_ids(obs) and obs["total"] == len(obs["entry"])
    assert B_FAMILY not in str(await w.search("nurseX", "/fhir/Patient/_history"))
    # a PractitionerRole gives the organization as well
    await w.create({"resourceType": "Practitioner", "name": [{"family": "Rolenurse"}]}, "pracN2")
    await w.create(
        {
            "resourceType": "PractitionerRole",
            "active": True,
            "practitioner": {"reference": w.refs["pracN2"]},
            "organization": {"reference": w.refs["orgX"]},
        }
    )
    from carevault.identity.roles import Role

    await w.user("nurseRole", Role.nurse, practitioner_id=w.ids["pracN2"])
    assert (await w.get("nurseRole", f"/fhir/Patient/{w.ids['A']}")).status_code == 200
    await like_missing(w, "nurseRole", f"/fhir/Patient/{w.ids['B']}")


async def test_nurse_without_boundary_or_team_sees_no_patient(world: World) -> None:
    w = world
    await like_missing(w, "nurseX", f"/fhir/Patient/{w.ids['A']}")
    await like_missing(w, "nurseX", f"/fhir/Observation/{w.ids['obsA']}")


# --- registrar, admin -------------------------------------------------------------------------


async def test_registrar_reads_patients_but_no_observation(world: World) -> None:
    w = world
    assert (await w.get("registrar", f"/fhir/Patient/{w.ids['B']}")).status_code == 200
    await like_missing(w, "registrar", f"/fhir/Observation/{w.ids['obsA']}")
    await like_missing(w, "registrar", f"/fhir/Observation/{w.ids['obsA']}/_history/1")
    await like_missing(w, "registrar", f"/fhir/Observation/{w.ids['obsA']}/_history")
    search = await w.get("registrar", "/fhir/Observation")
    assert search.status_code == 403 and search.json()["resourceType"] == "OperationOutcome"
    assert (await w.get("registrar", "/fhir/Observation/_history")).status_code == 403


async def test_admin_reads_administrative_data_only(world: World) -> None:
    w = world
    assert (await w.get("admin", f"/fhir/Organization/{w.ids['orgX']}")).status_code == 200
    assert (await w.get("admin", f"/fhir/Practitioner/{w.ids['pracA']}")).status_code == 200
    for name, rtype in (("A", "Patient"), ("obsA", "Observation"), ("condA", "Condition")):
        await like_missing(w, "admin", f"/fhir/{rtype}/{w.ids[name]}")
    await like_missing(w, "admin", f"/fhir/Patient/{w.ids['A']}/$everything")
    for rtype in ("Patient", "Observation", "Condition", "Encounter"):
        response = await w.get("admin", f"/fhir/{rtype}")
        assert response.status_code == 403, (rtype, response.text)
        assert A_FAMILY not in response.text


# --- billing ----------------------------------------------------------------------------------


async def test_billing_under_treat_sees_nothing(world: World) -> None:
    w = world
    await like_missing(w, "billing", f"/fhir/Patient/{w.ids['A']}")
    await like_missing(w, "billing", f"/fhir/Encounter/{w.ids['encA']}")
    assert (await w.get("billing", "/fhir/Patient")).status_code == 403
    assert (await w.get("billing", "/fhir/Encounter")).status_code == 403


@pytest.mark.parametrize("purpose", ["HPAYMT", "HOPERAT"])
async def test_billing_under_payment_sees_redacted_patients(world: World, purpose: str) -> None:
    w = world
    hdr = {"X-Purpose-Of-Use": purpose}
    allowed = {"resourceType", "id", "meta", "identifier"}
    read = await w.get("billing", f"/fhir/Patient/{w.ids['A']}", **hdr)
    assert read.status_code == 200 and set(read.json()) <= allowed
    assert read.json()["identifier"][0]["value"] == "MRN-A-1001"
    responses = [
        read,
        await w.get("billing", f"/fhir/Patient/{w.ids['A']}/_history/1", **hdr),
        await w.get("billing", f"/fhir/Patient/{w.ids['A']}/_history", **hdr),
        await w.get("billing", "/fhir/Patient/_history", **hdr),
        await w.get("billing", f"/fhir/Patient?identifier={MRN}|MRN-B-2002", **hdr),
        await w.get("billing", "/fhir/Patient?_total=accurate", **hdr),
        await w.get("billing", "/fhir/Encounter?_include=Encounter:patient", **hdr),
        await w.get("billing", "/fhir/Encounter?_include=Encounter:subject", **hdr),
        await w.post(
            "billing",
            "/fhir",
            {
                "resourceType": "Bundle",
                "type": "batch",
                "entry": [{"request": {"method": "GET", "url": f"Patient/{w.ids['B']}"}}],
            },
            hdr,
        ),
    ]
    for response in responses:
        assert response.status_code == 200, (response.request.url, response.text)
        for secret in (A_FAMILY, B_FAMILY, "Aurelia", "Betatown", "1971-02-03", "+1555000"):
            assert secret not in response.text, (response.request.url, secret)
    found = responses[4].json()
    assert entry_ids(found) == [w.ids["B"]]
    included = [e for e in responses[6].json()["entry"] if e["search"]["mode"] == "include"]
    assert included and all(set(e["resource"]) <= allowed for e in included)
    for query in (
        "name=Betaworld",
        "family=" + B_FAMILY,
        "gender=male",
        "birthdate=1988-09-10",
        "address-city=Betatown",
        "organization=Organization/" + w.ids["orgY"],
    ):
        refused = await w.get("billing", f"/fhir/Patient?{query}", **hdr)
        assert refused.status_code == 400, (query, refused.text)
        assert B_FAMILY not in refused.text
    await like_missing(w, "billing", f"/fhir/Observation/{w.ids['obsA']}", **hdr)
    assert (await w.get("billing", "/fhir/Observation", **hdr)).status_code == 403
    encounters = await w.search("billing", "/fhir/Encounter?_total=accurate", **hdr)
    assert {w.ids["encA"], w.ids["encB"]} <= set(entry_ids(encounters))


async def test_billing_everything_is_redacted_and_counts_only_shown(world: World) -> None:
    w = world
    hdr = {"X-Purpose-Of-Use": "HPAYMT"}
    bundle = await w.search("billing", f"/fhir/Patient/{w.ids['A']}/$everything", **hdr)
    assert A_FAMILY not in str(bundle)
    assert bundle["total"] == len(bundle["entry"])
    types = {e["resource"]["resourceType"] for e in bundle["entry"]}
    assert types == {"Patient", "Encounter"}
    assert all(
        set(e["resource"]) <= {"resourceType", "id", "meta", "identifier"}
        for e in bundle["entry"]
        if e["resource"]["resourceType"] == "Patient"
    )


# --- sensitive labels -------------------------------------------------------------------------


async def _psy_visible_everywhere(w: World) -> dict[str, bool]:
    psy = w.ids["obsPsy"]
    a = w.ids["A"]
    seen = {}
    seen["read"] = (await w.get("drA", f"/fhir/Observation/{psy}")).status_code == 200
    seen["vread"] = (await w.get("drA", f"/fhir/Observation/{psy}/_history/1")).status_code == 200
    seen["history"] = (await w.get("drA", f"/fhir/Observation/{psy}/_history")).status_code == 200
    search = await w.search("drA", f"/fhir/Observation?patient=Patient/{a}&_total=accurate")
    seen["search"] = psy in entry_ids(search)
    seen["count"] = search["total"] == 4
    assert search["total"] == len(search["entry"])
    by_label = await w.search(
        "drA",
        "/fhir/Observation?_security=http://terminology.hl7.org/"
        "CodeSystem/v3-ActCode|PSY&_total=accurate",
    )
    seen["search-by-label"] = by_label["total"] == 1 and psy in entry_ids(by_label)
    inc = await w.search(
        "drA", f"/fhir/Observation?_id={w.ids['obsToPsy']}&_include=Observation:encounter"
    )
    seen["include"] = psy in entry_ids(inc)
    hist = await w.search("drA", "/fhir/Observation/_history")
    seen["type-history"] = psy in entry_ids(hist)
    batch = await w.post(
        "drA",
        "/fhir",
        {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [{"request": {"method": "GET", "url": f"Observation/{psy}"}}],
        },
    )
    seen["batch"] = batch.json()["entry"][0]["response"]["status"] == "200 OK"
    return seen


async def test_psy_record_hidden_without_grant_then_shown_after_grant(world: World) -> None:
    w = world
    psy = w.ids["obsPsy"]
    assert (await w.get("drA", f"/fhir/Observation/{w.ids['obsA']}")).status_code == 200
    for suffix in ("", "/_history/1", "/_history"):
        await like_missing(w, "drA", f"/fhir/Observation/{psy}{suffix}")
    assert await _psy_visible_everywhere(w) == dict.fromkeys(
        [
            "read",
            "vread",
            "history",
            "search",
            "count",
            "search-by-label",
            "include",
            "type-history",
            "batch",
        ],
        False,
    )
    await grant_label(w.h.services.engine, w.h.services.access_generation, w.users["drA"].id, "PSY")
    # the next request, same token, no restart
    assert all((await _psy_visible_everywhere(w)).values())
    # the grant is the physician's own: a colleague still sees nothing
    await like_missing(w, "drC", f"/fhir/Observation/{psy}")


async def test_psy_record_absent_from_everything_without_grant(world: World) -> None:
    w = world
    bundle = await w.search("drA", f"/fhir/Patient/{w.ids['A']}/$everything")
    assert w.ids["obsPsy"] not in entry_ids(bundle)
    assert bundle["total"] == len(bundle["entry"])
    await grant_label(w.h.services.engine, w.h.services.access_generation, w.users["drA"].id, "PSY")
    bundle = await w.search("drA", f"/fhir/Patient/{w.ids['A']}/$everything")
    assert w.ids["obsPsy"] in entry_ids(bundle)


async def test_label_grant_is_ignored_for_nurses(world: World) -> None:
    w = world
    await w.replace("teamA", care_team_body(w.ids["A"], [w.ids["pracA"], w.ids["pracNurse"]]))
    await grant_label(
        w.h.services.engine, w.h.services.access_generation, w.users["nurseX"].id, "PSY"
    )
    assert (await w.get("nurseX", f"/fhir/Observation/{w.ids['obsA']}")).status_code == 200
    await like_missing(w, "nurseX", f"/fhir/Observation/{w.ids['obsPsy']}")


# --- consent, care team -----------------------------------------------------------------------


async def test_existing_consent_denies_the_named_practitioner(world: World) -> None:
    w = world
    for name, rtype in (("obsA", "Observation"), ("A", "Patient"), ("condA", "Condition")):
        await like_missing(w, "drC", f"/fhir/{rtype}/{w.ids[name]}")
        assert (await w.get("drA", f"/fhir/{rtype}/{w.ids[name]}")).status_code == 200
    obs = await w.search("drC", "/fhir/Observation?_total=accurate")
    assert obs["total"] == 0 and obs["entry"] == []


async def test_consent_takes_effect_next_request_and_lifts_when_inactive(world: World) -> None:
    w = world
    url = f"/fhir/Observation/{w.ids['obsA']}"
    assert (await w.get("drA", url)).status_code == 200
    await w.create(consent_body(w.ids["A"], w.refs["pracA"]), "consentDrA")
    await like_missing(w, "drA", url)
    search = await w.search("drA", f"/fhir/Observation?patient=Patient/{w.ids['A']}")
    assert search["entry"] == [] and search["total"] == 0
    await w.replace("consentDrA", consent_body(w.ids["A"], w.refs["pracA"], status="inactive"))
    assert (await w.get("drA", url)).status_code == 200


async def test_care_team_change_takes_effect_next_request(world: World) -> None:
    w = world
    url = f"/fhir/Observation/{w.ids['obsA']}"
    assert (await w.get("drA", url)).status_code == 200
    await w.replace("teamA", care_team_body(w.ids["A"], [w.ids["pracC"]]))
    await like_missing(w, "drA", url)
    await w.replace("teamA", care_team_body(w.ids["A"], [w.ids["pracA"]], status="inactive"))
    await like_missing(w, "drA", url)
    await w.replace("teamA", care_team_body(w.ids["A"], [w.ids["pracA"]]))
    assert (await w.get("drA", url)).status_code == 200


# --- break-glass ------------------------------------------------------------------------------


async def _events(w: World, user_id: str) -> list[dict[str, Any]]:
    documents = await audit_documents(w.h.services.engine, "security.break_glass_access")
    return [d for d in documents if d.get("user") == user_id]


@pytest.mark.parametrize("who", ["drOther", "drC"])  # no relationship; denied by consent
async def test_break_glass_opens_then_revocation_closes(world: World, who: str) -> None:
    w = world
    url = f"/fhir/Observation/{w.ids['obsA']}"
    await like_missing(w, who, url)
    token = await w.relogin(who)  # a fresh login
    grant = await w.client.post(
        "/access/break-glass",
        json={"patient": w.ids["A"], "reason": REASON},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert grant.status_code == 201, grant.text
    before = len(await _events(w, w.users[who].id))
    read = await w.get(who, url)
    assert read.status_code == 200 and read.json()["id"] == w.ids["obsA"]
    assert len(await _events(w, w.users[who].id)) == before + 1
    # labels stay closed under break-glass by default; B stays closed
    await like_missing(w, who, f"/fhir/Observation/{w.ids['obsPsy']}")
    await like_missing(w, who, f"/fhir/Observation/{w.ids['obsB']}")
    revoke = await w.client.post(
        f"/access/break-glass/{grant.json()['id']}/revoke",
        headers={"Authorization": f"Bearer {token}"},
    )
    assert revoke.status_code == 200, revoke.text
    await like_missing(w, who, url)
    search = await w.search(who, f"/fhir/Observation?patient=Patient/{w.ids['A']}")
    assert search["entry"] == []


# --- writes, purpose header -------------------------------------------------------------------


async def _observation_count(w: World) -> int:
    return int((await w.search("svc", "/fhir/Observation?_total=accurate&_count=0"))["total"])


async def test_physician_cannot_create_for_patient_not_in_care(world: World) -> None:
    w = world
    before = await _observation_count(w)
    for who in ("drA", "drOther"):
        response = await w.post(who, "/fhir/Observation", observation_body("B", w.ids["B"]))
        assert response.status_code == 403, response.text
        assert response.json()["resourceType"] == "OperationOutcome"
        batch = await w.post(
            who,
            "/fhir",
            {
                "resourceType": "Bundle",
                "type": "transaction",
                "entry": [
                    {
                        "request": {"method": "POST", "url": "Observation"},
                        "resource": observation_body("B", w.ids["B"]),
                    }
                ],
            },
        )
        assert batch.status_code == 403, batch.text
    assert await _observation_count(w) == before
    ok = await w.post("drA", "/fhir/Observation", observation_body("A", w.ids["A"]))
    assert ok.status_code == 201
    assert await _observation_count(w) == before + 1


async def test_physician_update_of_invisible_record_is_404(world: World) -> None:
    w = world
    body = {**observation_body("B", w.ids["B"]), "id": w.ids["obsB"]}
    denied = await w.put("drA", f"/fhir/Observation/{w.ids['obsB']}", body)
    missing = await w.put("drA", f"/fhir/Observation/{MISSING}", {**body, "id": MISSING})
    assert_like_missing(denied, missing)
    # moving A's record to B is refused too, and changes nothing
    moved = {**observation_body("B", w.ids["B"]), "id": w.ids["obsA"]}
    response = await w.put("drA", f"/fhir/Observation/{w.ids['obsA']}", moved)
    assert response.status_code == 403
    current = await w.get("svc", f"/fhir/Observation/{w.ids['obsB']}")
    assert current.json()["meta"]["versionId"] == "1"
    assert (await w.get("svc", f"/fhir/Observation/{w.ids['obsA']}")).json()["meta"][
        "versionId"
    ] == "1"


async def test_patient_writes_are_403(world: World) -> None:
    w = world
    before = await _observation_count(w)
    own = {**observation_body("A", w.ids["A"]), "id": w.ids["obsA"]}
    for response in (
        await w.post("patA", "/fhir/Observation", observation_body("A", w.ids["A"])),
        await w.put("patA", f"/fhir/Observation/{w.ids['obsA']}", own),
        await w.delete("patA", f"/fhir/Observation/{w.ids['obsA']}"),
    ):
        assert response.status_code == 403, (response.request.method, response.text)
    assert await _observation_count(w) == before
    assert (await w.get("svc", f"/fhir/Observation/{w.ids['obsA']}")).json()["meta"][
        "versionId"
    ] == "1"


@pytest.mark.parametrize("value", ["BOGUS", "treat", "", "TREAT,HPAYMT", "ETREAT " * 3])
async def test_invalid_purpose_is_400_operation_outcome(world: World, value: str) -> None:
    w = world
    hdr = {"X-Purpose-Of-Use": value}
    responses = [
        await w.get("drA", f"/fhir/Observation/{w.ids['obsA']}", **hdr),
        await w.get("drA", f"/fhir/Observation/{MISSING}", **hdr),
        await w.get("drA", "/fhir/Observation", **hdr),
        await w.post("drA", "/fhir/Observation", observation_body("A", w.ids["A"]), hdr),
        await w.post("drA", "/fhir", {"resourceType": "Bundle", "type": "batch", "entry": []}, hdr),
    ]
    for response in responses:
        assert response.status_code == 400, (response.request.url, response.text)
        assert response.json()["resourceType"] == "OperationOutcome"
        assert w.ids["A"] not in response.text


# --- searches of one shape share a statement ---------------------------------------------------


async def test_a_shared_search_statement_never_carries_one_callers_visibility_to_another(
    world: World,
) -> None:
    """Searches of one shape run one prepared statement (fhir/search.py `_plan`), each
    caller's visibility part of what picks it: callers who see different patients, searching
    alike in turn, each find and count only their own, and a CareTeam change is seen at
    once."""
    w = world

    async def found(who: str, family: str) -> list[str]:
        bundle = await w.search(who, f"/fhir/Patient?name={family}&_total=accurate")
        # The total is the SQL's own count: records the statement let through and the
        # per-record check then dropped would show here.
        assert bundle["total"] == len(entry_ids(bundle))
        return entry_ids(bundle)

    a, b = w.ids["A"], w.ids["B"]
    for _ in range(2):  # the second round runs on the statements the first one built
        assert await found("svc", A_FAMILY) == [a]
        assert await found("drA", A_FAMILY) == [a]
        assert await found("drA", B_FAMILY) == []
        assert await found("patB", B_FAMILY) == [b]
        assert await found("patB", A_FAMILY) == []
        assert await found("svc", B_FAMILY) == [b]
        assert await found("drOther", A_FAMILY) == []
    await w.replace("teamA", care_team_body(a, [w.ids["pracC"]]))
    assert await found("drA", A_FAMILY) == []
    await w.replace("teamA", care_team_body(a, [w.ids["pracA"]]))
    assert await found("drA", A_FAMILY) == [a]
