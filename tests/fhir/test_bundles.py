"""Transaction and batch Bundles through HTTP (POST /fhir): urn:uuid references resolved,
a transaction all or nothing, a batch entry by entry."""

from __future__ import annotations

import copy
import uuid

import orjson
import pytest
from sqlalchemy import func, select

from carevault.db.tables import (
    fhir_compartments,
    fhir_index_dates,
    fhir_index_keys,
    fhir_resources,
    fhir_versions,
)
from carevault.fhir.bundles import MAX_ENTRIES, rewrite_references
from carevault.identity.roles import Role

FHIR = "application/fhir+json"
TABLES = (fhir_resources, fhir_versions, fhir_index_keys, fhir_index_dates, fhir_compartments)


@pytest.fixture
async def clinician(harness):
    # bundle mechanics, not who may act: a service account may write every type, any patient
    await harness.add_user("dr.bundle", Role.service)
    token = (await harness.login("dr.bundle"))["access_token"]
    harness.client.headers["Authorization"] = f"Bearer {token}"
    return harness


def urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def synthea_transaction() -> tuple[dict, dict[str, str]]:
    """Patient, Encounter, Observation and Condition linked by urn:uuid references."""
    urls = {"patient": urn(), "encounter": urn(), "observation": urn(), "condition": urn()}
    patient = {
        "resourceType": "Patient",
        "id": "synthea-id-ignored",
        "identifier": [
            {"system": "https://github.com/synthetichealth/synthea", "value": "1f2e3d4c"}
        ],
        "name": [{"use": "official", "family": "Bundlewick", "given": ["Ada"]}],
        "gender": "female",
        "birthDate": "1970-01-02",
    }
    encounter = {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "type": [{"coding": [{"system": "http://snomed.info/sct", "code": "185349003"}]}],
        "subject": {"reference": urls["patient"], "display": "Ada Bundlewick"},
        "period": {"start": "2024-05-01T10:00:00Z", "end": "2024-05-01T10:30:00Z"},
    }
    observation = {
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
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": urls["patient"]},
        "encounter": {"reference": urls["encounter"]},
        "effectiveDateTime": "2024-05-01T10:15:00Z",
        "valueQuantity": {"value": 72, "unit": "beats/minute"},
    }
    condition = {
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
        "subject": {"reference": urls["patient"]},
        "encounter": {"reference": urls["encounter"]},
        # a nested reference, several levels down
        "evidence": [{"detail": [{"reference": urls["observation"]}]}],
        "onsetDateTime": "2024-05-01T10:00:00Z",
    }
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": urls[name],
                "resource": resource,
                "request": {"method": "POST", "url": resource["resourceType"]},
            }
            for name, resource in (
                ("patient", patient),
                ("encounter", encounter),
                ("observation", observation),
                ("condition", condition),
            )
        ],
    }
    return bundle, urls


async def post_bundle(h, bundle, status: int | None = 200, headers: dict | None = None):
    response = await h.client.post(
        "/fhir", content=orjson.dumps(bundle), headers={"content-type": FHIR, **(headers or {})}
    )
    if status is not None:
        assert response.status_code == status, response.text
    return response


async def counts(h) -> dict[str, int]:
    async with h.services.engine.connect() as conn:
        return {
            t.name: (await conn.execute(select(func.count()).select_from(t))).scalar_one()
            for t in TABLES
        }


async def history_total(h, resource_type: str = "Patient") -> int:
    response = await h.client.get(f"/fhir/{resource_type}/_history")
    assert response.status_code == 200
    return response.json()["total"]


async def create(h, body) -> dict:
    response = await h.client.post(
        f"/fhir/{body['resourceType']}", json=body, headers={"content-type": FHIR}
    )
    assert response.status_code == 201, response.text
    return response.json()


