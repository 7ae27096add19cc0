"""Break-glass opened while the patient is being erased: the erasure that commits first wins,
whichever check the opening was at. On SQLite and PostgreSQL; the erasure's transaction is
held open by the test while the opening queues behind it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from sqlalchemy import select

from carevault.access.break_glass import PatientNotFound
from carevault.db.engine import write_transaction
from carevault.db.tables import break_glass_grants, fhir_resources
from carevault.fhir.erasure import _unlink_in, scope_of
from carevault.identity.roles import Role
from tests.access.test_break_glass import REASON, principal
from tests.audit.trail import audit_documents
from tests.lock_waits import until_queued


async def test_an_erasure_committing_meanwhile_wins_over_break_glass(services: Any) -> None:
    """The opening read the patient live before the erasure committed, and encrypted its reason
    under a key not yet destroyed; its transaction then waits for the erasure's. It must check
    the patient again once the erasure committed: on PostgreSQL (READ COMMITTED) a plain read
    does not wait for the erasure's row lock and still sees the patient live, and a live grant
    and an alert for an erased patient were committed."""
    bg = services.break_glass
    patient = str((await services.store.create({"resourceType": "Patient"})).body["id"])
    doctor = await services.accounts.add_user(
        "bg.race", "correct-Horse-battery-staple-91", Role.physician
    )
    fresh = principal(doctor.id, "physician", auth_time=bg.now())

    # Step 1 of the erasure (fhir/erasure.py), its transaction left open until the opening
    # waits behind it.
    async with write_transaction(services.engine) as conn:
        await _unlink_in(conn, patient, scope_of(patient), time.time())
        opening = asyncio.create_task(bg.open(fresh, patient, REASON))
        await until_queued(services.engine, [opening])

    with pytest.raises(PatientNotFound):
        await opening
    assert await bg.active_patients(doctor.id) == frozenset()
    async with services.engine.connect() as conn:
        grants = (await conn.execute(select(break_glass_grants.c.id))).all()
        erased = (
            await conn.execute(
                select(fhir_resources.c.erased_at).where(fhir_resources.c.id == patient)
            )
        ).scalar_one()
    assert grants == [] and erased is not None
    assert await audit_documents(services.engine, "security.break_glass_opened") == []


async def test_break_glass_and_a_batch_writing_access_facts_do_not_deadlock(
    services: Any,
) -> None:
    """A batch [CareTeam, Observation, Patient B] and a break-glass opening for B, in flight
    together. The opening locks B's row, then the access generation's; the batch must not hold
    the generation's row while it waits for B's, or PostgreSQL aborts one of them as a
    deadlock (an HTTP 500). The test holds the Observation's row so that the opening runs
    while the batch is midway."""
    from sqlalchemy import update

    from carevault.fhir.store import WriteOperation

    bg = services.break_glass
    store = services.store
    patient = str((await store.create({"resourceType": "Patient"})).body["id"])
    observation = {"resourceType": "Observation", "status": "final", "code": {"text": "held"}}
    held = str((await store.create(observation)).body["id"])
    doctor = await services.accounts.add_user(
        "bg.batch", "correct-Horse-battery-staple-92", Role.physician
    )
    fresh = principal(doctor.id, "physician", auth_time=bg.now())
    batch = [
        WriteOperation("create", "CareTeam", "care-team-batch", {"resourceType": "CareTeam"}),
        WriteOperation("update", "Observation", held, {**observation, "id": held}),
        WriteOperation("update", "Patient", patient, {"resourceType": "Patient", "id": patient}),
    ]
    async with write_transaction(services.engine) as conn:
        await conn.execute(
            update(fhir_resources)
            .where(fhir_resources.c.id == held)
            .values(last_updated=fhir_resources.c.last_updated)
        )
        writing = asyncio.create_task(store.write_many(batch))
        await until_queued(services.engine, [writing])
        opening = asyncio.create_task(bg.open(fresh, patient, REASON))
        await asyncio.wait([opening], timeout=0.5)  # on its own, it needs nothing the test holds
    results = await asyncio.gather(writing, opening, return_exceptions=True)
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert await bg.active_patients(doctor.id) == frozenset({patient})
