"""Idempotency-Key on transaction and batch Bundles (POST /fhir): replay without a second write,
another body 422, concurrent duplicates write once, the recorded response holds no PHI and
fails closed when altered (both stores)."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from sqlalchemy import select, update

from carevault.db.tables import fhir_idempotency, fhir_idempotency_responses
from carevault.identity.roles import Role
from tests.audit.trail import audit_documents
from tests.fhir.test_bundles import FHIR, counts, synthea_transaction

FAMILY = "Bundlewick"  # the family name in synthea_transaction()


@pytest.fixture
async def clinician(harness):
    await harness.add_user("dr.idem", Role.service)  # may write every type, any patient
    token = (await harness.login("dr.idem"))["access_token"]
    harness.client.headers["Authorization"] = f"Bearer {token}"
    return harness


async def post(h, body: dict, key: str | None = "tx-1", **headers: str):
    if key is not None:
        headers["Idempotency-Key"] = key
    return await h.client.post(
        "/fhir", content=orjson.dumps(body), headers={"content-type": FHIR, **headers}
    )


def batch(*genders: str) -> dict:
    return {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {
                "resource": {"resourceType": "Patient", "gender": gender},
                "request": {"method": "POST", "url": "Patient"},
            }
            for gender in genders
        ]
        + [{"request": {"method": "GET", "url": "Patient/missing"}}],
    }


async def test_replay_returns_the_first_response_and_writes_nothing(clinician):
    h = clinician
    bundle, _ = synthea_transaction()
    first = await post(h, bundle)
    assert first.status_code == 200, first.text
    after_first = await counts(h)
    assert after_first["fhir_resources"] == 4

    second = await post(h, bundle)
    assert second.status_code == 200
    assert second.content == first.content  # identical, Bundle id included
    assert await counts(h) == after_first  # no second write of anything

    # a replay is rendered as its request asks: the recorded versions, read again
    full = await post(h, bundle, Prefer="return=representation")
    assert await counts(h) == after_first
    entries = full.json()["entry"]
    assert [e["response"] for e in entries] == [e["response"] for e in first.json()["entry"]]
    patient = entries[0]["resource"]
    assert patient["name"][0]["family"] == FAMILY
    assert f"Patient/{patient['id']}" == entries[0]["fullUrl"]
    assert patient["meta"]["versionId"] == "1"


async def test_same_key_with_another_body_is_422_and_writes_nothing(clinician):
    h = clinician
    bundle, _ = synthea_transaction()
    assert (await post(h, bundle)).status_code == 200
    before = await counts(h)
    other, _ = synthea_transaction()  # other urn:uuids: another body
    response = await post(h, other)
    assert response.status_code == 422
    assert response.json()["resourceType"] == "OperationOutcome"
    assert await counts(h) == before
    # a key used for a create never replays as a Bundle (nor the other way round)
    created = await h.client.post(
        "/fhir/Patient",
        content=b'{"resourceType": "Patient"}',
        headers={"content-type": FHIR, "Idempotency-Key": "mixed"},
    )
    assert created.status_code == 201
    assert (await post(h, bundle, key="mixed")).status_code == 422


async def test_concurrent_requests_with_one_key_write_once(clinician):
    h = clinician
    bundle, _ = synthea_transaction()
    responses = await asyncio.gather(*(post(h, bundle, key="burst") for _ in range(5)))
    assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]
    assert len({r.content for r in responses}) == 1
    assert (await counts(h))["fhir_resources"] == 4


async def test_batch_replay_keeps_failed_entries_and_writes_nothing(clinician):
    h = clinician
    first = await post(h, batch("female", "male"), key="b-1")
    assert first.status_code == 200
    statuses = [e["response"]["status"] for e in first.json()["entry"]]
    assert statuses == ["201 Created", "201 Created", "404 Not Found"]
    before = await counts(h)
    second = await post(h, batch("female", "male"), key="b-1")
    assert second.content == first.content
    assert await counts(h) == before


async def test_refused_transaction_releases_the_key(clinician):
    h = clinician
    bundle, _ = synthea_transaction()
    broken = orjson.loads(orjson.dumps(bundle))
    broken["entry"][1]["resource"]["status"] = 12  # invalid: the whole transaction is refused
    refused = await post(h, broken, key="retry")
    assert refused.status_code == 422
    assert (await counts(h))["fhir_resources"] == 0
    fixed = await post(h, bundle, key="retry")
    assert fixed.status_code == 200
    assert (await counts(h))["fhir_resources"] == 4


@pytest.mark.parametrize("key", ["", "x" * 256, "tab\there"])
async def test_malformed_key_is_400(clinician, key):
    h = clinician
    bundle, _ = synthea_transaction()
    response = await h.client.post(
        "/fhir",
        content=orjson.dumps(bundle),
        headers=[("content-type", FHIR), ("Idempotency-Key", key.encode("latin-1"))],
    )
    assert response.status_code == 400
    assert (await counts(h))["fhir_resources"] == 0


async def test_recorded_response_holds_no_phi_and_fails_closed_when_altered(clinician):
    h = clinician
    bundle, _ = synthea_transaction()
    first = await post(h, bundle, Prefer="return=representation")
    assert FAMILY in first.text  # the client asked for the resources
    async with h.services.engine.connect() as conn:
        rows = (await conn.execute(select(fhir_idempotency_responses))).all()
        claims = (await conn.execute(select(fhir_idempotency))).all()
    assert len(rows) == 1 and len(claims) == 1
    recorded = bytes(rows[0].response)
    for needle in (FAMILY, "Ada", "1970-01-02", "1f2e3d4c", "tx-1", "Patient/"):
        assert needle.encode() not in recorded, needle  # sealed, and no body at all
    assert "tx-1" not in repr(claims)

    # a row altered in the database is never replayed: 500 and a security event
    flipped = recorded[:-1] + bytes([recorded[-1] ^ 1])
    async with h.services.engine.begin() as conn:
        await conn.execute(update(fhir_idempotency_responses).values(response=flipped))
    replay = await post(h, bundle)
    assert replay.status_code == 500
    assert replay.json()["resourceType"] == "OperationOutcome"
    assert FAMILY not in replay.text
    events = await audit_documents(h.services.engine, "security.record_integrity_failure")
    assert len(events) == 1


async def test_expired_keys_write_again_and_their_responses_are_dropped(clinician):
    h = clinician
    bundle, _ = synthea_transaction()
    assert (await post(h, bundle, key="old")).status_code == 200
    async with h.services.engine.begin() as conn:
        for table in (fhir_idempotency, fhir_idempotency_responses):
            await conn.execute(update(table).values(created_at=table.c.created_at - 86401))
    again = await post(h, bundle, key="old")  # older than 24 h: a new request
    assert again.status_code == 200
    assert (await counts(h))["fhir_resources"] == 8
    async with h.services.engine.connect() as conn:
        rows = (await conn.execute(select(fhir_idempotency_responses))).all()
    assert len(rows) == 1  # the expired record is gone, the new one is there