async def test_synthea_transaction_creates_all_and_rewrites_references(clinician):
    h = clinician
    bundle, _ = synthea_transaction()
    response = await post_bundle(h, bundle)
    assert response.headers["content-type"].startswith(FHIR)
    assert response.headers["cache-control"] == "no-store"
    result = response.json()
    assert result["resourceType"] == "Bundle" and result["type"] == "transaction-response"
    assert len(result["entry"]) == 4
    ids = {}
    for entry, expected in zip(
        result["entry"], ("Patient", "Encounter", "Observation", "Condition"), strict=True
    ):
        assert entry["response"]["status"] == "201 Created"
        assert entry["response"]["etag"] == 'W/"1"'
        assert entry["response"]["lastModified"].endswith("Z")
        resource_type, resource_id, _, version = entry["response"]["location"].split("/")
        assert (resource_type, version) == (expected, "1")
        ids[expected] = resource_id
    assert ids["Patient"] != "synthea-id-ignored"
    assert len(set(ids.values())) == 4

    observation = (await h.client.get(f"/fhir/Observation/{ids['Observation']}")).json()
    assert observation["subject"]["reference"] == f"Patient/{ids['Patient']}"
    assert observation["encounter"]["reference"] == f"Encounter/{ids['Encounter']}"
    condition = (await h.client.get(f"/fhir/Condition/{ids['Condition']}")).json()
    assert condition["evidence"][0]["detail"][0]["reference"] == f"Observation/{ids['Observation']}"
    assert "urn:uuid" not in orjson.dumps(condition).decode()
    encounter = (await h.client.get(f"/fhir/Encounter/{ids['Encounter']}")).json()
    assert encounter["subject"] == {
        "reference": f"Patient/{ids['Patient']}",
        "display": "Ada Bundlewick",
    }
    # the resolved references put every resource into the new patient's compartment
    async with h.services.engine.connect() as conn:
        members = (
            (
                await conn.execute(
                    select(fhir_compartments.c.resource_type).where(
                        fhir_compartments.c.patient_id == ids["Patient"]
                    )
                )
            )
            .scalars()
            .all()
        )
    assert sorted(members) == ["Condition", "Encounter", "Observation", "Patient"]


async def test_transaction_with_one_invalid_entry_stores_nothing(clinician):
    h = clinician
    await create(h, {"resourceType": "Patient", "gender": "male"})
    before, patients = await counts(h), await history_total(h)
    bundle, _ = synthea_transaction()
    bundle["entry"][3]["resource"]["onsetDateTime"] = "2024-13-45"
    response = await post_bundle(h, bundle, status=None)
    assert response.status_code in (400, 422)
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["expression"] == ["Bundle.entry[3].resource.onsetDateTime"]
    assert "2024-13-45" not in response.text
    bundle, _ = synthea_transaction()
    del bundle["entry"][2]["resource"]["status"]
    response = await post_bundle(h, bundle, status=422)
    assert response.json()["issue"][0]["expression"] == ["Bundle.entry[2].resource.status"]
    assert await counts(h) == before
    assert await history_total(h) == patients == 1
    assert await history_total(h, "Observation") == 0


async def test_transaction_if_match_conflict_stores_nothing(clinician):
    h = clinician
    patient = await create(h, {"resourceType": "Patient", "gender": "male"})
    before = await counts(h)
    bundle, urls = synthea_transaction()
    changed = copy.deepcopy(patient)
    changed["gender"] = "other"
    bundle["entry"].append(
        {
            "fullUrl": f"http://example.org/fhir/Patient/{patient['id']}",
            "resource": changed,
            "request": {"method": "PUT", "url": f"Patient/{patient['id']}", "ifMatch": 'W/"7"'},
        }
    )
    response = await post_bundle(h, bundle, status=None)
    assert response.status_code in (409, 412)
    assert response.json()["issue"][0]["expression"] == ["Bundle.entry[4]"]
    assert await counts(h) == before
    assert (await h.client.get(f"/fhir/Patient/{patient['id']}")).json()["gender"] == "male"

    # with the right version the same transaction applies, the PUT included
    bundle["entry"][4]["request"]["ifMatch"] = 'W/"1"'
    result = (await post_bundle(h, bundle)).json()
    assert result["entry"][4]["response"]["status"] == "200 OK"
    assert result["entry"][4]["response"]["etag"] == 'W/"2"'
    assert (await h.client.get(f"/fhir/Patient/{patient['id']}")).json()["gender"] == "other"


