"""Crypto-shredding erasure of one patient's record (`carevault patient erase`, and
`DELETE /fhir/Patient/{id}?_erase=true` for admins).

Every version of every resource encrypted under the patient's data key (scope
``"patient:<id>"``) becomes unreadable for good, in the live database and in every copy of it
(backups, replicas, a stolen file): the ciphertexts stay where they are, but the only key that
opens them is destroyed (`EnvelopeCipher.destroy`). That key lives in the key vault, never in
the data database, so no copy of the data database ever held it.

Order, and why:

1. One write transaction removes the search rows (index keys, index dates, compartment rows)
   of every resource under the patient's key, marks each resource deleted and erased (a new
   deleted version, `fhir_resources.erased_at`), and marks every stored version under the key
   deleted, so that reads answer 410 Gone and history never tries to decrypt. No search row
   survives that points at data about to become undecryptable.
2. The data key is destroyed.
3. The transaction of step 1 runs once more, to catch a resource whose write had encrypted
   before step 2 and committed after step 1 (a write that encrypts after step 2 fails:
   `KeyDestroyed`, answered 410).
4. A `patient_erased` security event records the actor and counts, never names or ids of
   records.

Idempotent and re-runnable: if the key cannot be destroyed the call raises `ErasureFailed`
after step 1 has committed (nothing is readable through the API any more, and search finds
nothing), and running it again finishes the job; erasing an erased patient does the same
steps again and changes nothing.

Limit (multi-patient resources): a resource in several patients' compartments (a shared
CareTeam, a Claim's payee) is encrypted under the key of the first patient in sorted order
(`ResourceStore._scope`). If that is another patient, erasing this one cannot shred it without
destroying the other patient's record: such resources are counted in
`ErasureReport.shared_other_scope`, this patient's compartment row and the index keys that
reference ``Patient/<id>`` are removed, and the resource otherwise stays readable (its body may
still name this patient). Conversely, a shared resource encrypted under THIS patient's key is
erased for every patient it concerns. Absolute-URL references to the patient in other
resources' indexes are not removed. Copies of the key vault taken before the erasure (its
backups; dead tuples of a PostgreSQL vault until VACUUM) still hold the wrapped DEK and open
only with a KEK key that wrapped them: rotate the KEK (`carevault keys rotate-kek`) once such
copies have aged out to finish the shredding.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from carevault.access.generation import bump_in
from carevault.audit.events import SecurityEvent
from carevault.db.engine import read_connection, write_transaction
from carevault.db.tables import (
    fhir_compartments,
    fhir_index_dates,
    fhir_index_keys,
    fhir_resources,
    fhir_versions,
)

PATIENT_ID = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
ATTEMPTS = 5


class ErasureError(Exception):
    """Base class; messages never name the patient."""


class InvalidPatientId(ErasureError, ValueError):
    pass


class PatientNotFound(ErasureError):
    pass


class ErasureFailed(ErasureError):
    """Search rows were removed and records marked erased, but the key was not destroyed.
    Run the erasure again."""


@dataclass(frozen=True)
class ErasureReport:
    erased: int  # resources under the patient's key newly erased by this run
    already_erased: int  # resources under the patient's key that an earlier run erased
    versions_shredded: int  # stored versions (ciphertexts) under the patient's key
    shared_other_scope: int  # in the compartment, but encrypted under another patient's key
    key_destroyed: bool

    @property
    def resources(self) -> int:
        return self.erased + self.already_erased


def scope_of(patient_id: str) -> str:
    return f"patient:{patient_id}"


def _check(patient_id: str) -> None:
    if not PATIENT_ID.fullmatch(patient_id):
        raise InvalidPatientId("invalid patient id")


async def _targets(conn: AsyncConnection, patient_id: str) -> list[Any]:
    """Current rows of the Patient, of every resource in its compartment and of every resource
    under its key (an erased one has no compartment row any more)."""
    scope = scope_of(patient_id)
    keys: dict[tuple[str, str], None] = {("Patient", patient_id): None}
    for row in await conn.execute(
        select(fhir_compartments.c.resource_type, fhir_compartments.c.id).where(
            fhir_compartments.c.patient_id == patient_id
        )
    ):
        keys[(row.resource_type, row.id)] = None
    for row in await conn.execute(
        select(fhir_resources.c.resource_type, fhir_resources.c.id).where(
            fhir_resources.c.scope == scope
        )
    ):
        keys[(row.resource_type, row.id)] = None
    rows = []
    for resource_type, resource_id in keys:
        row = (
            await conn.execute(
                select(
                    fhir_resources.c.resource_type,
                    fhir_resources.c.id,
                    fhir_resources.c.version,
                    fhir_resources.c.scope,
                    fhir_resources.c.erased_at,
                ).where(
                    and_(
                        fhir_resources.c.resource_type == resource_type,
                        fhir_resources.c.id == resource_id,
                    )
                )
            )
        ).first()
        if row is not None:
            rows.append(row)
    return rows


class _Retry(Exception):
    pass


async def _unlink(services: Any, patient_id: str, now: float) -> tuple[int, int, int, int]:
    """Step 1 (and 3): (erased, already_erased, versions_shredded, shared_other_scope)."""
    scope = scope_of(patient_id)
    for _ in range(ATTEMPTS):
        try:
            async with write_transaction(services.engine) as conn:
                counts = await _unlink_in(conn, patient_id, scope, now)
            services.access_generation.changed()
            return counts
        except _Retry:
            continue  # a concurrent write moved a resource on: read again
    raise ErasureFailed("too much write contention; run the erasure again")


async def _unlink_in(
    conn: AsyncConnection, patient_id: str, scope: str, now: float
) -> tuple[int, int, int, int]:
    erased = already = shared = 0
    for row in await _targets(conn, patient_id):
        where_resource = (
            fhir_compartments.c.resource_type == row.resource_type,
            fhir_compartments.c.id == row.id,
        )
        if row.scope != scope:
            # Encrypted under another patient's key: only this patient's links go.
            await conn.execute(
                delete(fhir_compartments).where(
                    and_(*where_resource, fhir_compartments.c.patient_id == patient_id)
                )
            )
            await conn.execute(
                delete(fhir_index_keys).where(
                    and_(
                        fhir_index_keys.c.resource_type == row.resource_type,
                        fhir_index_keys.c.id == row.id,
                        fhir_index_keys.c.key == f"Patient/{patient_id}",
                    )
                )
            )
            shared += 1
            continue
        await conn.execute(delete(fhir_compartments).where(and_(*where_resource)))
        for table in (fhir_index_keys, fhir_index_dates):
            await conn.execute(
                delete(table).where(
                    and_(table.c.resource_type == row.resource_type, table.c.id == row.id)
                )
            )
        if row.erased_at is not None:
            already += 1
            continue
        swapped = await conn.execute(
            update(fhir_resources)
            .where(
                and_(
                    fhir_resources.c.resource_type == row.resource_type,
                    fhir_resources.c.id == row.id,
                    fhir_resources.c.version == row.version,
                )
            )
            .values(version=row.version + 1, last_updated=now, deleted=True, erased_at=now)
        )
        if swapped.rowcount != 1:
            raise _Retry
        await conn.execute(
            insert(fhir_versions).values(
                resource_type=row.resource_type,
                id=row.id,
                version=row.version + 1,
                last_updated=now,
                deleted=True,
                scope=scope,
                body=b"",
            )
        )
        erased += 1
    # Every stored version under the key, also older versions of resources that have since
    # moved to another key: history must never try to decrypt them. Ciphertexts stay.
    shredded = await conn.execute(
        update(fhir_versions)
        .where(and_(fhir_versions.c.scope == scope, fhir_versions.c.deleted.is_(False)))
        .values(deleted=True)
    )
    await bump_in(conn)  # care teams, consents and the Patient itself are gone
    return erased, already, int(shredded.rowcount or 0), shared


async def plan_erasure(services: Any, patient_id: str) -> ErasureReport:
    """What `erase_patient` would do, counts only; changes nothing."""
    _check(patient_id)
    scope = scope_of(patient_id)
    async with read_connection(services.engine) as conn:
        rows = await _targets(conn, patient_id)
        versions = len(
            (
                await conn.execute(
                    select(fhir_versions.c.version).where(
                        and_(fhir_versions.c.scope == scope, fhir_versions.c.deleted.is_(False))
                    )
                )
            ).all()
        )
    key_state = await services.envelope.key_state(scope)
    own = [r for r in rows if r.scope == scope]
    if not rows and key_state == "absent":
        raise PatientNotFound("no such patient")
    return ErasureReport(
        erased=sum(1 for r in own if r.erased_at is None),
        already_erased=sum(1 for r in own if r.erased_at is not None),
        versions_shredded=versions,
        shared_other_scope=len(rows) - len(own),
        key_destroyed=key_state == "destroyed",
    )


async def erase_patient(
    services: Any, patient_id: str, actor_user_id: str | None = None
) -> ErasureReport:
    """Crypto-shred the patient's record (see the module docstring). Raises `PatientNotFound`
    when nothing of the patient is stored, `ErasureFailed` when the key was not destroyed."""
    planned = await plan_erasure(services, patient_id)  # validates, and 404s an unknown patient
    scope = scope_of(patient_id)
    now = time.time()
    erased, already, shredded, shared = await _unlink(services, patient_id, now)
    try:
        await services.envelope.destroy(scope)
    except Exception as err:  # noqa: BLE001 - reported, then the caller re-runs
        await services.events.record(
            SecurityEvent(
                "patient_erased",
                "failure",
                user_id=actor_user_id,
                details={"resources": erased + already, "stage": "destroy_key"},
            )
        )
        raise ErasureFailed("the data key could not be destroyed; run the erasure again") from err
    late = await _unlink(services, patient_id, now)  # writes that raced step 1
    erased, shredded, shared = erased + late[0], shredded + late[2], max(shared, late[3])
    report = ErasureReport(
        erased=erased,
        already_erased=already,
        versions_shredded=shredded,
        shared_other_scope=shared,
        key_destroyed=True,
    )
    await services.events.record(
        SecurityEvent(
            "patient_erased",
            "success",
            user_id=actor_user_id,
            details={
                "resources": report.resources,
                "versions": shredded,
                "shared_other_scope": shared,
                "repeat": planned.key_destroyed,
            },
        )
    )
    return report
