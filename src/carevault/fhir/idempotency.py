"""Idempotency-Key on FHIR creates (POST /fhir/{type}) and Bundles (POST /fhir).

A client that did not get the answer to a create (timeout, dropped connection) sends it again
with the same `Idempotency-Key`; the second request must not write a second resource. The key
is claimed in `fhir_idempotency` BEFORE the create (the primary key makes the claim atomic on
SQLite and PostgreSQL alike); the result (type, id, version, status) is recorded after it.

* same key, same body, within `TTL_SECONDS` -> the first response is replayed (the stored
  version is read again: same status, Location, ETag), nothing is written;
* same key, another body -> `KeyReused` (422);
* a duplicate arriving while the first is still being processed waits for it (up to
  `WAIT_SECONDS`) and then replays it; a claim older than `PENDING_LEASE_SECONDS` that never
  completed (crashed process) is taken over;
* a request whose claim was taken over (it was slow, not dead) still answers its own result,
  but records nothing and releases nothing: the claim, and what a replay answers, are the
  request's that took it over. A request knows its claim by the claim's `created_at`, kept by
  its `IdempotencyKeys` (one per request);
* the create failing -> `release()` deletes the claim, so a retry is not blocked;
* rows older than `TTL_SECONDS` are ignored and replaced; expired rows are deleted whenever a
  new key is claimed.

Keys are per user: the stored hash is SHA-256 over the user id and the key, so two users' keys
never collide, and neither the raw key nor the body is stored.

Bundles (transaction and batch) use the same claim, with `bundle_request_hash` (the request
line is part of the hash, so a key used for a create never replays as a Bundle or back); the
response is recorded with `complete_response` in `fhir_idempotency_responses` and read back
with `response`. What is recorded is `bundles.BundleResponse.record()`: status lines,
``Type/id`` and versions, instants and the fixed-text OperationOutcomes of failed entries -
never a resource body (a replay reads the recorded versions again from the store, so an
erasure reaches them). It is nevertheless sealed by the caller with the envelope cipher: the
outcomes name elements of the request body, and an authenticated record cannot be altered in
the database to point a replay at another record.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, delete, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from carevault.db.engine import read_connection, write_transaction
from carevault.db.tables import fhir_idempotency, fhir_idempotency_responses

TTL_SECONDS = 24 * 3600
WAIT_SECONDS = 10.0
POLL_SECONDS = 0.05
PENDING_LEASE_SECONDS = 300.0
KEY_PATTERN = re.compile(r"^[\x20-\x7e]{1,255}$")


class InvalidKey(Exception):
    """Not 1-255 printable ASCII characters."""


class KeyReused(Exception):
    """The key was used with another request body."""


class StillPending(Exception):
    """The first request with this key is still being processed (the client may retry)."""


@dataclass(frozen=True)
class Recorded:
    """The result of a completed request: a create's resource version and status, or (all but
    `status` None) a Bundle's, whose response is read with `IdempotencyKeys.response`."""

    resource_type: str | None
    resource_id: str | None
    version: int | None
    status: int


def key_hash(user_id: str, key: str) -> str:
    if not KEY_PATTERN.fullmatch(key):
        raise InvalidKey("invalid key")
    return hashlib.sha256(f"{user_id}\x00{key}".encode()).hexdigest()