async def test_transaction_put_of_a_missing_resource_is_not_a_create(clinician):
    h = clinician
    bundle, _ = synthea_transaction()
    bundle["entry"].append(
        {
            "resource": {"resourceType": "Patient", "id": "nobody"},
            "request": {"method": "PUT", "url": "Patient/nobody"},
        }
    )
    before = await counts(h)
    response = await post_bundle(h, bundle, status=404)
    assert response.json()["resourceType"] == "OperationOutcome"
    assert await counts(h) == before


async def test_put_and_delete_entries_and_references_to_put_full_urls(clinician):
    h = clinician
    patient = await create(h, {"resourceType": "Patient", "gender": "male"})
    doomed = await create(
        h,
        {
            "resourceType": "Observation",
            "status": "final",
            "code": {"text": "x"},
            "subject": {"reference": f"Patient/{patient['id']}"},
        },
    )
    put_url = urn()
    changed = dict(patient, gender="female")
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": urn(),
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"text": "y"},
                    "subject": {"reference": put_url},
                },
                "request": {"method": "POST", "url": "Observation"},
            },
            {"request": {"method": "DELETE", "url": f"Observation/{doomed['id']}"}},
            {
                "fullUrl": put_url,
                "resource": changed,
                "request": {"method": "PUT", "url": f"Patient/{patient['id']}"},
            },
            {"request": {"method": "GET", "url": f"Patient/{patient['id']}"}},
        ],
    }
    result = (await post_bundle(h, bundle)).json()
    statuses = [e["response"]["status"] for e in result["entry"]]
    assert statuses == ["201 Created", "204 No Content", "200 OK", "200 OK"]
    assert result["entry"][3]["resource"]["gender"] == "female"  # GET after the writes
    assert (await h.client.get(f"/fhir/Observation/{doomed['id']}")).status_code == 410
    new_id = result["entry"][0]["fullUrl"].split("/")[1]
    new = (await h.client.get(f"/fhir/Observation/{new_id}")).json()
    assert new["subject"]["reference"] == f"Patient/{patient['id']}"


async def test_batch_with_one_bad_entry_stores_the_others(clinician):
    h = clinician
    existing = await create(h, {"resourceType": "Patient", "gender": "male"})
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                "resource": {"resourceType": "Patient", "gender": "female"},
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": {"resourceType": "Patient", "birthDate": "1999-99-99"},
                "request": {"method": "POST", "url": "Patient"},
            },
            {
                "resource": {"resourceType": "Patient", "gender": "other"},
                "request": {"method": "POST", "url": "Patient"},
            },
            {"request": {"method": "GET", "url": f"Patient/{existing['id']}"}},
            {"request": {"method": "GET", "url": "Patient/missing"}},
            {"request": {"method": "GET", "url": "Patient?name=x"}},
            {
                "request": {"method": "PUT", "url": "Patient/missing"},
                "resource": {"resourceType": "Patient", "id": "missing"},
            },
            {"request": {"method": "PATCH", "url": f"Patient/{existing['id']}"}},
        ],
    }
    response = await post_bundle(h, bundle)
    result = response.json()
    assert result["type"] == "batch-response"
    statuses = [e["response"]["status"] for e in result["entry"]]
    assert statuses == [
        "201 Created",
        "422 Unprocessable Entity",
        "201 Created",
        "200 OK",
        "404 Not Found",
        "400 Bad Request",
        "404 Not Found",
        "400 Bad Request",
    ]
    bad = result["entry"][1]["response"]["outcome"]
    assert bad["resourceType"] == "OperationOutcome"
    assert bad["issue"][0]["expression"] == ["Bundle.entry[1].resource.birthDate"]
    assert "1999-99-99" not in response.text
    assert result["entry"][3]["resource"]["id"] == existing["id"]
    assert await history_total(h) == 3


