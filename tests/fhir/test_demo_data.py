"""`carevault init --demo` seeds the synthetic demo data set once; the quick start's FHIR read
and search work for the demo physician."""

from __future__ import annotations

import asyncio
import re
from urllib.parse import unquote

import pytest
from typer.testing import CliRunner

from carevault.cli import app
from carevault.fhir import demo_data


@pytest.fixture
def cli(settings, monkeypatch):
    monkeypatch.setenv("CAREVAULT_DATA_DIR", str(settings.data_dir))
    if settings.database_url:
        monkeypatch.setenv("CAREVAULT_DATABASE_URL", settings.database_url)
    else:
        monkeypatch.delenv("CAREVAULT_DATABASE_URL", raising=False)
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, list(args), env={"COLUMNS": "250"})

    return run


def test_generator_is_deterministic_and_linked():
    resources = demo_data.generate()
    assert resources == demo_data.generate()
    patients = [r for r in resources if r["resourceType"] == "Patient"]
    assert len(patients) == demo_data.PATIENTS and patients[0]["id"] == "demo-patient-1"
    ids = {(r["resourceType"], r["id"]) for r in resources}
    assert ("Organization", "demo-hospital") in ids
    assert {("Practitioner", p) for p in demo_data.PRACTITIONERS} <= ids
    for patient in patients:
        encounters = [
            r
            for r in resources
            if r["resourceType"] == "Encounter"
            and r["subject"]["reference"] == f"Patient/{patient['id']}"
        ]
        assert 1 <= len(encounters) <= 3
    codes = {
        r["code"]["coding"][0]["code"] for r in resources if r["resourceType"] == "Observation"
    }
    assert {"8867-4", "8480-6", "29463-7"} <= codes


async def test_init_demo_seeds_once(cli, harness_factory, settings):
    first = await asyncio.to_thread(cli, "init", "--demo")
    assert first.exit_code == 0, first.output
    words = " ".join(first.output.split())
    assert "demo data set seeded" in words
    password = None
    for line in first.output.splitlines():
        cells = [c.strip() for c in re.split(r"[│|┃]", line) if c.strip()]
        if len(cells) == 3 and cells[0] == "demo-physician":
            password = cells[2]
    assert password
    read_cmd = re.search(r"curl -s (\S+/fhir/Patient/demo-patient-1) ", first.output)
    search_cmd = re.search(r'curl -s "(\S+/fhir/Observation\?\S+)"', first.output)
    assert read_cmd and search_cmd, first.output
    assert "%7C8867-4" in search_cmd.group(1)

    second = await asyncio.to_thread(cli, "init", "--demo")
    assert second.exit_code == 0, second.output
    assert "demo data set seeded" not in second.output

    h = await harness_factory(settings)
    token = (await h.login("demo-physician", password))["access_token"]
    h.client.headers["Authorization"] = f"Bearer {token}"
    base = f"http://{settings.host}:{settings.port}"
    patient = await h.client.get(read_cmd.group(1).removeprefix(base))
    assert patient.status_code == 200, patient.text
    assert patient.json()["id"] == "demo-patient-1"
    assert patient.json()["meta"]["versionId"] == "1"  # not written again by the second init
    path = unquote(search_cmd.group(1).removeprefix(base))
    found = await h.client.get(
        path.split("?")[0], params=dict(p.split("=", 1) for p in path.split("?", 1)[1].split("&"))
    )
    assert found.status_code == 200, found.text
    entries = found.json().get("entry", [])
    assert entries and all(
        e["resource"]["subject"]["reference"] == "Patient/demo-patient-1" for e in entries
    )
    patients = await h.client.get("/fhir/Patient", params={"_count": "100"})
    assert len(patients.json()["entry"]) == demo_data.PATIENTS
