"""A small synthetic demo data set for `carevault init --demo` (made up here, no real data).

Deterministic (``random.Random(seed)``): one Organization ``demo-hospital``, Practitioners
``demo-practitioner-1`` and ``-2`` (the demo physician and nurse accounts link to them) and
`PATIENTS` patients - the first one is ``demo-patient-1``, the demo patient account's record -
each with an active CareTeam listing both practitioners (access control lets a physician or
nurse see only the patients whose active CareTeam lists them), 1-3 encounters, vital-sign
Observations (LOINC) and Conditions (SNOMED CT). Names are obviously synthetic ("Demo" family
names).
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from carevault.fhir.store import NotFound, ResourceStore, StoreError, WriteOperation
from carevault.fhir.validation import validate_resource

PATIENTS: Final = 20
FIRST_PATIENT: Final = "demo-patient-1"
ORGANIZATION: Final = "demo-hospital"
PRACTITIONERS: Final = ("demo-practitioner-1", "demo-practitioner-2")
# the CareTeam role of each practitioner (SNOMED CT): the physician, the nurse
CARE_TEAM_ROLES: Final = (("309343006", "Physician"), ("106292003", "Professional nurse"))
IDENTIFIER_SYSTEM: Final = "urn:carevault:demo"

LOINC: Final = "http://loinc.org"
SNOMED: Final = "http://snomed.info/sct"
UCUM: Final = "http://unitsofmeasure.org"

# (code, display, unit, ucum code, low, high)
VITALS: Final = (
    ("8867-4", "Heart rate", "beats/minute", "/min", 55, 105),
    ("8480-6", "Systolic blood pressure", "mmHg", "mm[Hg]", 100, 160),
    ("8462-4", "Diastolic blood pressure", "mmHg", "mm[Hg]", 60, 100),
    ("29463-7", "Body weight", "kg", "kg", 50, 110),
    ("8310-5", "Body temperature", "Cel", "Cel", 36, 38),
)
CONDITIONS: Final = (
    ("38341003", "Hypertensive disorder"),
    ("44054006", "Diabetes mellitus type 2"),
    ("195662009", "Acute viral pharyngitis"),
    ("10509002", "Acute bronchitis"),
    ("55822004", "Hyperlipidemia"),
    ("40055000", "Chronic sinusitis"),
)
GIVEN: Final = ("Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf", "Hotel")
FAMILY: Final = ("Demo", "Sample", "Testcase", "Synthetic", "Example")


def generate(seed: int = 42, patients: int = PATIENTS) -> list[dict[str, Any]]:
    """The demo resources (not validated yet), organization and practitioners first."""
    rng = random.Random(seed)  # noqa: S311 - made-up demo data, not security
    base = datetime(2024, 1, 1, 8, 0, tzinfo=UTC)
    resources: list[dict[str, Any]] = [
        {
            "resourceType": "Organization",
            "id": ORGANIZATION,
            "identifier": [{"system": IDENTIFIER_SYSTEM, "value": ORGANIZATION}],
            "active": True,
            "name": "Demo Hospital (synthetic)",
        }
    ]
    for number, practitioner in enumerate(PRACTITIONERS, start=1):
        resources.append(
            {
                "resourceType": "Practitioner",
                "id": practitioner,
                "identifier": [{"system": IDENTIFIER_SYSTEM, "value": practitioner}],
                "active": True,
                "name": [{"family": "Demo-Clinician", "given": [f"Number{number}"]}],
            }
        )
    for p in range(1, patients + 1):
        patient_id = f"demo-patient-{p}"
        birth = base - timedelta(days=rng.randint(18 * 365, 85 * 365))
        resources.append(
            {
                "resourceType": "Patient",
                "id": patient_id,
                "identifier": [{"system": IDENTIFIER_SYSTEM, "value": patient_id}],
                "active": True,
                "name": [
                    {
                        "use": "official",
                        "family": f"{rng.choice(FAMILY)}-{p}",
                        "given": [rng.choice(GIVEN)],
                    }
                ],
                "gender": rng.choice(("female", "male")),
                "birthDate": birth.date().isoformat(),
                "managingOrganization": {"reference": f"Organization/{ORGANIZATION}"},
                "generalPractitioner": [
                    {"reference": f"Practitioner/{PRACTITIONERS[(p - 1) % 2]}"}
                ],
            }
        )
        resources.append(care_team(patient_id))
        subject = {"reference": f"Patient/{patient_id}"}
        for e in range(1, rng.randint(1, 3) + 1):
            encounter_id = f"demo-encounter-{p}-{e}"
            start = base + timedelta(days=rng.randint(0, 600), hours=rng.randint(0, 8))
            end = start + timedelta(minutes=rng.choice((15, 20, 30, 45)))
            practitioner = rng.choice(PRACTITIONERS)
            resources.append(
                {
                    "resourceType": "Encounter",
                    "id": encounter_id,
                    "status": "finished",
                    "class": {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                        "code": "AMB",
                        "display": "ambulatory",
                    },
                    "type": [
                        {
                            "coding": [
                                {
                                    "system": SNOMED,
                                    "code": "185349003",
                                    "display": "Encounter for check up",
                                }
                            ]
                        }
                    ],
                    "subject": subject,
                    "participant": [{"individual": {"reference": f"Practitioner/{practitioner}"}}],
                    "period": {"start": _instant(start), "end": _instant(end)},
                    "serviceProvider": {"reference": f"Organization/{ORGANIZATION}"},
                }
            )
            encounter = {"reference": f"Encounter/{encounter_id}"}
            for o, (code, display, unit, ucum, low, high) in enumerate(VITALS, start=1):
                value = round(rng.uniform(low, high), 1)
                resources.append(
                    {
                        "resourceType": "Observation",
                        "id": f"demo-observation-{p}-{e}-{o}",
                        "status": "final",
                        "category": [
                            {
                                "coding": [
                                    {
                                        "system": "http://terminology.hl7.org/CodeSystem/"
                                        "observation-category",
                                        "code": "vital-signs",
                                    }
                                ]
                            }
                        ],
                        "code": {"coding": [{"system": LOINC, "code": code, "display": display}]},
                        "subject": subject,
                        "encounter": encounter,
                        "effectiveDateTime": _instant(start),
                        "performer": [{"reference": f"Practitioner/{practitioner}"}],
                        "valueQuantity": {
                            "value": value,
                            "unit": unit,
                            "system": UCUM,
                            "code": ucum,
                        },
                    }
                )
            if e == 1 or rng.random() < 0.4:
                code, display = rng.choice(CONDITIONS)
                resources.append(
                    {
                        "resourceType": "Condition",
                        "id": f"demo-condition-{p}-{e}",
                        "clinicalStatus": {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/"
                                    "condition-clinical",
                                    "code": "active",
                                }
                            ]
                        },
                        "code": {"coding": [{"system": SNOMED, "code": code, "display": display}]},
                        "subject": subject,
                        "encounter": encounter,
                        "onsetDateTime": _instant(start),
                        "recorder": {"reference": f"Practitioner/{practitioner}"},
                    }
                )
    return resources


def care_team(patient_id: str) -> dict[str, Any]:
    """The patient's active CareTeam: both demo practitioners (no randomness, so that adding
    it left the rest of the generated data as it was)."""
    return {
        "resourceType": "CareTeam",
        "id": care_team_id(patient_id),
        "status": "active",
        "name": f"Care team of {patient_id}",
        "subject": {"reference": f"Patient/{patient_id}"},
        "participant": [
            {
                "role": [{"coding": [{"system": SNOMED, "code": code, "display": display}]}],
                "member": {"reference": f"Practitioner/{practitioner}"},
            }
            for practitioner, (code, display) in zip(PRACTITIONERS, CARE_TEAM_ROLES, strict=True)
        ],
        "managingOrganization": [{"reference": f"Organization/{ORGANIZATION}"}],
    }


def care_team_id(patient_id: str) -> str:
    return patient_id.replace("demo-patient-", "demo-careteam-", 1)


def _instant(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


async def seed(store: ResourceStore, seed: int = 42) -> int | None:
    """Store the demo data set in one transaction, unless ``demo-patient-1`` exists already;
    return the number of resources written. When it exists (a data set seeded by an earlier
    version, before access control), only the CareTeams that were never written are added, so
    that the demo staff still see their patients; None when there was nothing to add."""
    try:
        await store.read("Patient", FIRST_PATIENT)
    except NotFound:
        pass
    except StoreError:  # deleted or erased: the demo data was there once; leave it alone
        return None
    else:
        return await _add_missing_care_teams(store, seed)
    operations = []
    for resource in generate(seed):
        body = validate_resource(resource, resource["resourceType"])
        current = await _exists(store, body["resourceType"], body["id"])
        operations.append(
            WriteOperation(
                "update" if current else "create", body["resourceType"], body["id"], body
            )
        )
    await store.write_many(operations)
    return len(operations)


async def _add_missing_care_teams(store: ResourceStore, seed: int) -> int | None:
    """CareTeams of the demo patients that exist, where none was ever written (one deleted on
    purpose stays deleted)."""
    operations = []
    for resource in generate(seed):
        if resource["resourceType"] != "CareTeam":
            continue
        patient_id = resource["subject"]["reference"].removeprefix("Patient/")
        if not await _present(store, "Patient", patient_id):
            continue
        if await _exists(store, "CareTeam", resource["id"]):
            continue
        body = validate_resource(resource, "CareTeam")
        operations.append(WriteOperation("create", "CareTeam", body["id"], body))
    if not operations:
        return None
    await store.write_many(operations)
    return len(operations)


async def _present(store: ResourceStore, resource_type: str, resource_id: str) -> bool:
    try:
        await store.read(resource_type, resource_id)
    except StoreError:  # missing, deleted or erased
        return False
    return True


async def _exists(store: ResourceStore, resource_type: str, resource_id: str) -> bool:
    try:
        await store.read(resource_type, resource_id)
    except NotFound:
        return False
    except Exception:  # noqa: BLE001 - deleted or unreadable: it exists, update it
        return True
    return True