async def test_unresolvable_urn_uuid_in_a_transaction_is_refused(clinician):
    h = clinician
    bundle, _ = synthea_transaction()
    bundle["entry"][2]["resource"]["subject"]["reference"] = urn()
    before = await counts(h)
    response = await post_bundle(h, bundle, status=400)
    assert response.json()["issue"][0]["expression"] == ["Bundle.entry[2].resource"]
    assert await counts(h) == before


async def test_bundle_envelope_errors(clinician):
    h = clinician
    bundle, _ = synthea_transaction()
    duplicate = copy.deepcopy(bundle)
    duplicate["entry"][1]["fullUrl"] = duplicate["entry"][0]["fullUrl"]
    patient = {"resourceType": "Patient", "id": "p1"}
    two_on_one = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": patient, "request": {"method": "PUT", "url": "Patient/p1"}},
            {"request": {"method": "DELETE", "url": "Patient/p1"}},
        ],
    }
    cases = [
        {"resourceType": "Patient"},
        [],
        dict(bundle, type="collection"),
        dict(bundle, type="document"),
        dict(bundle, type=None),
        dict(bundle, entry={"not": "a list"}),
        duplicate,
        two_on_one,
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "request": {"method": "POST", "url": "Observation"},
                    "resource": {"resourceType": "Patient"},
                }
            ],
        },
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=x"},
                    "resource": {"resourceType": "Patient"},
                }
            ],
        },
        {"resourceType": "Bundle", "type": "transaction", "entry": ["not an entry"]},
    ]
    for case in cases:
        response = await post_bundle(h, case, status=None)
        assert response.status_code in (400, 422), (case, response.text)
        assert response.json()["resourceType"] == "OperationOutcome"
    broken = await h.client.post(
        "/fhir", content=b'{"resourceType": "Bundle",', headers={"content-type": FHIR}
    )
    assert broken.status_code == 400
    assert await counts(h) == {t.name: 0 for t in TABLES}


async def test_huge_and_deeply_nested_bundles_are_refused(clinician):
    h = clinician
    many = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "GET", "url": "Patient/x"}}] * (MAX_ENTRIES + 1),
    }
    response = await post_bundle(h, many, status=400)
    assert response.json()["issue"][0]["expression"] == ["Bundle.entry"]

    deep: dict = {"url": "http://example.org/x", "valueString": "v"}
    for _ in range(60):  # 120 levels: over validation's MAX_DEPTH, under orjson's limit
        deep = {"url": "http://example.org/x", "extension": [deep]}
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": urn(),
                "request": {"method": "POST", "url": "Patient"},
                "resource": {"resourceType": "Patient", "extension": [deep]},
            }
        ],
    }
    response = await post_bundle(h, bundle, status=None)
    assert response.status_code in (400, 422)
    assert response.json()["resourceType"] == "OperationOutcome"

    too_deep = (
        b'{"resourceType": "Bundle", "type": "batch", "entry": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    )
    response = await h.client.post("/fhir", content=too_deep, headers={"content-type": FHIR})
    assert response.status_code == 400

    big = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                "request": {"method": "POST", "url": "Patient"},
                "resource": {"resourceType": "Patient", "name": [{"text": "x" * 1000}]},
            }
        ]
        * 1100,
    }
    response = await post_bundle(h, big, status=None)
    assert response.status_code in (400, 413)
    assert await counts(h) == {t.name: 0 for t in TABLES}


async def test_delete_entry_and_empty_bundles(clinician):
    h = clinician
    patient = await create(h, {"resourceType": "Patient", "gender": "male"})
    for bundle_type in ("transaction", "batch"):
        result = (await post_bundle(h, {"resourceType": "Bundle", "type": bundle_type})).json()
        assert result["type"] == f"{bundle_type}-response" and result["entry"] == []
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "DELETE", "url": f"Patient/{patient['id']}"}},
            {"request": {"method": "DELETE", "url": "Patient/missing"}},
        ],
    }
    result = (await post_bundle(h, bundle)).json()
    assert [e["response"]["status"] for e in result["entry"]] == ["204 No Content", "404 Not Found"]
    assert result["entry"][0]["response"]["etag"] == 'W/"2"'
    assert (await h.client.get(f"/fhir/Patient/{patient['id']}")).status_code == 410


