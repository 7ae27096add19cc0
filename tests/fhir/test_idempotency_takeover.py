"""An Idempotency-Key claim taken over after its lease ran out (fhir/idempotency.py): the
request that lost it (a slow one, not a crashed one) still finishes, and then neither records
its result under the claim of the request that took over, nor releases that claim, nor fails
with a server error. On SQLite and PostgreSQL, through the service objects: the interleaving
is forced with the clock and a lock the test holds on the claim's row."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import select

from carevault.db.engine import write_transaction
from carevault.db.tables import fhir_idempotency
from carevault.fhir.idempotency import (
    PENDING_LEASE_SECONDS,
    IdempotencyKeys,
    Recorded,
    body_hash,
    bundle_request_hash,
    key_hash,
)
from tests.conftest import FakeClock
from tests.lock_waits import until_queued

BUNDLE = bundle_request_hash(b'{"resourceType": "Bundle", "type": "batch"}')
CREATE = body_hash(b'{"resourceType": "Patient"}')


@pytest.fixture
def key() -> str:
    return key_hash("user-1", "retried-request")


async def _taken_over(services: Any, clock: FakeClock, key: str, body: str) -> tuple[Any, Any]:
    """The key claimed by a first request, then by a second once the first's lease ran out:
    (the first request's keys, the second's)."""
    stale = IdempotencyKeys(services.engine, clock)
    assert await stale.claim(key, body) is None
    clock.advance(PENDING_LEASE_SECONDS + 1)
    current = IdempotencyKeys(services.engine, clock)
    assert await current.claim(key, body) is None
    return stale, current


async def _claim_row(services: Any, key: str) -> Any:
    async with services.engine.connect() as conn:
        return (
            await conn.execute(select(fhir_idempotency).where(fhir_idempotency.c.key_hash == key))
        ).one()


async def test_a_stale_bundle_response_is_not_recorded_under_the_new_claim(
    services: Any, clock: FakeClock, key: str
) -> None:
    stale, current = await _taken_over(services, clock, key, BUNDLE)

    recorded = await stale.complete_response(key, 200, b"the first request's response")
    assert (await _claim_row(services, key)).status is None  # still the second's, pending
    assert recorded is False
    assert await current.complete_response(key, 200, b"the second request's response") is True

    assert await current.response(key) == b"the second request's response"
    replay = await IdempotencyKeys(services.engine, clock).claim(key, BUNDLE)
    assert replay == Recorded(None, None, None, 200)


async def test_completions_queued_on_a_taken_over_claim_record_the_owner_once(
    services: Any, clock: FakeClock, key: str
) -> None:
    """Both requests complete at once, queued on the claim's row. Each had seen the claim
    pending; on PostgreSQL (READ COMMITTED) both then inserted a response: the second a primary
    key violation (a 500 after its Bundle was written), or the first request's response was
    recorded for the second."""
    stale, current = await _taken_over(services, clock, key, BUNDLE)
    holding, release = asyncio.Event(), asyncio.Event()

    async def hold_claim() -> None:
        async with write_transaction(services.engine) as conn:
            await conn.execute(
                select(fhir_idempotency.c.key_hash)
                .where(fhir_idempotency.c.key_hash == key)
                .with_for_update()
            )
            holding.set()
            await release.wait()

    holder = asyncio.create_task(hold_claim())
    await holding.wait()
    late = asyncio.create_task(stale.complete_response(key, 200, b"the first request's response"))
    await until_queued(services.engine, [late])
    owner = asyncio.create_task(
        current.complete_response(key, 200, b"the second request's response")
    )
    await until_queued(services.engine, [late, owner])
    release.set()
    await holder

    results = await asyncio.gather(late, owner, return_exceptions=True)
    assert results == [False, True]
    assert await current.response(key) == b"the second request's response"
    assert (await _claim_row(services, key)).status == 200


async def test_a_stale_create_neither_releases_nor_completes_the_new_claim(
    services: Any, clock: FakeClock, key: str
) -> None:
    stale, current = await _taken_over(services, clock, key, CREATE)

    await stale.release(key)  # its create failed: the claim it releases is no longer its own
    await stale.complete(key, Recorded("Patient", "first", 1, 201))
    row = await _claim_row(services, key)
    assert (row.status, row.resource_id, row.created_at) == (None, None, clock())

    await current.complete(key, Recorded("Patient", "second", 1, 201))
    replay = await IdempotencyKeys(services.engine, clock).claim(key, CREATE)
    assert replay == Recorded("Patient", "second", 1, 201)
