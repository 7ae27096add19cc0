"""FHIR REST through HTTP: CRUD, versions, history, OperationOutcome errors, encryption at rest."""

from __future__ import annotations

import pytest
from sqlalchemy import select, text, update

from carevault.db.tables import fhir_versions
from carevault.fhir.validation import validate_resource
from carevault.identity.roles import Role
from tests.audit.trail import audit_documents

FHIR = "application/fhir+json"
DISTINCT = {
    "family": "Quillfeatherstonehaugh",
    "given": "Zebulonia",
    "mrn": "MRN-88113377",
    "birth": "1937-04-19",
}


def patient_body() -> dict:
    return {
        "resourceType": "Patient",
        "id": "client-chosen-is-ignored",
        "identifier": [{"system": "http://hospital.example/mrn", "value": DISTINCT["mrn"]}],
        "name": [{"family": DISTINCT["family"], "given": [DISTINCT["given"]]}],
        "gender": "female",
        "birthDate": DISTINCT["birth"],
    }


def observation_body(patient_id: str) -> dict:
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                        "code": "vital-signs",
                    }
                ]
            }
        ],
        "code": {
            "coding": [{"system": "http://loinc.org", "code": "8867-4", "display": "Heart rate"}]
        },
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": "2024-05-01T10:30:00Z",
        "valueQuantity": {"value": 72, "unit": "beats/minute"},
    }


@pytest.fixture
async def clinician(harness):
    # the REST mechanics, not who may act: a service account may do all of it on any patient
    await harness.add_user("svc.fhir", Role.service)
    token = (await harness.login("svc.fhir"))["access_token"]
    harness.client.headers["Authorization"] = f"Bearer {token}"
    return harness


async def _create(h, body):
    response = await h.client.post(
        f"/fhir/{body['resourceType']}", json=body, headers={"content-type": FHIR}
    )
    assert response.status_code == 201, response.text
    return response


async def test_create_read_update_delete_history(clinician):
    h = clinician
    created = await _create(h, patient_body())
    patient = created.json()
    assert patient["id"] != "client-chosen-is-ignored"
    assert patient["meta"]["versionId"] == "1"
    assert created.headers["etag"] == 'W/"1"'
    assert created.headers["location"] == f"/fhir/Patient/{patient['id']}/_history/1"
    assert created.headers["cache-control"] == "no-store"
    assert created.headers["content-type"].startswith(FHIR)

    read = await h.client.get(f"/fhir/Patient/{patient['id']}")
    assert read.status_code == 200 and read.json()["name"][0]["family"] == DISTINCT["family"]
    assert read.headers["last-modified"].endswith("GMT")

    patient["gender"] = "other"
    updated = await h.client.put(
        f"/fhir/Patient/{patient['id']}",
        json=patient,
        headers={"If-Match": 'W/"1"', "content-type": FHIR},
    )
    assert updated.status_code == 200 and updated.json()["meta"]["versionId"] == "2"
    stale = await h.client.put(
        f"/fhir/Patient/{patient['id']}",
        json=patient,
        headers={"If-Match": 'W/"1"', "content-type": FHIR},
    )
    assert stale.status_code == 412
    assert stale.json()["resourceType"] == "OperationOutcome"

    v1 = await h.client.get(f"/fhir/Patient/{patient['id']}/_history/1")
    assert v1.json()["gender"] == "female"

    assert (await h.client.delete(f"/fhir/Patient/{patient['id']}")).status_code == 204
    assert (await h.client.get(f"/fhir/Patient/{patient['id']}")).status_code == 410
    history = (await h.client.get(f"/fhir/Patient/{patient['id']}/_history")).json()
    assert history["type"] == "history" and history["total"] == 3
    assert [e["request"]["method"] for e in history["entry"]] == ["DELETE", "PUT", "PUT"]
    assert (await h.client.get(f"/fhir/Patient/{patient['id']}/_history/2")).status_code == 200


