"""`carevault keys rotate-kek` (the real CLI) while FHIR requests run: no request fails, every
data key ends under the new primary, the old KEK keys are gone, and everything still decrypts
in a process that loads the keys afresh."""

from __future__ import annotations

import asyncio
import random

from sqlalchemy import select

from carevault.db.tables import fhir_versions
from carevault.fhir.store import associated_data
from carevault.identity.roles import Role
from carevault.runtime import build_services

FHIR = "application/fhir+json"
PATIENTS = 30
WORKERS = 4


def _observation(patient_id: str, value: int) -> dict:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": "2024-05-01T10:30:00Z",
        "valueQuantity": {"value": value, "unit": "beats/minute"},
    }


async def test_rotate_kek_with_requests_running(harness, settings, monkeypatch):
    from typer.testing import CliRunner

    from carevault.cli import app

    h = harness
    await h.add_user("dr.rotate", Role.service)  # writes and reads every patient's records
    token = (await h.login("dr.rotate"))["access_token"]
    auth = {"Authorization": f"Bearer {token}", "content-type": FHIR}

    async def post(body: dict) -> dict:
        response = await h.client.post(f"/fhir/{body['resourceType']}", json=body, headers=auth)
        assert response.status_code == 201, response.text
        return response.json()

    resources: list[tuple[str, str]] = []
    patients: list[str] = []
    for n in range(PATIENTS):
        patient = await post({"resourceType": "Patient", "name": [{"family": f"Rot{n}"}]})
        obs = await post(_observation(patient["id"], n))
        patients.append(patient["id"])
        resources += [("Patient", patient["id"]), ("Observation", obs["id"])]
    old_primary = h.services.custody.current_kek().primary_id

    failures: list[str] = []
    done = {"before": 0, "during": 0, "after": 0}
    phase = "before"
    stop = asyncio.Event()
    enough = {"before": asyncio.Event(), "during": asyncio.Event(), "after": asyncio.Event()}
    rng = random.Random(7)

    async def worker(n: int) -> None:
        while not stop.is_set():
            pick = rng.randrange(4)
            try:
                if pick == 0:  # a new patient: a new data key, maybe mid-rotation
                    response = await h.client.post(
                        "/fhir/Patient",
                        json={"resourceType": "Patient", "name": [{"family": f"New{n}"}]},
                        headers=auth,
                    )
                    expected = 201
                    if response.status_code == 201:
                        resources.append(("Patient", response.json()["id"]))
                elif pick == 1:  # a new version under an existing patient's key
                    response = await h.client.post(
                        "/fhir/Observation",
                        json=_observation(rng.choice(patients), n),
                        headers=auth,
                    )
                    expected = 201
                    if response.status_code == 201:
                        resources.append(("Observation", response.json()["id"]))
                else:
                    resource_type, resource_id = rng.choice(resources[: 2 * PATIENTS])
                    response = await h.client.get(
                        f"/fhir/{resource_type}/{resource_id}", headers=auth
                    )
                    expected = 200
                if response.status_code != expected:
                    failures.append(f"{pick}: {response.status_code} {response.text[:200]}")
            except Exception as err:  # noqa: BLE001 - every failure is collected
                failures.append(f"{pick}: {err!r}")
            done[phase] += 1
            if done[phase] >= 20:
                enough[phase].set()

    monkeypatch.setenv("CAREVAULT_DATA_DIR", str(settings.data_dir))
    if settings.database_url:
        monkeypatch.setenv("CAREVAULT_DATABASE_URL", settings.database_url)
    else:
        monkeypatch.delenv("CAREVAULT_DATABASE_URL", raising=False)

    tasks = [asyncio.create_task(worker(n)) for n in range(WORKERS)]
    try:
        await asyncio.wait_for(enough["before"].wait(), 10)
        phase = "during"
        result = await asyncio.to_thread(
            lambda: CliRunner().invoke(app, ["keys", "rotate-kek", "--batch-size", "1"])
        )
        phase = "after"
        await asyncio.wait_for(enough["after"].wait(), 10)
    finally:
        stop.set()
        await asyncio.gather(*tasks)

    assert result.exit_code == 0, result.output
    assert failures == []
    assert done["before"] >= 20 and done["during"] > 0 and done["after"] >= 20, done
    kek = h.services.custody.current_kek()
    assert kek.primary_id != old_primary and kek.key_ids == {kek.primary_id}  # old keys retired
    usage = await h.services.envelope.kek_usage()
    assert usage == {kek.primary_id: usage.get(kek.primary_id, 0)}
    assert usage[kek.primary_id] >= PATIENTS

    fresh = build_services(settings)  # a new process: loads the rotated keys from disk
    await fresh.start()
    try:
        async with fresh.engine.connect() as conn:
            rows = (await conn.execute(select(fhir_versions))).all()
        assert len(rows) == len(resources)
        for row in rows:
            await fresh.envelope.decrypt(
                row.scope, row.body, associated_data(row.resource_type, row.id, row.version)
            )
    finally:
        await fresh.close()
    for resource_type, resource_id in resources:  # and the running server never noticed
        response = await h.client.get(f"/fhir/{resource_type}/{resource_id}", headers=auth)
        assert response.status_code == 200, response.text
