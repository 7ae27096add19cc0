"""`carevault import` / `import_paths`: Synthea-like Bundles of both generations (urn:uuid
references across files; ifNoneExist and conditional references), per-entry errors,
contained resources, idempotent re-import."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from carevault.cli import app
from carevault.fhir.importer import (
    MSG_CONDITIONAL_NONE,
    MSG_CONDITIONAL_NOT_IN_RUN,
    MSG_INVALID,
    import_paths,
    ordered_files,
)
from carevault.fhir.search_params import SENSITIVITY
from carevault.identity.roles import Role

SYNTHEA = "https://github.com/synthetichealth/synthea"
NPI = "http://hl7.org/fhir/sid/us-npi"


@pytest.fixture
def cli(settings, monkeypatch):
    monkeypatch.setenv("CAREVAULT_DATA_DIR", str(settings.data_dir))
    if settings.database_url:
        monkeypatch.setenv("CAREVAULT_DATABASE_URL", settings.database_url)
    else:
        monkeypatch.delenv("CAREVAULT_DATABASE_URL", raising=False)
    runner = CliRunner()

    def run(*args: str):
        return runner.invoke(app, list(args))

    return run


@pytest.fixture
async def reader(harness):
    await harness.add_user("dr.import", Role.service)  # reads back every imported record
    token = (await harness.login("dr.import"))["access_token"]
    harness.client.headers["Authorization"] = f"Bearer {token}"
    return harness


def uid() -> str:
    return str(uuid.uuid4())


def entry(resource: dict[str, Any], full_url: str, **request: Any) -> dict[str, Any]:
    request.setdefault("method", "POST")
    request.setdefault("url", resource["resourceType"])
    return {"fullUrl": full_url, "resource": resource, "request": request}


def bundle(kind: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": entries}


def write(directory: Path, name: str, body: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps(body))
    return path


def patient(pid: str, family: str, marker: str) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "id": pid,
        "identifier": [{"system": SYNTHEA, "value": marker}],
        "name": [{"family": family, "given": ["Test"]}],
        "gender": "female",
        "birthDate": "1980-02-03",
    }


def old_generation(directory: Path) -> dict[str, str]:
    """Older Synthea: hospital/practitioner batch bundles, a patient transaction referencing
    them by urn:uuid. The patient file sorts before the others on purpose."""
    ids = {k: uid() for k in ("org", "prac", "patient", "encounter", "obs", "medreq")}
    ids["marker"] = uid()
    organization = {
        "resourceType": "Organization",
        "id": ids["org"],
        "identifier": [{"system": SYNTHEA, "value": ids["org"]}],
        "name": "Old General Hospital",
    }
    practitioner = {
        "resourceType": "Practitioner",
        "id": ids["prac"],
        "identifier": [{"system": NPI, "value": "1000000001"}],
        "name": [{"family": "Oldclinician", "given": ["Pat"]}],
    }
    write(
        directory,
        "hospitalInformation1600000000000.json",
        bundle("batch", [entry(organization, f"urn:uuid:{ids['org']}")]),
    )
    write(
        directory,
        "practitionerInformation1600000000000.json",
        bundle("batch", [entry(practitioner, f"urn:uuid:{ids['prac']}")]),
    )
    subject = {"reference": f"urn:uuid:{ids['patient']}"}
    encounter = {
        "resourceType": "Encounter",
        "id": ids["encounter"],
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": subject,
        "participant": [{"individual": {"reference": f"urn:uuid:{ids['prac']}"}}],
        "period": {"start": "2020-01-01T10:00:00Z", "end": "2020-01-01T10:30:00Z"},
        "serviceProvider": {"reference": f"urn:uuid:{ids['org']}"},
    }
    observation = {
        "resourceType": "Observation",
        "id": ids["obs"],
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
        "subject": subject,
        "encounter": {"reference": f"urn:uuid:{ids['encounter']}"},
        "effectiveDateTime": "2020-01-01T10:05:00Z",
        "valueQuantity": {"value": 71, "unit": "/min"},
    }
    medication_request = {
        "resourceType": "MedicationRequest",
        "id": ids["medreq"],
        "contained": [
            {
                "resourceType": "Medication",
                "id": "med1",
                "code": {
                    "coding": [
                        {"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "197361"}
                    ]
                },
            }
        ],
        "status": "active",
        "intent": "order",
        "medicationReference": {"reference": "#med1"},
        "subject": subject,
        "requester": {"reference": f"urn:uuid:{ids['prac']}"},
    }
    write(
        directory,
        "Aaron_Oldpatient.json",
        bundle(
            "transaction",
            [
                entry(patient(ids["patient"], "Oldpatient", ids["marker"]), subject["reference"]),
                entry(encounter, f"urn:uuid:{ids['encounter']}"),
                entry(observation, f"urn:uuid:{ids['obs']}"),
                entry(medication_request, f"urn:uuid:{ids['medreq']}"),
            ],
        ),
    )
    return ids


def new_generation(directory: Path) -> dict[str, str]:
    """Newer Synthea: ifNoneExist on Organization/Practitioner, conditional references."""
    ids = {k: uid() for k in ("org", "prac", "patient", "encounter")}
    ids["org_ident"] = uid()
    ids["marker"] = uid()
    organization = {
        "resourceType": "Organization",
        "id": ids["org"],
        "identifier": [{"system": SYNTHEA, "value": ids["org_ident"]}],
        "name": "New General Hospital",
    }
    practitioner = {
        "resourceType": "Practitioner",
        "id": ids["prac"],
        "identifier": [{"system": NPI, "value": "2000000002"}],
        "name": [{"family": "Newclinician", "given": ["Sam"]}],
    }
    write(
        directory,
        "hospitalInformation1700000000000.json",
        bundle(
            "transaction",
            [
                entry(
                    organization,
                    f"urn:uuid:{ids['org']}",
                    ifNoneExist=f"identifier={SYNTHEA}|{ids['org_ident']}",
                )
            ],
        ),
    )
    write(
        directory,
        "practitionerInformation1700000000000.json",
        bundle(
            "transaction",
            [
                entry(
                    practitioner,
                    f"urn:uuid:{ids['prac']}",
                    ifNoneExist=f"identifier={NPI}|2000000002",
                )
            ],
        ),
    )
    encounter = {
        "resourceType": "Encounter",
        "id": ids["encounter"],
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": f"urn:uuid:{ids['patient']}"},
        "participant": [{"individual": {"reference": f"Practitioner?identifier={NPI}|2000000002"}}],
        "serviceProvider": {"reference": f"Organization?identifier={SYNTHEA}|{ids['org_ident']}"},
    }
    write(
        directory,
        "Bea_Newpatient.json",
        bundle(
            "transaction",
            [
                entry(
                    patient(ids["patient"], "Newpatient", ids["marker"]),
                    f"urn:uuid:{ids['patient']}",
                ),
                entry(encounter, f"urn:uuid:{ids['encounter']}"),
            ],
        ),
    )
    return ids


async def read(h, path: str) -> dict[str, Any]:
    response = await h.client.get(f"/fhir/{path}")
    assert response.status_code == 200, response.text
    return response.json()


async def search_ids(h, path: str) -> list[str]:
    response = await h.client.get(f"/fhir/{path}")
    assert response.status_code == 200, response.text
    return [e["resource"]["id"] for e in response.json().get("entry", [])]


def test_reference_bundles_first(tmp_path):
    old_generation(tmp_path)
    names = [p.name for p in ordered_files([tmp_path])]
    assert names[0].startswith("hospitalInformation")
    assert names[1].startswith("practitionerInformation")
    assert names[-1] == "Aaron_Oldpatient.json"


async def test_cli_imports_both_generations(cli, reader, tmp_path):
    data = tmp_path / "synthea"
    old = old_generation(data)
    new = new_generation(data)
    result = await asyncio.to_thread(cli, "import", str(data))
    assert result.exit_code == 0, result.output
    assert "all entries imported" in result.output
    h = reader

    encounter = await read(h, f"Encounter/{old['encounter']}")
    assert encounter["subject"]["reference"] == f"Patient/{old['patient']}"
    assert encounter["serviceProvider"]["reference"] == f"Organization/{old['org']}"
    assert encounter["participant"][0]["individual"]["reference"] == (f"Practitioner/{old['prac']}")
    observation = await read(h, f"Observation/{old['obs']}")
    assert observation["encounter"]["reference"] == f"Encounter/{old['encounter']}"
    medication_request = await read(h, f"MedicationRequest/{old['medreq']}")
    assert medication_request["contained"][0]["id"] == "med1"
    assert medication_request["medicationReference"]["reference"] == "#med1"
    assert medication_request["requester"]["reference"] == f"Practitioner/{old['prac']}"

    encounter = await read(h, f"Encounter/{new['encounter']}")
    assert encounter["subject"]["reference"] == f"Patient/{new['patient']}"
    assert encounter["serviceProvider"]["reference"] == f"Organization/{new['org']}"
    assert encounter["participant"][0]["individual"]["reference"] == (f"Practitioner/{new['prac']}")
    assert (await read(h, f"Patient/{new['patient']}"))["meta"]["versionId"] == "1"

    # re-import: same ids updated, ifNoneExist entries found, no duplicates
    again = await asyncio.to_thread(cli, "import", str(data))
    assert again.exit_code == 0, again.output
    assert (await read(h, f"Patient/{new['patient']}"))["meta"]["versionId"] == "2"
    assert (await read(h, f"Organization/{old['org']}"))["meta"]["versionId"] == "2"
    assert (await read(h, f"Organization/{new['org']}"))["meta"]["versionId"] == "1"
    for ids in (old, new):
        query = f"Patient?identifier={SYNTHEA}%7C{ids['marker']}"
        assert await search_ids(h, query) == [ids["patient"]]
    assert await search_ids(h, f"Practitioner?identifier={NPI}%7C2000000002") == [new["prac"]]


async def test_import_paths_report(services, tmp_path):
    tmp_path = tmp_path / "in"
    old_generation(tmp_path)
    report = await import_paths(services, [tmp_path])
    assert report.ok, report.errors
    assert report.counts["Patient"] == {"created": 1, "updated": 0, "existing": 0}
    assert report.total("created") == 6
    modes = {f.name: f.mode for f in report.files}
    assert modes["hospitalInformation1600000000000.json"] == "per-entry"  # a batch
    assert modes["Aaron_Oldpatient.json"] == "transaction"

    again = await import_paths(services, [tmp_path])
    assert again.ok and again.total("created") == 0 and again.total("updated") == 6


async def test_new_generation_in_one_bundle(services, tmp_path):
    """ifNoneExist entries and conditional references to them in the same transaction."""
    tmp_path = tmp_path / "in"
    org_ident = uid()
    org, enc, pat = uid(), uid(), uid()
    organization = {
        "resourceType": "Organization",
        "identifier": [{"system": SYNTHEA, "value": org_ident}],
        "name": "Same Bundle Clinic",
    }
    encounter = {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": f"urn:uuid:{pat}"},
        "serviceProvider": {"reference": f"Organization?identifier={SYNTHEA}|{org_ident}"},
    }
    write(
        tmp_path,
        "one.json",
        bundle(
            "transaction",
            [
                entry(
                    organization,
                    f"urn:uuid:{org}",
                    ifNoneExist=f"identifier={SYNTHEA}|{org_ident}",
                ),
                entry(patient(pat, "Samebundle", uid()), f"urn:uuid:{pat}"),
                entry(encounter, f"urn:uuid:{enc}"),
            ],
        ),
    )
    report = await import_paths(services, [tmp_path])
    assert report.ok, report.errors
    stored = await services.store.read("Encounter", enc)
    assert stored.body["serviceProvider"]["reference"] == f"Organization/{org}"
    again = await import_paths(services, [tmp_path])
    assert again.ok and again.counts["Organization"]["existing"] == 1


async def test_invalid_entry_reported_rest_loaded(cli, reader, tmp_path):
    first, bad, last = uid(), uid(), uid()
    broken = patient(bad, "Secretname", uid())
    broken["birthDate"] = "not-a-date"
    write(
        tmp_path,
        "mixed.json",
        bundle(
            "transaction",
            [
                entry(patient(first, "Firstok", uid()), f"urn:uuid:{first}"),
                entry(broken, f"urn:uuid:{bad}"),
                entry(patient(last, "Lastok", uid()), f"urn:uuid:{last}"),
            ],
        ),
    )
    result = await asyncio.to_thread(cli, "import", str(tmp_path / "mixed.json"))
    assert result.exit_code == 1, result.output
    words = " ".join(result.output.split())
    assert "mixed.json" in words and MSG_INVALID in words
    assert "Secretname" not in result.output and bad not in result.output
    h = reader
    await read(h, f"Patient/{first}")
    await read(h, f"Patient/{last}")
    assert (await h.client.get(f"/fhir/Patient/{bad}")).status_code == 404


async def test_unresolvable_conditional_reference(services, tmp_path):
    tmp_path = tmp_path / "in"
    pat, enc = uid(), uid()
    encounter = {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": f"urn:uuid:{pat}"},
        "serviceProvider": {"reference": f"Organization?identifier={SYNTHEA}|nowhere"},
    }
    write(
        tmp_path,
        "dangling.json",
        bundle(
            "batch",
            [
                entry(patient(pat, "Dangling", uid()), f"urn:uuid:{pat}"),
                entry(encounter, f"urn:uuid:{enc}"),
            ],
        ),
    )
    report = await import_paths(services, [tmp_path])
    assert [(e.file, e.index, e.message) for e in report.errors] == [
        ("dangling.json", 1, MSG_CONDITIONAL_NONE)
    ]
    assert report.counts["Patient"]["created"] == 1
    assert (await services.store.read("Patient", pat)).body["id"] == pat


async def test_failed_transaction_falls_back_to_entries(services, tmp_path):
    """Two PUTs on one resource cannot be one transaction: written one by one instead."""
    tmp_path = tmp_path / "in"
    body = patient("import-put-1", "Putwice", uid())
    write(
        tmp_path,
        "twice.json",
        bundle(
            "transaction",
            [
                entry(body, "Patient/import-put-1", method="PUT", url="Patient/import-put-1"),
                {
                    "resource": {**body, "gender": "male"},
                    "request": {"method": "PUT", "url": "Patient/import-put-1"},
                },
            ],
        ),
    )
    report = await import_paths(services, [tmp_path])
    assert report.ok, report.errors
    assert report.files[0].mode == "per-entry (transaction failed)"
    stored = await services.store.read("Patient", "import-put-1")
    assert stored.version == 2 and stored.body["gender"] == "male"


async def test_not_a_bundle_is_reported(services, tmp_path):
    tmp_path = tmp_path / "in"
    tmp_path.mkdir()
    (tmp_path / "junk.json").write_text("{not json")
    write(tmp_path, "searchset.json", {"resourceType": "Bundle", "type": "searchset"})
    report = await import_paths(services, [tmp_path])
    assert {(e.file, e.index) for e in report.errors} == {
        ("junk.json", None),
        ("searchset.json", None),
    }


async def test_conditional_update_entry(services, tmp_path):
    """PUT Organization?identifier=...: creates under the fullUrl's uuid, then updates it."""
    tmp_path = tmp_path / "in"
    org, ident = uid(), uid()
    organization = {
        "resourceType": "Organization",
        "identifier": [{"system": SYNTHEA, "value": ident}],
        "name": "Conditional Clinic",
    }
    write(
        tmp_path,
        "put.json",
        bundle(
            "transaction",
            [
                entry(
                    organization,
                    f"urn:uuid:{org}",
                    method="PUT",
                    url=f"Organization?identifier={SYNTHEA}|{ident}",
                )
            ],
        ),
    )
    first = await import_paths(services, [tmp_path])
    assert first.ok and first.counts["Organization"]["created"] == 1
    second = await import_paths(services, [tmp_path])
    assert second.ok and second.counts["Organization"]["updated"] == 1
    assert (await services.store.read("Organization", org)).version == 2