async def test_only_roles_that_may_write_and_only_with_a_token(harness):
    """A transaction is decided entry by entry as the interactions it stands for: without a
    token 401; billing (which may create nothing, under any purpose of use) 403, nothing
    stored."""
    bundle, _ = synthea_transaction()
    before = await counts(harness)
    assert (await post_bundle(harness, bundle, status=401)).status_code == 401
    await harness.add_user("billing.bundle", Role.billing)
    token = (await harness.login("billing.bundle"))["access_token"]
    for purpose in ("TREAT", "HPAYMT"):
        response = await harness.client.post(
            "/fhir",
            content=orjson.dumps(bundle),
            headers={
                "content-type": FHIR,
                "Authorization": f"Bearer {token}",
                "X-Purpose-Of-Use": purpose,
            },
        )
        assert response.status_code == 403, (purpose, response.text)
        assert response.json()["resourceType"] == "OperationOutcome"
    assert await counts(harness) == before


def test_rewrite_references_is_iterative_and_copies():
    mapping = {"urn:uuid:a": "Patient/1"}
    deep: dict = {"reference": "urn:uuid:a"}
    for _ in range(5000):
        deep = {"nested": [deep]}
    rewritten, unresolved = rewrite_references(deep, mapping)
    assert not unresolved
    node = rewritten
    for _ in range(5000):
        node = node["nested"][0]
    assert node == {"reference": "Patient/1"}
    original = deep
    for _ in range(5000):
        original = original["nested"][0]
    assert original == {"reference": "urn:uuid:a"}  # the input is not changed
    assert rewrite_references({"reference": "urn:uuid:b"}, mapping)[1] is True
    assert rewrite_references({"reference": "Patient/2"}, mapping) == (
        {"reference": "Patient/2"},
        False,
    )


async def test_write_many_rolls_back_a_failure_inside_the_transaction(clinician):
    """The store itself: an insert that fails after other writes of the same call (a create
    under an id that exists) leaves every earlier write undone."""
    from sqlalchemy.exc import IntegrityError

    from carevault.fhir.store import VersionConflict, WriteOperation

    h = clinician
    store = h.services.store
    a = await create(h, {"resourceType": "Patient", "gender": "male"})
    b = await create(h, {"resourceType": "Patient", "gender": "male"})
    before = await counts(h)
    operations = [
        WriteOperation("update", "Patient", a["id"], dict(a, gender="female")),
        WriteOperation(
            "create",
            "Observation",
            str(uuid.uuid4()),
            {
                "resourceType": "Observation",
                "status": "final",
                "code": {"text": "x"},
                "subject": {"reference": f"Patient/{a['id']}"},
            },
        ),
        WriteOperation("create", "Patient", b["id"], {"resourceType": "Patient"}),
    ]
    with pytest.raises(IntegrityError):
        await store.write_many(operations)
    assert await counts(h) == before
    assert (await store.read("Patient", a["id"])).body["gender"] == "male"

    with pytest.raises(VersionConflict) as conflict:
        await store.write_many(
            [operations[1], WriteOperation("delete", "Patient", b["id"], if_match=3)]
        )
    assert conflict.value.operation_index == 1
    with pytest.raises(ValueError):
        await store.write_many([operations[0], operations[0]])
    assert await counts(h) == before

    results = await store.write_many(operations[:2])
    assert [(r.resource_type, r.version) for r in results] == [("Patient", 2), ("Observation", 1)]
    assert results[0].last_updated == results[1].last_updated
    assert (await store.read("Patient", a["id"])).body["gender"] == "female"


