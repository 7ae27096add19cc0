"""`carevault init --demo` seeds the synthetic demo data set once; the quick start's FHIR read
and search work for the demo physician (every demo patient's active CareTeam lists the demo
physician's and the demo nurse's practitioners), and the demo patient reads their own record."""

from __future__ import annotations

import asyncio
import re
from urllib.parse import unquote

import pytest
from typer.testing import CliRunner

from carevault.cli import app
from carevault.fhir import demo_data
from carevault.fhir.store import WriteOperation
from carevault.fhir.validation import validate_resource
from carevault.runtime import build_services


async def demo_login(h, username, password):
    """A demo account's login: two steps for the staff, whose TOTP factor `init --demo`
    enrolled (the code as `carevault demo totp` prints it)."""
    first = await h.login(username, password)
    if "mfa_token" not in first:
        return first
    user = await h.services.users.by_username(username)
    code = await h.services.mfa.totp.current_code(user.id)
    done = await h.client.post(
        "/auth/mfa/verify",
        json={"mfa_token": first["mfa_token"], "method": "totp", "code": code},
    )
    assert done.status_code == 200, done.text
    return done.json()


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
        [team] = [
            r
            for r in resources
            if r["resourceType"] == "CareTeam"
            and r["subject"]["reference"] == f"Patient/{patient['id']}"
        ]
        assert team["status"] == "active"
        members = {p["member"]["reference"] for p in team["participant"]}
        assert members == {f"Practitioner/{p}" for p in demo_data.PRACTITIONERS}
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
    token = (await demo_login(h, "demo-physician", password))["access_token"]
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
    assert len(patients.json()["entry"]) == demo_data.PATIENTS  # all in the physician's care

    accounts = _accounts(first.output)
    # the demo nurse sees the same patients (both practitioners are on every care team)
    nurse = await _bearer(h, "demo-nurse", accounts["demo-nurse"])
    assert (await h.client.get(read_cmd.group(1).removeprefix(base), headers=nurse)).is_success
    # the demo patient reads their own record and their own observations, nobody else's
    own = await _bearer(h, "demo-patient", accounts["demo-patient"])
    mine = await h.client.get("/fhir/Patient/demo-patient-1", headers=own)
    assert mine.status_code == 200, mine.text
    observations = await h.client.get(
        "/fhir/Observation", params={"patient": "demo-patient-1"}, headers=own
    )
    assert observations.status_code == 200 and observations.json()["entry"]
    other = await h.client.get("/fhir/Patient/demo-patient-2", headers=own)
    assert other.status_code == 404
    listed = await h.client.get("/fhir/Patient", headers=own)
    assert [e["resource"]["id"] for e in listed.json()["entry"]] == ["demo-patient-1"]


def _accounts(output: str) -> dict[str, str]:
    """{username: password} from the demo accounts table `init --demo` prints."""
    accounts = {}
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│|┃]", line) if c.strip()]
        if len(cells) == 3 and cells[0].startswith("demo-"):
            accounts[cells[0]] = cells[2]
    return accounts


async def _bearer(h, username: str, password: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {(await demo_login(h, username, password))['access_token']}"}


async def test_init_demo_adds_care_teams_to_a_data_set_seeded_without_them(
    cli, harness_factory, settings
):
    """A demo directory seeded before access control (no CareTeams): `init --demo` adds the
    missing CareTeams, so that the demo staff see their patients; nothing else is rewritten."""
    services = build_services(settings)
    await services.start()
    try:
        await services.store.write_many(
            [
                WriteOperation(
                    "create", r["resourceType"], r["id"], validate_resource(r, r["resourceType"])
                )
                for r in demo_data.generate()
                if r["resourceType"] != "CareTeam"
            ]
        )
    finally:
        await services.close()
    first = await asyncio.to_thread(cli, "init", "--demo")
    assert first.exit_code == 0, first.output
    assert f"demo data set seeded: {demo_data.PATIENTS} FHIR resources" in " ".join(
        first.output.split()
    )
    again = await asyncio.to_thread(cli, "init", "--demo")
    assert "demo data set seeded" not in again.output

    h = await harness_factory(settings)
    auth = await _bearer(h, "demo-physician", _accounts(first.output)["demo-physician"])
    patient = await h.client.get("/fhir/Patient/demo-patient-1", headers=auth)
    assert patient.status_code == 200, patient.text
    assert patient.json()["meta"]["versionId"] == "1"
    teams = await h.client.get("/fhir/CareTeam", params={"_count": "100"}, headers=auth)
    assert len(teams.json()["entry"]) == demo_data.PATIENTS
