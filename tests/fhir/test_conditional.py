"""Conditional create, Idempotency-Key, If-Match enforcement, update-as-create, $everything and
the CapabilityStatement that lists them (both stores)."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from sqlalchemy import func, select, update

from carevault.db.tables import fhir_idempotency, fhir_resources
from carevault.identity.roles import Role
from tests.access.fhir_world import mfa_login
from tests.fhir.test_rest import FHIR, observation_body, patient_body

MRN_SYSTEM = "http://hospital.example/mrn"


def patient(mrn: str, family: str = "Quillfeatherstonehaugh") -> dict:
    body = patient_body()
    body["identifier"] = [{"system": MRN_SYSTEM, "value": mrn}]
    body["name"] = [{"family": family}]
    return body


def condition_body(patient_id: str) -> dict:
    return {
        "resourceType": "Condition",
        "clinicalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                    "code": "active",
                }
            ]
        },
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "44054006"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
    }


async def _login(h, username: str, role: Role = Role.service) -> dict[str, str]:
    """Headers of a signed-in user: a service account by default (these tests are about the
    store's mechanics, not about who may act; a service account may act on any patient)."""
    await h.add_user(username, role, organization_id="org-1")
    token = (await mfa_login(h, username))["access_token"]  # $everything needs step-up
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def clinician(harness):
    harness.client.headers.update(await _login(harness, "dr.cond"))
    return harness


async def post(h, body: dict, headers: dict[str, str] | None = None, **kwargs):
    return await h.client.post(
        f"/fhir/{body['resourceType']}",
        content=orjson.dumps(body),
        headers={"content-type": FHIR, **(headers or {})},
        **kwargs,
    )


async def count(h, resource_type: str = "Patient") -> int:
    async with h.services.engine.connect() as conn:
        return (
            await conn.execute(
                select(func.count())
                .select_from(fhir_resources)
                .where(fhir_resources.c.resource_type == resource_type)
            )
        ).scalar_one()


# --- If-None-Exist ---------------------------------------------------------------------------


async def test_if_none_exist_zero_one_many(clinician):
    h = clinician
    query = {"If-None-Exist": f"identifier={MRN_SYSTEM}|MRN-1"}
    first = await post(h, patient("MRN-1"), query)
    assert first.status_code == 201, first.text
    created = first.json()

    again = await post(h, patient("MRN-1", "Other"), query)
    assert again.status_code == 200, again.text
    assert again.json()["id"] == created["id"]
    assert again.json()["name"][0]["family"] == "Quillfeatherstonehaugh"  # nothing written
    assert again.headers["etag"] == 'W/"1"'
    assert again.headers["location"] == f"/fhir/Patient/{created['id']}/_history/1"
    assert await count(h) == 1

    # the "Type?query" form is accepted too
    prefixed = await post(
        h, patient("MRN-1"), {"If-None-Exist": f"Patient?{query['If-None-Exist']}"}
    )
    assert prefixed.status_code == 200 and prefixed.json()["id"] == created["id"]

    assert (await post(h, patient("MRN-2"))).status_code == 201
    assert (await post(h, patient("MRN-2"))).status_code == 201
    many = await post(h, patient("MRN-2"), {"If-None-Exist": f"identifier={MRN_SYSTEM}|MRN-2"})
    assert many.status_code == 412
    assert many.json()["resourceType"] == "OperationOutcome"
    assert await count(h) == 3


@pytest.mark.parametrize(
    "value",
    ["", "nosuchparam=1", "identifier", "_count=1&identifier=x", "Observation?code=1", "a=1&&"],
)
async def test_if_none_exist_malformed_is_400(clinician, value):
    response = await post(clinician, patient("MRN-3"), {"If-None-Exist": value})
    assert response.status_code == 400, response.text
    assert response.json()["resourceType"] == "OperationOutcome"
    assert await count(clinician) == 0


# --- Idempotency-Key -------------------------------------------------------------------------


async def test_idempotency_key_replays_the_first_response(clinician):
    h = clinician
    body = patient("MRN-10")
    first = await post(h, body, {"Idempotency-Key": "order-42"})
    assert first.status_code == 201
    second = await post(h, body, {"Idempotency-Key": "order-42"})
    assert second.status_code == 201
    assert second.json() == first.json()
    for header in ("etag", "location", "last-modified"):
        assert second.headers[header] == first.headers[header]
    history = (await h.client.get("/fhir/Patient/_history")).json()
    assert history["total"] == 1
    # the raw key is not stored
    async with h.services.engine.connect() as conn:
        rows = (await conn.execute(select(fhir_idempotency))).all()
    assert len(rows) == 1 and "order-42" not in repr(rows)
    assert rows[0].status == 201 and rows[0].resource_id == first.json()["id"]


async def test_idempotency_key_with_another_body_is_422(clinician):
    h = clinician
    assert (await post(h, patient("MRN-11"), {"Idempotency-Key": "k1"})).status_code == 201
    other = await post(h, patient("MRN-12"), {"Idempotency-Key": "k1"})
    assert other.status_code == 422
    assert other.json()["resourceType"] == "OperationOutcome"
    assert await count(h) == 1


async def test_concurrent_duplicates_create_one_resource(clinician):
    h = clinician
    body = patient("MRN-13")
    responses = await asyncio.gather(
        *(post(h, body, {"Idempotency-Key": "burst"}) for _ in range(5))
    )
    assert [r.status_code for r in responses] == [201] * 5, [r.text for r in responses]
    assert len({r.json()["id"] for r in responses}) == 1
    assert await count(h) == 1


async def test_keys_are_per_user(clinician):
    h = clinician
    other = await _login(h, "dr.other")
    body = patient("MRN-14")
    a = await post(h, body, {"Idempotency-Key": "same"})
    b = await post(h, body, {"Idempotency-Key": "same", **other})
    assert a.status_code == b.status_code == 201
    assert a.json()["id"] != b.json()["id"]
    assert await count(h) == 2


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there", "caf\u00e9"])
async def test_malformed_key_is_400(clinician, key):
    response = await clinician.client.post(
        "/fhir/Patient",
        content=orjson.dumps(patient("MRN-15")),
        headers=[("content-type", FHIR), ("Idempotency-Key", key.encode("latin-1"))],
    )
    assert response.status_code == 400
    assert response.json()["resourceType"] == "OperationOutcome"
    assert await count(clinician) == 0


async def test_failed_create_does_not_block_retry_and_expired_keys_are_replaced(clinician):
    h = clinician
    bad = b'{"resourceType": "Patient", "birthDate": "2020-13-45"}'
    response = await h.client.post(
        "/fhir/Patient", content=bad, headers={"content-type": FHIR, "Idempotency-Key": "r"}
    )
    assert response.status_code == 422
    first = await post(h, patient("MRN-16"), {"Idempotency-Key": "r"})
    assert first.status_code == 201
    async with h.services.engine.begin() as conn:
        await conn.execute(
            update(fhir_idempotency).values(created_at=fhir_idempotency.c.created_at - 86401)
        )
    # older than 24 h: a new request with that key (even another body) is a new create
    again = await post(h, patient("MRN-17"), {"Idempotency-Key": "r"})
    assert again.status_code == 201 and again.json()["id"] != first.json()["id"]
    assert await count(h) == 2
    async with h.services.engine.connect() as conn:
        rows = (await conn.execute(select(fhir_idempotency))).all()
    assert [row.resource_id for row in rows] == [again.json()["id"]]  # the expired row is gone


async def test_idempotency_key_with_if_none_exist(clinician):
    h = clinician
    headers = {"Idempotency-Key": "both", "If-None-Exist": f"identifier={MRN_SYSTEM}|MRN-18"}
    first = await post(h, patient("MRN-18"), headers)
    assert first.status_code == 201
    replay = await post(h, patient("MRN-18"), headers)
    assert replay.status_code == 201 and replay.json()["id"] == first.json()["id"]
    assert await count(h) == 1


# --- If-Match required -----------------------------------------------------------------------


@pytest.fixture
async def strict(harness_factory, settings_factory):
    h = await harness_factory(settings_factory(fhir_require_if_match=True))
    h.client.headers.update(await _login(h, "dr.strict"))
    return h


async def test_require_if_match(strict):
    h = strict
    created = (await post(h, patient("MRN-20"))).json()
    url = f"/fhir/Patient/{created['id']}"
    created["gender"] = "other"
    missing = await h.client.put(url, json=created)
    assert missing.status_code == 428
    assert missing.json()["resourceType"] == "OperationOutcome"
    ok = await h.client.put(url, json=created, headers={"If-Match": 'W/"1"'})
    assert ok.status_code == 200 and ok.headers["etag"] == 'W/"2"'
    stale = await h.client.put(url, json=created, headers={"If-Match": 'W/"1"'})
    assert stale.status_code == 412

    assert (await h.client.delete(url)).status_code == 428
    assert (await h.client.delete(url, headers={"If-Match": 'W/"1"'})).status_code == 412
    deleted = await h.client.delete(url, headers={"If-Match": 'W/"2"'})
    assert deleted.status_code == 204 and deleted.headers["etag"] == 'W/"3"'
    assert (await h.client.get(url)).status_code == 410


async def test_if_match_is_optional_by_default_but_honoured_on_delete(clinician):
    h = clinician
    created = (await post(h, patient("MRN-21"))).json()
    url = f"/fhir/Patient/{created['id']}"
    assert (await h.client.delete(url, headers={"If-Match": 'W/"7"'})).status_code == 412
    assert (await h.client.delete(url)).status_code == 204


# --- update-as-create ------------------------------------------------------------------------


async def test_update_as_create_only_for_granted_users(harness, harness_factory, settings):
    importer = await harness.add_user("importer", Role.service, organization_id="org-1")
    granted = await harness_factory(
        settings.model_copy(update={"fhir_update_create_users": [importer.id]})
    )
    granted.client.headers["Authorization"] = (
        f"Bearer {(await granted.login('importer'))['access_token']}"
    )
    ordinary = await _login(granted, "dr.plain")

    body = patient("MRN-30")
    body["id"] = "import-00.1"
    denied = await granted.client.put("/fhir/Patient/import-00.1", json=body, headers=ordinary)
    assert denied.status_code == 404
    assert denied.json()["resourceType"] == "OperationOutcome"

    created = await granted.client.put("/fhir/Patient/import-00.1", json=body)
    assert created.status_code == 201, created.text
    assert created.headers["location"] == "/fhir/Patient/import-00.1/_history/1"
    assert created.json()["id"] == "import-00.1"

    body["gender"] = "male"
    updated = await granted.client.put(
        "/fhir/Patient/import-00.1", json=body, headers={"If-Match": 'W/"1"', **ordinary}
    )
    assert updated.status_code == 200 and updated.json()["meta"]["versionId"] == "2"
    again = await granted.client.put("/fhir/Patient/import-00.1", json=body)
    assert again.status_code == 200 and "location" not in again.headers

    bad = dict(body, id="x" * 65)
    assert (await granted.client.put(f"/fhir/Patient/{'x' * 65}", json=bad)).status_code == 404

    capability = (await granted.client.get("/fhir/metadata")).json()
    assert all(r["updateCreate"] is True for r in capability["rest"][0]["resource"])


# --- $everything -----------------------------------------------------------------------------


async def test_patient_everything(clinician):
    h = clinician
    alice = (await post(h, patient("MRN-40"))).json()
    bob = (await post(h, patient("MRN-41"))).json()
    obs = (await post(h, observation_body(alice["id"]))).json()
    cond = (await post(h, condition_body(alice["id"]))).json()
    bobs = (await post(h, observation_body(bob["id"]))).json()
    removed = (await post(h, observation_body(alice["id"]))).json()
    assert (await h.client.delete(f"/fhir/Observation/{removed['id']}")).status_code == 204

    response = await h.client.get(f"/fhir/Patient/{alice['id']}/$everything")
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    urls = [e["fullUrl"] for e in bundle["entry"]]
    assert urls[0] == f"Patient/{alice['id']}"
    assert set(urls) == {
        f"Patient/{alice['id']}",
        f"Observation/{obs['id']}",
        f"Condition/{cond['id']}",
    }
    assert f"Observation/{bobs['id']}" not in urls
    assert bundle["total"] == 3
    assert all(e["search"]["mode"] == "match" for e in bundle["entry"])
    assert bundle["entry"][0]["resource"]["identifier"][0]["value"] == "MRN-40"

    assert (await h.client.get("/fhir/Patient/missing/$everything")).status_code == 404
    unsupported = await h.client.get(f"/fhir/Patient/{alice['id']}/$everything?_since=2020")
    assert unsupported.status_code == 400
    assert (await h.client.delete(f"/fhir/Patient/{bob['id']}")).status_code == 204
    assert (await h.client.get(f"/fhir/Patient/{bob['id']}/$everything")).status_code == 410


# --- CapabilityStatement ---------------------------------------------------------------------


async def test_capability_statement_lists_what_is_implemented(clinician):
    body = (await clinician.client.get("/fhir/metadata")).json()
    rest = body["rest"][0]
    assert rest["interaction"] == [{"code": "transaction"}, {"code": "batch"}]
    resources = {r["type"]: r for r in rest["resource"]}
    patient_entry = resources["Patient"]
    codes = [i["code"] for i in patient_entry["interaction"]]
    assert codes == [
        "create",
        "read",
        "vread",
        "update",
        "delete",
        "history-instance",
        "history-type",
        "search-type",
    ]
    assert patient_entry["conditionalCreate"] is True
    assert patient_entry["updateCreate"] is False
    assert patient_entry["versioning"] == "versioned-update"
    assert patient_entry["searchParam"]  # kept
    assert [o["name"] for o in patient_entry["operation"]] == ["everything", "access-report"]
    assert all("operation" not in r for t, r in resources.items() if t != "Patient")


def test_settings_from_environment(monkeypatch, tmp_path):
    from carevault.config import Settings

    monkeypatch.setenv("CAREVAULT_FHIR_UPDATE_CREATE_USERS", " u-1, u-2 ,")
    monkeypatch.setenv("CAREVAULT_FHIR_REQUIRE_IF_MATCH", "true")
    settings = Settings(data_dir=tmp_path)
    assert settings.fhir_update_create_users == ["u-1", "u-2"]
    assert settings.fhir_require_if_match is True
    monkeypatch.delenv("CAREVAULT_FHIR_UPDATE_CREATE_USERS")
    monkeypatch.delenv("CAREVAULT_FHIR_REQUIRE_IF_MATCH")
    defaults = Settings(data_dir=tmp_path)
    assert defaults.fhir_update_create_users == [] and defaults.fhir_require_if_match is False