def body_hash(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def bundle_request_hash(raw: bytes) -> str:
    """The request hash of a Bundle POST: never equal to a create's `body_hash`."""
    return hashlib.sha256(b"POST /fhir\x00" + raw).hexdigest()


class IdempotencyKeys:
    """The keys of one request: `complete`, `complete_response` and `release` act on the claim
    this object's `claim` made, and on nothing else."""

    def __init__(self, engine: AsyncEngine, clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._clock = clock
        self._claimed_at: dict[str, float] = {}  # key -> created_at of the claim we made

    async def claim(self, key: str, body: str) -> Recorded | None:
        """Claim `key` for a new request (None: go ahead, then `complete` or `release`), or
        return the recorded result of the earlier request with the same key and body."""
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            now = self._clock()
            try:
                async with write_transaction(self._engine) as conn:
                    row = (
                        await conn.execute(
                            select(fhir_idempotency).where(fhir_idempotency.c.key_hash == key)
                        )
                    ).first()
                    stale = row is not None and (
                        row.created_at < now - TTL_SECONDS
                        or (row.status is None and row.created_at < now - PENDING_LEASE_SECONDS)
                    )
                    if row is None or stale:
                        # Drop this key's claim only if it is still stale, and every expired
                        # key. The staleness is re-stated in the DELETE: under READ COMMITTED
                        # this statement sees a claim another request committed after our
                        # SELECT, and an unconditional delete would let both requests create.
                        await conn.execute(
                            delete(fhir_idempotency).where(
                                or_(
                                    and_(
                                        fhir_idempotency.c.key_hash == key,
                                        or_(
                                            fhir_idempotency.c.created_at < now - TTL_SECONDS,
                                            and_(
                                                fhir_idempotency.c.status.is_(None),
                                                fhir_idempotency.c.created_at
                                                < now - PENDING_LEASE_SECONDS,
                                            ),
                                        ),
                                    ),
                                    fhir_idempotency.c.created_at < now - TTL_SECONDS,
                                )
                            )
                        )
                        # recorded responses expire with their claims (same created_at); a
                        # pending claim taken over has none
                        await conn.execute(
                            delete(fhir_idempotency_responses).where(
                                fhir_idempotency_responses.c.created_at < now - TTL_SECONDS
                            )
                        )
                        await conn.execute(
                            insert(fhir_idempotency).values(
                                key_hash=key, body_hash=body, created_at=now
                            )
                        )
                        self._claimed_at[key] = now
                        return None
            except IntegrityError:
                continue  # a concurrent request claimed it first: read its row
            if row.body_hash != body:
                raise KeyReused("key reused")
            if row.status is not None:
                return Recorded(row.resource_type, row.resource_id, row.version, row.status)
            if time.monotonic() >= deadline:
                raise StillPending("pending")
            await asyncio.sleep(POLL_SECONDS)

    def _ours(self, key: str) -> ColumnElement[bool]:
        """The claim of `key` this request made, if it is still pending: another request may
        have taken it over (the same key, a later `created_at`) once the lease ran out."""
        return and_(
            fhir_idempotency.c.key_hash == key,
            fhir_idempotency.c.status.is_(None),
            fhir_idempotency.c.created_at == self._claimed_at[key],
        )

    async def complete(self, key: str, result: Recorded) -> bool:
        """Record a create's result; False (nothing recorded) when the claim was taken over."""
        async with write_transaction(self._engine) as conn:
            completed = await conn.execute(
                update(fhir_idempotency)
                .where(self._ours(key))
                .values(
                    resource_type=result.resource_type,
                    resource_id=result.resource_id,
                    version=result.version,
                    status=result.status,
                )
            )
        return completed.rowcount == 1

    async def complete_response(self, key: str, status: int, response: bytes) -> bool:
        """Record the response of a Bundle (sealed by the caller) for the claimed `key`; False
        (nothing recorded) when the claim was taken over: the other request records its own."""
        async with write_transaction(self._engine) as conn:
            # The claim first, conditionally, and nothing more unless it was still ours: the
            # UPDATE takes the row's lock, so a parallel completion of the request that took the
            # claim over waits, then finds the claim complete or not ours. Reading it first let
            # both go on under READ COMMITTED, the second to a primary-key violation below.
            completed = await conn.execute(
                update(fhir_idempotency).where(self._ours(key)).values(status=status)
            )
            if completed.rowcount != 1:
                return False
            await conn.execute(
                insert(fhir_idempotency_responses).values(
                    key_hash=key, response=response, created_at=self._claimed_at[key]
                )
            )
        return True

    async def response(self, key: str) -> bytes | None:
        """The recorded (sealed) response of a completed Bundle request."""
        async with read_connection(self._engine) as conn:
            return (
                await conn.execute(
                    select(fhir_idempotency_responses.c.response).where(
                        fhir_idempotency_responses.c.key_hash == key
                    )
                )
            ).scalar_one_or_none()

    async def release(self, key: str) -> None:
        """Forget a claim whose request failed (only a pending one, and only ours)."""
        async with write_transaction(self._engine) as conn:
            await conn.execute(delete(fhir_idempotency).where(self._ours(key)))
