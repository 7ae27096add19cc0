"""Shared fixtures of the audit-trail tests: a small clinic seeded over HTTP, raw (trigger-free)
access to the audit tables as a database owner would have it, and the `carevault audit` CLI.

The clinic: a service principal that creates everything; patients P (cared for by dr-a's
practitioner) and Q (cared for by dr-b's); a physician with no relationship to either (for
break-glass); an Observation and a Condition of each patient. Every name, identifier and birth
date is distinctive so that a test can look for it byte by byte in the audit tables.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import Connection, text

from carevault.audit import archive
from carevault.config import Settings
from carevault.db import append_only
from carevault.identity.roles import Role

FHIR = "application/fhir+json"
MRN = "http://hospital.example/mrn"
CARE = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"

# Distinctive values that must never reach the audit trail.
P_FAMILY, P_GIVEN, P_BIRTH, P_MRN = "Zyxwardenfeld", "Quillonia", "1937-11-23", "MRN-QZ-774411"
Q_FAMILY, Q_GIVEN, Q_BIRTH, Q_MRN = "Vromblethorpe", "Ottiline", "1944-06-17", "MRN-VB-558833"
P_PHONE, Q_PHONE = "+15557310442", "+15558820913"


def bearer(token: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **extra}


def patient_body(family: str, given: str, birth: str, mrn: str, phone: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": MRN, "value": mrn}],
        "name": [{"family": family, "given": [given]}],
        "birthDate": birth,
        "gender": "female",
        "telecom": [{"system": "phone", "value": phone}],
    }


def observation_body(patient: str, value: float) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": "2024-05-01T10:30:00Z",
        "valueQuantity": {"value": value, "unit": "/min"},
    }


def condition_body(patient: str) -> dict[str, Any]:
    return {
        "resourceType": "Condition",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "onsetDateTime": "2019-03-04",
    }


def care_team_body(patient: str, practitioner: str) -> dict[str, Any]:
    return {
        "resourceType": "CareTeam",
        "status": "active",
        "subject": {"reference": f"Patient/{patient}"},
        "participant": [{"member": {"reference": f"Practitioner/{practitioner}"}}],
    }


@dataclass
class Clinic:
    h: Any  # tests.conftest.Harness
    ids: dict[str, str] = field(default_factory=dict)
    users: dict[str, Any] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def client(self) -> httpx.AsyncClient:
        return self.h.client  # type: ignore[no-any-return]

    async def get(self, who: str, url: str, **headers: str) -> httpx.Response:
        return await self.client.get(url, headers=bearer(self.tokens[who], **headers))

    async def post(self, who: str, url: str, body: Any, **headers: str) -> httpx.Response:
        return await self.client.post(
            url, json=body, headers=bearer(self.tokens[who], **{"Content-Type": FHIR, **headers})
        )

    async def put(self, who: str, url: str, body: Any, **headers: str) -> httpx.Response:
        return await self.client.put(
            url, json=body, headers=bearer(self.tokens[who], **{"Content-Type": FHIR, **headers})
        )

    async def create(self, body: dict[str, Any], name: str) -> str:
        response = await self.post("svc", f"/fhir/{body['resourceType']}", body)
        assert response.status_code == 201, response.text
        self.ids[name] = str(response.json()["id"])
        return self.ids[name]

    async def user(self, name: str, role: Role, **links: Any) -> None:
        self.users[name] = await self.h.add_user(name, role, **links)
        self.tokens[name] = (await self.h.login(name))["access_token"]


async def build_clinic(h: Any) -> Clinic:
    c = Clinic(h)
    await c.user("svc", Role.service)
    for name in ("pracA", "pracB", "pracOther"):
        await c.create({"resourceType": "Practitioner", "name": [{"family": name}]}, name)
    await c.create(patient_body(P_FAMILY, P_GIVEN, P_BIRTH, P_MRN, P_PHONE), "P")
    await c.create(patient_body(Q_FAMILY, Q_GIVEN, Q_BIRTH, Q_MRN, Q_PHONE), "Q")
    for which, prac in (("P", "pracA"), ("Q", "pracB")):
        pid = c.ids[which]
        await c.create(observation_body(pid, 71), f"obs{which}")
        await c.create(condition_body(pid), f"cond{which}")
        await c.create(care_team_body(pid, c.ids[prac]), f"team{which}")
    await c.user("drA", Role.physician, practitioner_id=c.ids["pracA"])
    await c.user("drB", Role.physician, practitioner_id=c.ids["pracB"])
    await c.user("drOther", Role.physician, practitioner_id=c.ids["pracOther"])
    return c


@pytest.fixture
async def clinic(harness: Any) -> Clinic:
    return await build_clinic(harness)


# --- the database as its owner sees it ------------------------------------------------------


@contextmanager
def owner(settings: Settings) -> Iterator[Connection]:
    """A synchronous connection in one transaction with the append-only triggers lifted (and
    put back at the end, as someone covering their tracks would), committed on exit."""
    with archive.connect(settings.sqlalchemy_url) as conn, conn.begin():
        append_only.drop(conn)
        yield conn
        append_only.create(conn)


def sql(settings: Settings, statement: str, **params: Any) -> list[Any]:
    """One statement on a plain connection (triggers in place), committed; its rows if any."""
    with archive.connect(settings.sqlalchemy_url) as conn, conn.begin():
        result = conn.execute(text(statement), params)
        return list(result.all()) if result.returns_rows else []


def verify_db(settings: Settings, **kwargs: Any) -> archive.Report:
    keys = _audit_keys(settings)
    with archive.connect(settings.sqlalchemy_url) as conn:
        return archive.verify_database(conn, keys, **kwargs)


def _audit_keys(settings: Settings) -> Any:
    from carevault.crypto.custody import KeyCustody

    return KeyCustody.from_settings(settings).audit_keys()


# --- the CLI ----------------------------------------------------------------------------------


def cli_env(settings: Settings) -> dict[str, str | None]:
    return {
        "CAREVAULT_DATA_DIR": str(settings.data_dir),
        "CAREVAULT_DATABASE_URL": settings.database_url,
    }


def run_cli(env: dict[str, str | None], *args: str) -> Any:
    """`carevault <args>` in this process (typer's CliRunner); `env` sets (or, with None,
    removes) environment variables for the call only. The result has exit_code and output."""
    from typer.testing import CliRunner

    from carevault.cli import app

    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200", **env})


async def arun_cli(env: dict[str, str | None], *args: str) -> Any:
    """`run_cli` from async code: the CLI owns its event loop (asyncio.run)."""
    return await asyncio.to_thread(run_cli, env, *args)


def write_jwks(settings: Settings, path: Path) -> Path:
    import orjson

    path.write_bytes(orjson.dumps(archive.public_jwks(_audit_keys(settings))))
    return path
