"""Crypto-shredding erasure (`carevault patient erase`, `DELETE /fhir/Patient/{id}?_erase=true`):
every version of every resource of the erased patient becomes unreadable, others stay readable."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, insert, inspect, select

from carevault.crypto.envelope import DecryptionFailed, KeyDestroyed
from carevault.db.tables import (
    data_keys,
    fhir_compartments,
    fhir_index_dates,
    fhir_index_keys,
    fhir_resources,
    fhir_versions,
)
from carevault.fhir.erasure import PatientNotFound, erase_patient
from carevault.fhir.store import associated_data
from carevault.identity.roles import Role
from carevault.runtime import build_services
from tests.access.fhir_world import mfa_login
from tests.audit.trail import audit_documents
from tests.conftest import make_settings
from tests.fhir.samples import care_team

FHIR = "application/fhir+json"


def _patient(family: str) -> dict:
    return {
        "resourceType": "Patient",
        "name": [{"family": family, "given": ["Erin"]}],
        "gender": "female",
        "birthDate": "1950-02-03",
        "identifier": [{"system": "http://hospital.example/mrn", "value": f"MRN-{family}"}],
    }


def _observation(patient_id: str, value: int, performer: str | None = None) -> dict:
    body = {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "effectiveDateTime": "2024-05-01T10:30:00Z",
        "valueQuantity": {"value": value, "unit": "beats/minute"},
    }
    if performer:
        body["performer"] = [{"reference": f"Patient/{performer}"}]
    return body


def _condition(patient_id: str) -> dict:
    return {
        "resourceType": "Condition",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003"}]},
        "subject": {"reference": f"Patient/{patient_id}"},
        "onsetDateTime": "2019-03-04",
    }


def _cli_env(monkeypatch: pytest.MonkeyPatch, settings: Any) -> None:
    monkeypatch.setenv("CAREVAULT_DATA_DIR", str(settings.data_dir))
    if settings.database_url:
        monkeypatch.setenv("CAREVAULT_DATABASE_URL", settings.database_url)
    else:
        monkeypatch.delenv("CAREVAULT_DATABASE_URL", raising=False)


async def _cli(*args: str) -> Any:
    from typer.testing import CliRunner

    from carevault.cli import app

    # The CLI owns its event loop (asyncio.run): run it in a thread beside ours.
    return await asyncio.to_thread(lambda: CliRunner().invoke(app, list(args)))


async def _login(h: Any, username: str, role: Role, **links: Any) -> dict[str, str]:
    await h.add_user(username, role, **links)
    token = (await mfa_login(h, username))["access_token"]  # erasure needs step-up
    return {"Authorization": f"Bearer {token}", "content-type": FHIR}


async def _create(h: Any, auth: dict[str, str], body: dict) -> dict:
    response = await h.client.post(f"/fhir/{body['resourceType']}", json=body, headers=auth)
    assert response.status_code == 201, response.text
    return response.json()


async def _seed(h: Any, auth: dict[str, str]) -> dict[str, list[tuple[str, str]]]:
    """Two patients, each with observations and a condition, several versions each."""
    seeded: dict[str, list[tuple[str, str]]] = {}
    for label in ("A", "B"):
        patient = await _create(h, auth, _patient(f"Erasure{label}"))
        pid = patient["id"]
        resources = [("Patient", pid)]
        for value in (60, 70):
            obs = await _create(h, auth, _observation(pid, value))
            resources.append(("Observation", obs["id"]))
        cond = await _create(h, auth, _condition(pid))
        resources.append(("Condition", cond["id"]))
        # more versions: the patient twice, one observation once
        for gender in ("other", "female"):
            patient["gender"] = gender
            r = await h.client.put(f"/fhir/Patient/{pid}", json=patient, headers=auth)
            assert r.status_code == 200, r.text
            patient = r.json()
        obs = (await h.client.get(f"/fhir/Observation/{resources[1][1]}", headers=auth)).json()
        obs["valueQuantity"]["value"] = 61
        r = await h.client.put(f"/fhir/Observation/{obs['id']}", json=obs, headers=auth)
        assert r.status_code == 200, r.text
        seeded[label] = resources
    return seeded


async def _versions(services: Any, resources: list[tuple[str, str]]) -> list[Any]:
    async with services.engine.connect() as conn:
        rows = []
        for resource_type, resource_id in resources:
            rows += (
                await conn.execute(
                    select(fhir_versions).where(
                        fhir_versions.c.resource_type == resource_type,
                        fhir_versions.c.id == resource_id,
                    )
                )
            ).all()
    return rows


async def _index_rows(services: Any, resources: list[tuple[str, str]]) -> int:
    count = 0
    async with services.engine.connect() as conn:
        for resource_type, resource_id in resources:
            for table in (fhir_index_keys, fhir_index_dates, fhir_compartments):
                count += len(
                    (
                        await conn.execute(
                            select(table.c.id).where(
                                table.c.resource_type == resource_type, table.c.id == resource_id
                            )
                        )
                    ).all()
                )
    return count


async def _assert_erased(h: Any, auth: dict[str, str], resources: list[tuple[str, str]]) -> None:
    for resource_type, resource_id in resources:
        url = f"/fhir/{resource_type}/{resource_id}"
        read = await h.client.get(url, headers=auth)
        assert read.status_code == 410, read.text
        assert read.json()["resourceType"] == "OperationOutcome"
        for version in (1, 2, 3):
            vread = await h.client.get(f"{url}/_history/{version}", headers=auth)
            assert vread.status_code in (404, 410), vread.text
        history = await h.client.get(f"{url}/_history", headers=auth)
        assert history.status_code == 410, history.text
    type_history = (await h.client.get("/fhir/Observation/_history", headers=auth)).json()
    erased_ids = {rid for _, rid in resources}
    assert not erased_ids & {e["fullUrl"].split("/")[1] for e in type_history.get("entry", [])}
    # raw database: the ciphertexts are still there, but nothing decrypts them any more
    versions = [v for v in await _versions(h.services, resources) if v.body]
    assert len(versions) >= len(resources)
    for row in versions:
        with pytest.raises(KeyDestroyed):
            await h.services.envelope.decrypt(
                row.scope, row.body, associated_data(row.resource_type, row.id, row.version)
            )
    assert await _index_rows(h.services, resources) == 0


async def _assert_readable(h: Any, auth: dict[str, str], resources: list[tuple[str, str]]) -> None:
    for resource_type, resource_id in resources:
        url = f"/fhir/{resource_type}/{resource_id}"
        assert (await h.client.get(url, headers=auth)).status_code == 200
        assert (await h.client.get(f"{url}/_history/1", headers=auth)).status_code == 200
        history = await h.client.get(f"{url}/_history", headers=auth)
        assert history.status_code == 200
        assert all("resource" in e for e in history.json()["entry"])
    assert await _index_rows(h.services, resources) > 0
    for row in await _versions(h.services, resources):
        await h.services.envelope.decrypt(
            row.scope, row.body, associated_data(row.resource_type, row.id, row.version)
        )


async def _decrypt_all(services: Any, rows: list[Any]) -> None:
    for row in rows:
        await services.envelope.decrypt(
            row.scope, row.body, associated_data(row.resource_type, row.id, row.version)
        )


async def test_cli_erase_shreds_every_version_and_copies(
    harness, settings, monkeypatch, tmp_path, request
):
    h = harness
    auth = await _login(h, "dr.erase", Role.service)  # writes/reads every record
    seeded = await _seed(h, auth)
    a_id, a, b = seeded["A"][0][1], seeded["A"], seeded["B"]
    # "any copy of the database": a consistent copy of the data database, taken before the
    # erasure (a backup, a replica, a stolen file).
    copy_dir = tmp_path / "copy"
    copy_url = _copy_data_database(settings, copy_dir, request)
    _cli_env(monkeypatch, settings)

    dry = await _cli("patient", "erase", a_id)
    assert dry.exit_code == 1, dry.output
    assert "--yes" in dry.output and "4" in dry.output
    await _assert_readable(h, auth, a)  # a dry run changes nothing

    result = await _cli("patient", "erase", a_id, "--yes")
    assert result.exit_code == 0, result.output
    assert "Patient erased" in result.output

    await _assert_erased(h, auth, a)
    await _assert_readable(h, auth, b)
    # writes for the erased patient are refused, not half-done
    r = await h.client.post("/fhir/Observation", json=_observation(a_id, 99), headers=auth)
    assert r.status_code == 410, r.text
    obs_id = a[1][1]
    r = await h.client.put(
        f"/fhir/Observation/{obs_id}", json={**_observation(a_id, 1), "id": obs_id}, headers=auth
    )
    assert r.status_code == 410, r.text

    # again: idempotent, still exit 0, nothing changes
    before = [tuple(v) for v in await _versions(h.services, a)]
    again = await _cli("patient", "erase", a_id, "--yes")
    assert again.exit_code == 0, again.output
    assert [tuple(v) for v in await _versions(h.services, a)] == before
    await _assert_erased(h, auth, a)

    events = await audit_documents(h.services.engine, "security.patient_erased")
    assert [e["outcome"] for e in events] == ["permit", "permit"]
    # the event counts what went, and names no one erased (not even by id)
    assert events[0]["detail"]["resources"] == 4
    assert a_id not in str(events[0]) and a_id not in str(events[1])

    unknown = await _cli("patient", "erase", "no-such-patient", "--yes")
    assert unknown.exit_code == 1

    # The copy, restored after the erasure with every key the deployment has (the key vault,
    # the KEK, the master key): its ciphertexts of A are the live ones byte for byte, and dead;
    # B's decrypt. The copy itself never held a data key.
    shutil.copytree(settings.keys_dir, copy_dir / "keys")
    copy = build_services(make_settings(copy_dir, copy_url, key_reload_interval_seconds=0.05))
    await copy.start()
    try:
        a_rows = [v for v in await _versions(copy, a) if v.body]
        b_rows = [v for v in await _versions(copy, b) if v.body]
        assert a_rows and {(r.id, r.version, bytes(r.body)) for r in a_rows} <= {
            (r.id, r.version, bytes(r.body)) for r in await _versions(h.services, a)
        }
        for row in a_rows:
            with pytest.raises(KeyDestroyed):
                await copy.envelope.decrypt(
                    row.scope, row.body, associated_data(row.resource_type, row.id, row.version)
                )
        await _decrypt_all(copy, b_rows)
        async with copy.engine.connect() as conn:
            tables = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
        assert "data_keys" not in tables
    finally:
        await copy.close()


def _copy_data_database(settings: Any, copy_dir: Path, request: Any) -> str | None:
    """A copy of the data database alone, as a backup would hold it; its URL (None: SQLite)."""
    copy_dir.mkdir()
    if settings.database_url is None:
        src = sqlite3.connect(settings.data_dir / "carevault.db")
        dst = sqlite3.connect(copy_dir / "carevault.db")
        src.backup(dst)
        src.close()
        dst.close()
        return None
    import psycopg

    source = settings.database_url.rsplit("search_path%3D", 1)[1]
    copy_url = request.getfixturevalue("pg_schema")()
    target = copy_url.rsplit("search_path%3D", 1)[1]
    base = settings.database_url.split("?", 1)[0]
    with psycopg.connect(base, autocommit=True) as conn:
        names = [
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s", (source,)
            )
        ]
        for name in names:  # names come from the catalogue, schemas from the fixture
            conn.execute(f'CREATE TABLE "{target}"."{name}" (LIKE "{source}"."{name}")')
            conn.execute(f'INSERT INTO "{target}"."{name}" SELECT * FROM "{source}"."{name}"')
    return copy_url


async def test_pre_erasure_copy_of_key_vault_dies_with_kek_rotation(
    harness, settings, monkeypatch, tmp_path
):
    """The documented limit, pinned: a copy of the key vault taken BEFORE the erasure (a vault
    backup) still holds A's wrapped DEK, which the KEK of the time opens; `keys rotate-kek`
    (dropping the old KEK key) is what completes the shredding for such copies."""
    h = harness
    auth = await _login(h, "dr.kek", Role.service)  # writes/reads every record
    seeded = await _seed(h, auth)
    a_id, a = seeded["A"][0][1], seeded["A"]
    async with h.services.vault_engine.connect() as conn:
        old_keys = [dict(r._mapping) for r in (await conn.execute(select(data_keys))).all()]
    a_rows = [v for v in await _versions(h.services, a) if v.body]
    _cli_env(monkeypatch, settings)
    assert (await _cli("patient", "erase", a_id, "--yes")).exit_code == 0

    async def with_key_table(rows: list[dict]) -> None:
        async with h.services.vault_engine.begin() as conn:
            await conn.execute(delete(data_keys))
            await conn.execute(insert(data_keys), rows)
        h.services.envelope._cache.clear()

    async with h.services.vault_engine.connect() as conn:
        live_keys = [dict(r._mapping) for r in (await conn.execute(select(data_keys))).all()]
    await with_key_table(old_keys)  # "restore" the old key table
    await _decrypt_all(h.services, a_rows)  # opens: the old KEK key still exists
    await with_key_table(live_keys)

    assert (await _cli("keys", "rotate-kek")).exit_code == 0
    await with_key_table(old_keys)
    fresh = build_services(settings)  # a process that loads the keys as they are now
    await fresh.start()
    try:
        for row in a_rows:
            with pytest.raises(DecryptionFailed):
                await fresh.envelope.decrypt(
                    row.scope, row.body, associated_data(row.resource_type, row.id, row.version)
                )
    finally:
        await fresh.close()


async def test_http_erase_admin_only(harness):
    h = harness
    auth = await _login(h, "svc.http", Role.service)  # writes/reads every record
    admin = await _login(h, "admin.http", Role.admin)
    seeded = await _seed(h, auth)
    a_id, b_id = seeded["A"][0][1], seeded["B"][0][1]
    # clinical staff caring for both patients: they may read the records, not erase them
    physician = await _login(h, "dr.http", Role.physician, practitioner_id="prac-http-dr")
    nurse = await _login(h, "nurse.http", Role.nurse, practitioner_id="prac-http-nurse")
    for pid in (a_id, b_id):
        await _create(h, auth, care_team(pid, "prac-http-dr", "prac-http-nurse"))
    for headers in (physician, nurse):
        assert (await h.client.get(f"/fhir/Patient/{a_id}", headers=headers)).status_code == 200

    for headers in (physician, nurse, auth):
        refused = await h.client.delete(f"/fhir/Patient/{a_id}?_erase=true", headers=headers)
        assert refused.status_code == 403, refused.text
        assert refused.json()["resourceType"] == "OperationOutcome"
    bad = await h.client.delete(f"/fhir/Patient/{a_id}?_erase=yes", headers=admin)
    assert bad.status_code == 400 and bad.json()["resourceType"] == "OperationOutcome"
    # an admin may not see patients' records: an ordinary delete answers as if missing
    nobody = await h.client.delete("/fhir/Patient/nobody", headers=admin)
    assert nobody.status_code == 404
    for query in ("", "?_erase=false"):
        refused = await h.client.delete(f"/fhir/Patient/{a_id}{query}", headers=admin)
        assert refused.status_code == 404, refused.text
        assert refused.json() == nobody.json()
    assert (await h.client.delete(f"/fhir/Patient/{a_id}?_erase=true")).status_code == 401
    await _assert_readable(h, auth, seeded["A"])

    erased = await h.client.delete(f"/fhir/Patient/{a_id}?_erase=true", headers=admin)
    assert erased.status_code == 200, erased.text
    assert erased.json()["resourceType"] == "OperationOutcome"
    await _assert_erased(h, auth, seeded["A"])
    await _assert_readable(h, auth, seeded["B"])
    again = await h.client.delete(f"/fhir/Patient/{a_id}?_erase=true", headers=admin)
    assert again.status_code == 200, again.text
    await _assert_erased(h, auth, seeded["A"])
    missing = await h.client.delete("/fhir/Patient/nobody?_erase=true", headers=admin)
    assert missing.status_code == 404

    # the ordinary logical delete is unchanged, for whoever may delete a Patient (a physician
    # may delete clinical records only)
    refused = await h.client.delete(f"/fhir/Patient/{b_id}?_erase=false", headers=physician)
    assert refused.status_code == 403, refused.text
    assert (
        await h.client.delete(f"/fhir/Patient/{b_id}?_erase=false", headers=auth)
    ).status_code == 204
    assert (await h.client.get(f"/fhir/Patient/{b_id}", headers=auth)).status_code == 410
    assert (await h.client.get(f"/fhir/Patient/{b_id}/_history/1", headers=auth)).status_code == 200
    actors = [
        e.get("user") for e in await audit_documents(h.services.engine, "security.patient_erased")
    ]
    admin_user = await h.services.users.by_username("admin.http")
    assert actors == [admin_user.id, admin_user.id]


async def test_shared_resource_under_other_patients_key_is_unlinked_and_reported(harness):
    h = harness
    auth = await _login(h, "dr.shared", Role.service)  # writes/reads every record
    p1 = (await _create(h, auth, _patient("SharedOne")))["id"]
    p2 = (await _create(h, auth, _patient("SharedTwo")))["id"]
    owner, other = sorted([p1, p2])  # encrypted under the first patient in sorted order
    shared = await _create(h, auth, _observation(other, 80, performer=owner))

    async def index_keys() -> list[str]:
        async with h.services.engine.connect() as conn:
            return list(
                (
                    await conn.execute(
                        select(fhir_index_keys.c.key).where(fhir_index_keys.c.id == shared["id"])
                    )
                )
                .scalars()
                .all()
            )

    assert f"Patient/{other}" in await index_keys()  # subject / patient search parameters
    report = await erase_patient(h.services, other, actor_user_id="tester")
    assert report.shared_other_scope == 1 and report.erased == 1  # the Patient itself
    assert (
        await h.client.get(f"/fhir/Observation/{shared['id']}", headers=auth)
    ).status_code == 200
    async with h.services.engine.connect() as conn:
        compartments = (
            (
                await conn.execute(
                    select(fhir_compartments.c.patient_id).where(
                        fhir_compartments.c.id == shared["id"]
                    )
                )
            )
            .scalars()
            .all()
        )
    assert compartments == [owner]
    keys = await index_keys()
    assert f"Patient/{other}" not in keys and "http://loinc.org|8867-4" in keys

    # erasing the owner erases the shared resource (for every patient it concerns)
    report = await erase_patient(h.services, owner)
    assert report.erased == 2 and report.shared_other_scope == 0
    assert (
        await h.client.get(f"/fhir/Observation/{shared['id']}", headers=auth)
    ).status_code == 410
    with pytest.raises(PatientNotFound):
        await erase_patient(h.services, "never-existed")
    async with h.services.engine.connect() as conn:
        erased = (
            (
                await conn.execute(
                    select(fhir_resources.c.id).where(fhir_resources.c.erased_at.is_not(None))
                )
            )
            .scalars()
            .all()
        )
    assert set(erased) == {p1, p2, shared["id"]}