async def test_errors_are_operation_outcomes_and_change_nothing(clinician):
    h = clinician
    cases = [
        (b'{"resourceType": "Patient", ', 400),
        (b'{"resourceType": "Observation", "status": "final"}', 422),  # wrong type for URL
        (b'{"resourceType": "Patient", "birthDate": "2020-13-45"}', 422),
        (b'{"resourceType": "Patient", "unknownElement": 1}', 422),
        (b"[]", 400),
        (b"[" * 5000 + b"]" * 5000, 400),
    ]
    for body, status in cases:
        response = await h.client.post(
            "/fhir/Patient", content=body, headers={"content-type": FHIR}
        )
        assert response.status_code == status, (body[:40], response.text)
        assert response.json()["resourceType"] == "OperationOutcome"
        assert "2020-13-45" not in response.text
    history = await h.client.get("/fhir/Patient/_history")
    assert history.json()["total"] == 0
    assert (await h.client.get("/fhir/NoSuchType/1")).status_code == 404
    assert (await h.client.get("/fhir/Patient/bad$id")).status_code == 404
    assert (await h.client.get("/fhir/Patient/missing")).status_code == 404
    assert (await h.client.get("/fhir/Patient/missing/_history/x")).status_code == 404


async def test_only_permitted_roles_and_only_with_a_token(clinician):
    """Default deny: no token is 401; a role reads only what the policy grants it, a denied
    read of an existing record answers exactly like a missing one, and a type (or purpose of
    use) the role may not search at all is 403."""
    h = clinician
    existing = (await _create(h, patient_body())).json()["id"]
    obs = (await _create(h, observation_body(existing))).json()["id"]
    anonymous = {"Authorization": ""}
    assert (await h.client.get("/fhir/Patient/x", headers=anonymous)).status_code == 401
    assert (await h.client.get("/fhir/Patient", headers=anonymous)).status_code == 401

    await h.add_user("billing.fhir", Role.billing)
    token = (await h.login("billing.fhir"))["access_token"]
    billing = {"Authorization": f"Bearer {token}"}  # no X-Purpose-Of-Use: TREAT
    missing = await h.client.get("/fhir/Patient/x", headers=billing)
    assert missing.status_code == 404
    assert missing.json()["resourceType"] == "OperationOutcome"
    denied = await h.client.get(f"/fhir/Patient/{existing}", headers=billing)
    assert denied.status_code == 404  # billing may not act for treatment: as if missing
    assert denied.json() == missing.json()
    assert DISTINCT["family"] not in denied.text
    search = await h.client.get("/fhir/Patient", headers=billing)
    assert search.status_code == 403
    assert search.json()["resourceType"] == "OperationOutcome"

    paying = {**billing, "X-Purpose-Of-Use": "HPAYMT"}
    read = await h.client.get(f"/fhir/Patient/{existing}", headers=paying)
    assert read.status_code == 200
    assert read.json()["identifier"][0]["value"] == DISTINCT["mrn"]
    assert "name" not in read.json() and "birthDate" not in read.json()  # redacted
    assert (await h.client.get("/fhir/Patient/x", headers=paying)).status_code == 404
    # clinical records are not billing's: as if missing, and their type not searchable at all
    hidden = await h.client.get(f"/fhir/Observation/{obs}", headers=paying)
    assert hidden.status_code == 404 and hidden.json() == missing.json()
    assert (await h.client.get("/fhir/Observation", headers=paying)).status_code == 403
    # nor may billing write: 403
    created = await h.client.post(
        "/fhir/Patient", json=patient_body(), headers={**paying, "content-type": FHIR}
    )
    assert created.status_code == 403
    assert created.json()["resourceType"] == "OperationOutcome"