async def test_absolute_full_urls_and_their_relative_references(clinician):
    """A server export: absolute fullUrls, relative references between the resources."""
    h = clinician
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "http://other.example/fhir/Observation/o-1",
                "resource": {
                    "resourceType": "Observation",
                    "id": "o-1",
                    "status": "final",
                    "code": {"text": "x"},
                    "subject": {"reference": "Patient/p-1"},
                    "focus": [{"reference": "http://other.example/fhir/Patient/p-1"}],
                },
                "request": {"method": "POST", "url": "Observation"},
            },
            {
                "fullUrl": "http://other.example/fhir/Patient/p-1",
                "resource": {"resourceType": "Patient", "id": "p-1"},
                "request": {"method": "POST", "url": "Patient"},
            },
        ],
    }
    representation = {"Prefer": "return=representation"}
    result = (await post_bundle(h, bundle, headers=representation)).json()
    observation_id = result["entry"][0]["fullUrl"].split("/")[1]
    patient_id = result["entry"][1]["fullUrl"].split("/")[1]
    assert patient_id != "p-1"
    observation = (await h.client.get(f"/fhir/Observation/{observation_id}")).json()
    assert observation["subject"]["reference"] == f"Patient/{patient_id}"
    assert observation["focus"][0]["reference"] == f"Patient/{patient_id}"
    assert result["entry"][0]["resource"]["subject"]["reference"] == f"Patient/{patient_id}"


async def test_write_many_retries_a_lost_compare_and_swap(clinician):
    """A concurrent update between the read and the write transaction: the whole call is
    read, encrypted and written again (or, with If-Match, refused)."""
    from carevault.fhir.store import VersionConflict, WriteOperation

    h = clinician
    store = h.services.store
    a = await create(h, {"resourceType": "Patient", "gender": "male"})
    envelope = store._envelope
    real_encrypt = envelope.encrypt
    interfered = []

    async def encrypt_with_a_rival(*args, **kwargs):
        if not interfered:
            interfered.append(True)
            await store.update("Patient", a["id"], dict(a, gender="other"))
        return await real_encrypt(*args, **kwargs)

    envelope.encrypt = encrypt_with_a_rival
    try:
        [stored] = await store.write_many(
            [WriteOperation("update", "Patient", a["id"], dict(a, gender="female"))]
        )
        assert stored.version == 3 and interfered
        interfered.clear()
        with pytest.raises(VersionConflict):
            await store.write_many(
                [
                    WriteOperation(
                        "update", "Patient", a["id"], dict(a, gender="unknown"), if_match=3
                    )
                ]
            )
    finally:
        envelope.encrypt = real_encrypt
    current = await store.read("Patient", a["id"])
    assert (current.version, current.body["gender"]) == (4, "other")


async def test_write_entries_carry_the_resource_only_with_return_representation(clinician):
    h = clinician
    existing = await create(h, {"resourceType": "Patient", "gender": "male"})
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": {"resourceType": "Patient", "gender": "female"},
                "request": {"method": "POST", "url": "Patient"},
            },
            {"request": {"method": "GET", "url": f"Patient/{existing['id']}"}},
        ],
    }
    minimal = await post_bundle(h, bundle)
    written, read = minimal.json()["entry"]
    assert "resource" not in written  # response element only: status, location, etag...
    assert set(written["response"]) == {"status", "location", "etag", "lastModified"}
    assert written["fullUrl"].startswith("Patient/")
    assert read["resource"]["id"] == existing["id"]  # a read's answer is the resource
    assert "preference-applied" not in minimal.headers

    full = await post_bundle(h, bundle, headers={"Prefer": "return=representation"})
    written, read = full.json()["entry"]
    assert written["resource"]["gender"] == "female"
    assert written["resource"]["id"] == written["fullUrl"].split("/")[1]
    assert full.headers["preference-applied"] == "return=representation"
    other = await post_bundle(h, bundle, headers={"Prefer": "return=minimal"})
    assert "resource" not in other.json()["entry"][0]