async def test_location_conditional_references(services, tmp_path):
    """Newer Synthea: hospitalInformation also holds Locations (ifNoneExist on a Synthea
    identifier, managingOrganization a logical reference by identifier), and Encounters,
    Procedures, Claims... point at them with ``Location?identifier=...``. Location.identifier
    is not a search parameter, so such references resolve against the entries of the same
    import run; a later run that lacks the Location says so per entry."""
    export, later = tmp_path / "export", tmp_path / "later"
    org, org_ident, loc, loc_ident = uid(), uid(), uid(), uid()
    pat, enc, proc = uid(), uid(), uid()
    organization = {
        "resourceType": "Organization",
        "identifier": [{"system": SYNTHEA, "value": org_ident}],
        "name": "Location Clinic",
    }
    location = {
        "resourceType": "Location",
        "identifier": [{"system": SYNTHEA, "value": loc_ident}],
        "status": "active",
        "name": "Location Clinic",
        "managingOrganization": {
            "identifier": {"system": SYNTHEA, "value": org_ident},
            "display": "Location Clinic",
        },
    }
    write(
        export,
        "hospitalInformation1700000000001.json",
        bundle(
            "transaction",
            [
                entry(
                    organization, f"urn:uuid:{org}", ifNoneExist=f"identifier={SYNTHEA}|{org_ident}"
                ),
                entry(location, f"urn:uuid:{loc}", ifNoneExist=f"identifier={SYNTHEA}|{loc_ident}"),
            ],
        ),
    )
    at_location = {"reference": f"Location?identifier={SYNTHEA}|{loc_ident}"}
    encounter = {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": f"urn:uuid:{pat}"},
        "location": [{"location": at_location}],
        "serviceProvider": {"reference": f"Organization?identifier={SYNTHEA}|{org_ident}"},
    }
    procedure = {
        "resourceType": "Procedure",
        "status": "completed",
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "430193006"}]},
        "subject": {"reference": f"urn:uuid:{pat}"},
        "encounter": {"reference": f"urn:uuid:{enc}"},
        "location": at_location,
    }
    patient_bundle = bundle(
        "transaction",
        [
            entry(patient(pat, "Locatedpatient", uid()), f"urn:uuid:{pat}"),
            entry(encounter, f"urn:uuid:{enc}"),
            entry(procedure, f"urn:uuid:{proc}"),
        ],
    )
    write(export, "Lou_Located.json", patient_bundle)
    report = await import_paths(services, [export])
    assert report.ok, report.errors
    stored = await services.store.read("Encounter", enc)
    assert stored.body["location"][0]["location"]["reference"] == f"Location/{loc}"
    assert stored.body["serviceProvider"]["reference"] == f"Organization/{org}"
    assert (await services.store.read("Procedure", proc)).body["location"]["reference"] == (
        f"Location/{loc}"
    )
    location_stored = (await services.store.read("Location", loc)).body
    assert location_stored["managingOrganization"]["identifier"]["value"] == org_ident

    # the whole export again: the Location is found by its ifNoneExist within the run
    again = await import_paths(services, [export])
    assert again.ok and again.counts["Location"] == {"created": 0, "updated": 0, "existing": 1}

    # a run with the patient file alone
    write(later, "Lou_Located.json", patient_bundle)
    alone = await import_paths(services, [later])
    if ("Location", "identifier") in SENSITIVITY:
        assert alone.ok, alone.errors
    else:
        assert [(e.index, e.message) for e in alone.errors] == [
            (1, MSG_CONDITIONAL_NOT_IN_RUN),
            (2, MSG_CONDITIONAL_NOT_IN_RUN),
        ]
        assert alone.counts["Patient"]["updated"] == 1
