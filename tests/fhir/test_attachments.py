"""Inline binary content (Attachment.data anywhere, Binary.data): at most
`fhir_max_attachment_bytes` decoded bytes per element (413 naming the element, nothing stored),
strict base64 (400 naming the element), byte-exact round trips - on every FHIR write path."""

from __future__ import annotations

import base64
import os

import orjson
import pytest
from sqlalchemy import func, select

from carevault.db.tables import fhir_resources, fhir_versions
from carevault.fhir.validation import (
    DEFAULT_MAX_ATTACHMENT_BYTES,
    FhirValidationError,
    validate_resource,
)
from carevault.identity.roles import Role

FHIR = "application/fhir+json"
LIMIT = 1024  # a small configured limit for most tests: the cases stay fast


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def document(data: str, **extra) -> dict:
    return {
        "resourceType": "DocumentReference",
        "status": "current",
        "content": [{"attachment": {"contentType": "application/octet-stream", "data": data}}],
        **extra,
    }


async def _login(h, name: str) -> None:
    await h.add_user(name, Role.service)  # attachment limits, not access: may write anything
    token = (await h.login(name))["access_token"]
    h.client.headers["Authorization"] = f"Bearer {token}"


@pytest.fixture
async def small(harness_factory, settings_factory):
    """A server whose limit is LIMIT bytes."""
    h = await harness_factory(settings_factory(fhir_max_attachment_bytes=LIMIT))
    await _login(h, "dr.attach")
    return h


@pytest.fixture
async def default(harness):
    await _login(harness, "dr.attach.default")
    return harness


async def rows(h) -> tuple[int, int]:
    async with h.services.engine.connect() as conn:
        resources = (
            await conn.execute(select(func.count()).select_from(fhir_resources))
        ).scalar_one()
        versions = (
            await conn.execute(select(func.count()).select_from(fhir_versions))
        ).scalar_one()
    return resources, versions


async def post(h, body: dict, url: str | None = None):
    return await h.client.post(
        url or f"/fhir/{body['resourceType']}",
        content=orjson.dumps(body),
        headers={"content-type": FHIR},
    )