async def test_metadata_lists_types_and_smart_security(harness_factory, settings_factory):
    # SMART is offered with an https issuer (tests/oauth/test_insecure_issuer.py: not without)
    h = await harness_factory(settings_factory(issuer_url="https://testserver"))
    body = (await h.client.get("/fhir/metadata")).json()
    assert body["resourceType"] == "CapabilityStatement" and body["fhirVersion"] == "4.0.1"
    types = {r["type"] for r in body["rest"][0]["resource"]}
    assert {"Patient", "Observation", "Claim", "ExplanationOfBenefit", "CarePlan"} <= types
    security = body["rest"][0]["security"]
    assert security["service"][0]["coding"][0]["code"] == "SMART-on-FHIR"
    (uris,) = security["extension"]
    assert uris["url"] == "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris"
    named = {e["url"]: e["valueUri"] for e in uris["extension"]}
    assert named == {
        "authorize": "https://testserver/oauth/authorize",
        "token": "https://testserver/oauth/token",
        "revoke": "https://testserver/oauth/revoke",
        "introspect": "https://testserver/oauth/introspect",
    }
    assert body["kind"] == "instance" and body["implementation"]["description"]
    assert validate_resource(body, "CapabilityStatement")  # a valid resource itself


async def test_ciphertext_swapped_between_rows_fails_closed(clinician):
    h = clinician
    a = (await _create(h, patient_body())).json()
    b = (await _create(h, patient_body())).json()
    store = h.services.engine
    async with store.begin() as conn:
        body_b = (
            await conn.execute(select(fhir_versions.c.body).where(fhir_versions.c.id == b["id"]))
        ).scalar_one()
        await conn.execute(
            update(fhir_versions).where(fhir_versions.c.id == a["id"]).values(body=body_b)
        )
    response = await h.client.get(f"/fhir/Patient/{a['id']}")
    assert response.status_code == 500
    assert response.json()["resourceType"] == "OperationOutcome"
    assert DISTINCT["family"] not in response.text
    assert (await h.client.get(f"/fhir/Patient/{b['id']}")).status_code == 200
    alerts = await audit_documents(h.services.engine, "security.record_integrity_failure")
    assert len(alerts) == 1


async def test_tampered_ciphertext_fails_closed(clinician):
    h = clinician
    a = (await _create(h, patient_body())).json()
    async with h.services.engine.begin() as conn:
        body = (
            await conn.execute(select(fhir_versions.c.body).where(fhir_versions.c.id == a["id"]))
        ).scalar_one()
        flipped = body[:-1] + bytes([body[-1] ^ 1])
        await conn.execute(
            update(fhir_versions).where(fhir_versions.c.id == a["id"]).values(body=flipped)
        )
    assert (await h.client.get(f"/fhir/Patient/{a['id']}")).status_code == 500


async def test_no_phi_at_rest(clinician, settings):
    """Seed distinctive PHI, then scan the raw database (SQLite file + WAL, or every PG table)."""
    h = clinician
    patient = (await _create(h, patient_body())).json()
    await _create(h, observation_body(patient["id"]))
    patient["name"][0]["given"].append("Ottoline")
    await h.client.put(
        f"/fhir/Patient/{patient['id']}", json=patient, headers={"content-type": FHIR}
    )
    needles = [v.encode() for v in DISTINCT.values()] + [b"Ottoline"]
    needles += [v.lower().encode() for v in (DISTINCT["family"], DISTINCT["given"])]
    if settings.database_url is None:
        blobs = [p.read_bytes() for p in settings.data_dir.glob("carevault.db*")]
        assert blobs
    else:
        blobs = []
        async with h.services.engine.connect() as conn:
            tables = (
                await conn.execute(
                    text("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
                )
            ).scalars()
            for table in list(tables):
                rows = (await conn.execute(text(f'SELECT * FROM "{table}"'))).all()
                blobs.append(repr(rows).encode())
                blobs.extend(
                    bytes(v) for row in rows for v in row if isinstance(v, (bytes, memoryview))
                )
    for blob in blobs:
        for needle in needles:
            assert needle not in blob, needle
