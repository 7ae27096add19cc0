"""A real, independently written FHIR client (fhirpy from PyPI) against the running server.

The server is the real `carevault serve` (both stores); the user is added through the CLI and
logs in over HTTP. Everything else goes through fhirpy's own request building and response
parsing: create, read, search and update, and the server's versionId/ETag behaviour as the
client sees it (If-Match through the client's extra headers).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fhirpy import AsyncFHIRClient
from fhirpy.base.exceptions import MultipleResourcesFound, ResourceNotFound

from tests.e2e.conftest import Server, bearer, login

pytestmark = [pytest.mark.slow]

LOINC_HEART_RATE = "8867-4"


def _client(server: Server, token: str, **headers: str) -> AsyncFHIRClient:
    return AsyncFHIRClient(
        f"{server.base_url}/fhir",
        authorization=f"Bearer {token}",
        extra_headers=headers or None,
    )


async def test_fhirpy_creates_reads_searches_and_updates(
    server_factory: Callable[..., Server],
) -> None:
    # the client's requests, not who may make them: a service account may create Patients and
    # read and search every patient's records
    server = server_factory(workers=1, users=(("svc.fhir", "service"),))
    with server.client() as http:
        token = login(http, "svc.fhir")["access_token"]
    client = _client(server, token)

    patient = client.resource(
        "Patient",
        name=[{"family": "Lindqvist", "given": ["Astrid"]}],
        identifier=[{"system": "urn:oid:1.2.752.129.2.1.3.1", "value": "19800203-1234"}],
        gender="female",
        birthDate="1980-02-03",
    )
    await patient.save()
    assert patient.id
    assert patient["meta"]["versionId"] == "1"

    other = client.resource("Patient", name=[{"family": "Berg", "given": ["Nils"]}])
    await other.save()

    observation = client.resource(
        "Observation",
        status="final",
        code={"coding": [{"system": "http://loinc.org", "code": LOINC_HEART_RATE}]},
        subject=patient.to_reference(),
        valueQuantity={"value": 72, "unit": "beats/minute"},
    )
    await observation.save()
    assert observation.id
    await client.resource(
        "Observation",
        status="final",
        code={"coding": [{"system": "http://loinc.org", "code": "29463-7"}]},
        subject=patient.to_reference(),
    ).save()

    # Read back, through a reference and through a fresh fetch.
    read_patient = await client.reference("Patient", patient.id).to_resource()
    assert read_patient["name"][0]["family"] == "Lindqvist"
    assert read_patient["birthDate"] == "1980-02-03"
    read_obs = await client.reference("Observation", observation.id).to_resource()
    assert read_obs["subject"]["reference"] == f"Patient/{patient.id}"
    assert read_obs["valueQuantity"]["value"] == 72

    # Search: Patient by family-name prefix, Observation by patient and code.
    found = await client.resources("Patient").search(family="Lindq").fetch_all()
    assert [p.id for p in found] == [patient.id]
    found = await client.resources("Patient").search(name="lindq").fetch_all()
    assert [p.id for p in found] == [patient.id]
    assert await client.resources("Patient").search(family="Zzz").fetch_all() == []
    found = (
        await client.resources("Observation")
        .search(patient=patient.id, code=f"http://loinc.org|{LOINC_HEART_RATE}")
        .fetch_all()
    )
    assert [o.id for o in found] == [observation.id]
    both = await client.resources("Observation").search(patient=patient.id).fetch_all()
    assert len(both) == 2  # noqa: PLR2004
    assert await client.resources("Observation").search(patient=other.id).fetch_all() == []

    # Update through the client: a new version, visible on the next read.
    patient["name"] = [{"family": "Lindqvist-Holm", "given": ["Astrid"]}]
    await patient.save()
    assert patient["meta"]["versionId"] == "2"
    fresh = await client.reference("Patient", patient.id).to_resource()
    assert fresh["meta"]["versionId"] == "2"
    assert fresh["name"][0]["family"] == "Lindqvist-Holm"

    # The server's ETag is W/"<versionId>" (checked over plain HTTP once).
    with server.client() as http:
        response = http.get(f"/fhir/Patient/{patient.id}", headers=bearer(token))
        assert response.headers["ETag"] == 'W/"2"'

    # If-Match through the client: a stale version is refused (412), the current one wins.
    stale = _client(server, token, **{"If-Match": 'W/"1"'})
    fresh["gender"] = "other"
    with pytest.raises(MultipleResourcesFound):  # fhirpy's mapping of HTTP 412
        await stale.resource("Patient", **fresh).save()
    current = _client(server, token, **{"If-Match": 'W/"2"'})
    saved = current.resource("Patient", **fresh)
    await saved.save()
    assert saved["meta"]["versionId"] == "3"
    assert saved["gender"] == "other"

    # Old versions stay readable; the missing stay missing.
    with server.client() as http:
        response = http.get(f"/fhir/Patient/{patient.id}/_history/1", headers=bearer(token))
        assert response.status_code == 200
        assert response.json()["name"][0]["family"] == "Lindqvist"
        assert response.headers["ETag"] == 'W/"1"'
    with pytest.raises(ResourceNotFound):
        await client.reference("Patient", "does-not-exist").to_resource()


async def test_fhirpy_without_token_is_refused(server_factory: Callable[..., Server]) -> None:
    server = server_factory(workers=1, users=(("dr.fhir", "physician"),))
    client = AsyncFHIRClient(f"{server.base_url}/fhir")
    with pytest.raises(Exception) as caught:  # noqa: PT011 (fhirpy's AuthorizationError)
        await client.resources("Patient").fetch()
    assert type(caught.value).__name__ == "AuthorizationError"
    with pytest.raises(Exception) as caught:  # noqa: PT011
        await _client(server, "not-a-token").resources("Patient").fetch()
    assert type(caught.value).__name__ == "AuthorizationError"