def assert_outcome(response, status: int, code: str, expression: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    issues = [i for i in body["issue"] if i.get("expression") == [expression]]
    assert issues and issues[0]["code"] == code, body


# --- the default limit, through HTTP -----------------------------------------------------------


async def test_default_limit_just_under_round_trips_byte_exact_and_just_over_is_413(default):
    h = default
    assert h.services.settings.fhir_max_attachment_bytes == DEFAULT_MAX_ATTACHMENT_BYTES
    payload = os.urandom(DEFAULT_MAX_ATTACHMENT_BYTES)  # exactly the limit: accepted
    created = await post(h, document(b64(payload)))
    assert created.status_code == 201, created.text[:300]
    read = await h.client.get(f"/fhir/DocumentReference/{created.json()['id']}")
    data = read.json()["content"][0]["attachment"]["data"]
    assert base64.b64decode(data, validate=True) == payload

    before = await rows(h)
    over = await post(h, document(b64(payload + b"\x00")))
    assert_outcome(over, 413, "too-long", "DocumentReference.content[0].attachment.data")
    assert b64(payload)[:64] not in over.text
    assert await rows(h) == before


# --- every place an Attachment (or Binary.data) can be ------------------------------------------

OVER = b64(b"x" * (LIMIT + 1))
FITS = b64(b"y" * LIMIT)

PLACES = [
    (document(OVER), "DocumentReference.content[0].attachment.data"),
    (
        {"resourceType": "Binary", "contentType": "text/plain", "data": OVER},
        "Binary.data",
    ),
    (
        {"resourceType": "Media", "status": "completed", "content": {"data": OVER}},
        "Media.content.data",
    ),
    (
        {
            "resourceType": "Communication",
            "status": "completed",
            "payload": [{"contentString": "see attached"}, {"contentAttachment": {"data": OVER}}],
        },
        "Communication.payload[1].contentAttachment.data",
    ),
    (
        {"resourceType": "Patient", "photo": [{"data": FITS}, {"data": OVER}]},
        "Patient.photo[1].data",
    ),
    (
        document(
            FITS,
            contained=[{"resourceType": "Binary", "contentType": "text/plain", "data": OVER}],
        ),
        "DocumentReference.contained[0].data",
    ),
    (
        {
            "resourceType": "Patient",
            "extension": [{"url": "http://example.org/x", "valueAttachment": {"data": OVER}}],
        },
        "Patient.extension[0].valueAttachment.data",
    ),
]


@pytest.mark.parametrize(("body", "path"), PLACES, ids=[p for _, p in PLACES])
async def test_over_the_limit_anywhere_is_413_naming_the_element(small, body, path):
    h = small
    response = await post(h, body)
    assert_outcome(response, 413, "too-long", path)
    assert OVER[:40] not in response.text
    assert await rows(h) == (0, 0)


async def test_exactly_the_limit_is_accepted_everywhere(small):
    h = small
    for body, _ in PLACES:
        fitting = orjson.loads(orjson.dumps(body).replace(OVER.encode(), FITS.encode()))
        response = await post(h, fitting)
        assert response.status_code == 201, response.text


@pytest.mark.parametrize(
    "data",
    [
        "not base64!",
        "YQ==YQ==",  # data after padding: the library's decoder keeps only the first group
        "YQ",  # missing padding
        "YQ=",
        "Y\u00e9Q=",
    ],
)
async def test_invalid_base64_is_400_naming_the_element(small, data):
    h = small
    response = await post(h, document(data))
    assert_outcome(response, 400, "value", "DocumentReference.content[0].attachment.data")
    assert await rows(h) == (0, 0)


async def test_base64_with_line_breaks_is_accepted_and_kept_byte_exact(small):
    h = small
    payload = os.urandom(300)
    wrapped = "\n".join(base64.encodebytes(payload).decode().split())  # MIME-style lines
    created = await post(h, document(wrapped))
    assert created.status_code == 201, created.text
    data = created.json()["content"][0]["attachment"]["data"]
    assert base64.b64decode(data, validate=True) == payload


# --- update, transaction, batch -----------------------------------------------------------------


async def test_update_over_the_limit_is_413_and_changes_nothing(small):
    h = small
    created = (await post(h, document(FITS))).json()
    changed = dict(created, content=[{"attachment": {"data": OVER}}])
    response = await h.client.put(
        f"/fhir/DocumentReference/{created['id']}",
        content=orjson.dumps(changed),
        headers={"content-type": FHIR},
    )
    assert_outcome(response, 413, "too-long", "DocumentReference.content[0].attachment.data")
    current = await h.client.get(f"/fhir/DocumentReference/{created['id']}")
    assert current.json()["meta"]["versionId"] == "1"
    assert await rows(h) == (1, 1)
    bad = dict(created, content=[{"attachment": {"data": "YQ==YQ=="}}])
    response = await h.client.put(
        f"/fhir/DocumentReference/{created['id']}",
        content=orjson.dumps(bad),
        headers={"content-type": FHIR},
    )
    assert_outcome(response, 400, "value", "DocumentReference.content[0].attachment.data")
    assert await rows(h) == (1, 1)


def _bundle(kind: str) -> dict:
    return {
        "resourceType": "Bundle",
        "type": kind,
        "entry": [
            {"resource": document(FITS), "request": {"method": "POST", "url": "DocumentReference"}},
            {
                "resource": {"resourceType": "Binary", "contentType": "text/plain", "data": OVER},
                "request": {"method": "POST", "url": "Binary"},
            },
            {
                "resource": document("YQ==YQ=="),
                "request": {"method": "POST", "url": "DocumentReference"},
            },
        ],
    }


async def test_transaction_with_an_entry_over_the_limit_stores_nothing(small):
    h = small
    bundle = _bundle("transaction")
    del bundle["entry"][2]
    response = await post(h, bundle, "/fhir")
    assert_outcome(response, 413, "too-long", "Bundle.entry[1].resource.data")
    assert await rows(h) == (0, 0)
    bundle = _bundle("transaction")
    del bundle["entry"][1]
    response = await post(h, bundle, "/fhir")
    assert_outcome(response, 400, "value", "Bundle.entry[1].resource.content[0].attachment.data")
    assert await rows(h) == (0, 0)


async def test_batch_entries_over_the_limit_fail_alone(small):
    h = small
    response = await post(h, _bundle("batch"), "/fhir")
    assert response.status_code == 200, response.text
    entries = response.json()["entry"]
    assert [e["response"]["status"] for e in entries] == [
        "201 Created",
        "413 Content Too Large",
        "400 Bad Request",
    ]
    assert entries[1]["response"]["outcome"]["issue"][0]["expression"] == [
        "Bundle.entry[1].resource.data"
    ]
    assert await rows(h) == (1, 1)


# --- the validation function itself ------------------------------------------------------------


def test_validate_resource_limit_is_per_element_and_defaults_to_the_setting():
    body = document(b64(b"a" * 10), contained=[{"resourceType": "Binary", "data": b64(b"b" * 10)}])
    body["contained"][0]["contentType"] = "text/plain"
    assert validate_resource(body, max_attachment_bytes=10)["content"][0]["attachment"]["data"]
    with pytest.raises(FhirValidationError) as info:
        validate_resource(body, max_attachment_bytes=9)
    assert info.value.status == 413
    assert {i.expression for i in info.value.issues} == {
        "DocumentReference.content[0].attachment.data",
        "DocumentReference.contained[0].data",
    }
    big = document(b64(b"c" * (DEFAULT_MAX_ATTACHMENT_BYTES + 1)))
    with pytest.raises(FhirValidationError) as info:
        validate_resource(big)  # callers that pass no limit get the setting's default
    assert info.value.status == 413


def test_invalid_base64_wins_over_too_large_and_other_errors_keep_their_status():
    body = document(b64(b"a" * 20))
    body["content"].append({"attachment": {"data": "YQ==YQ=="}})
    with pytest.raises(FhirValidationError) as info:
        validate_resource(body, max_attachment_bytes=10)
    assert info.value.status == 400
    with pytest.raises(FhirValidationError) as info:
        validate_resource({"resourceType": "Patient", "birthDate": "2020-13-45"})
    assert info.value.status is None  # the route decides (422)
