"""The FHIR resource store: versioned, encrypted at rest, indexed for search.

Every version of every resource is stored only as AEAD ciphertext under its scope's data key
(crypto/envelope.py): the patient's key for resources in a Patient compartment, a per-type key
otherwise. The associated data binds a ciphertext to its resource type, id and version, so a
ciphertext copied into another row does not decrypt. Search values are written as keys in the
clear only where `search_params.SENSITIVITY` says "plain"; PHI values become blind-index hashes.

Writes are optimistic: the body is encrypted for the version it is about to become, and the
transaction only commits if the resource is still at the version that was read (compare and
swap), retrying a few times under contention.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from sqlalchemy import and_, bindparam, delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from carevault.access.generation import ACCESS_FACT_TYPES, AccessGeneration, bump_in
from carevault.crypto.blind_index import BlindIndex
from carevault.crypto.envelope import DecryptionFailed, EnvelopeCipher, KeyDestroyed
from carevault.db.engine import read_connection, write_transaction
from carevault.db.key_reads import DIALECTS, in_list, read_by_key
from carevault.db.tables import (
    fhir_compartments,
    fhir_index_dates,
    fhir_index_keys,
    fhir_resources,
    fhir_versions,
)
from carevault.fhir.compartment import PatientCompartment
from carevault.fhir.search_params import extract_index

MAX_INDEX_KEY = 512
WRITE_ATTEMPTS = 5


class StoreError(Exception):
    """Base class of the store's errors (messages are generic: no ids, no values)."""


class NotFound(StoreError):
    pass


class Gone(StoreError):
    """The resource (or that version) was deleted."""

    def __init__(self, version: int, last_updated: float) -> None:
        self.version = version
        self.last_updated = last_updated
        super().__init__("gone")


class Erased(Gone):
    """The resource was crypto-shredded (fhir/erasure.py): gone for good, never written again."""


class VersionConflict(StoreError):
    """If-Match named another version than the current one."""


class WriteContention(StoreError):
    """Too many concurrent writers on one resource; the client may retry."""


class IntegrityFailure(StoreError):
    """A stored ciphertext could not be decrypted (tampered row, wrong or destroyed key)."""


@dataclass(frozen=True)
class StoredResource:
    resource_type: str
    id: str
    version: int
    last_updated: float
    deleted: bool
    body: dict[str, Any] | None

    @property
    def etag(self) -> str:
        return f'W/"{self.version}"'

    @property
    def last_modified(self) -> str:
        """RFC 9110 HTTP-date."""
        return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(self.last_updated))


@dataclass(frozen=True)
class WriteOperation:
    """One write of `ResourceStore.write_many`: "create" (under `resource_id`, which must be
    new: the caller assigns it, e.g. a uuid4), "update" (optionally If-Match `if_match`) or
    "delete" (no body). Bodies are validated resources, as for create/update."""

    action: Literal["create", "update", "delete"]
    resource_type: str
    resource_id: str
    body: dict[str, Any] | None = None
    if_match: int | None = None
    allow_create: bool = False  # update-as-create (import, granted users)


def _at(error: StoreError, index: int) -> StoreError:
    error.operation_index = index  # type: ignore[attr-defined]
    return error


def instant(epoch: float) -> str:
    """A FHIR instant (UTC, millisecond precision)."""
    return (
        datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )


def associated_data(resource_type: str, resource_id: str, version: int) -> bytes:
    return f"{resource_type}/{resource_id}/_history/{version}".encode()


def index_label(resource_type: str, param: str) -> str:
    """The blind-index `kind` of a search parameter: hashes never match across parameters."""
    return f"{resource_type}.{param}"


class ResourceStore:
    def __init__(
        self,
        engine: AsyncEngine,
        envelope: EnvelopeCipher,
        blind_index: BlindIndex,
        compartment: PatientCompartment,
        clock: Callable[[], float] = time.time,
        access_generation: AccessGeneration | None = None,
    ) -> None:
        self._engine = engine
        self._envelope = envelope
        self._blind = blind_index
        self._compartment = compartment
        self._clock = clock
        # Writes of CareTeam, PractitionerRole, Patient or Consent change who may see what:
        # they move the access generation in their own transaction (access/generation.py).
        self._access_generation = access_generation

    # --- scope and indexing ---------------------------------------------------------------

    def patients_of(self, body: Mapping[str, Any]) -> list[str]:
        """The ids of the patients whose compartment `body` (a stored resource) is in."""
        if body.get("resourceType") == "Patient":
            return [body["id"]] if isinstance(body.get("id"), str) else []
        return sorted(self._compartment.patient_ids(body))

    @staticmethod
    def _scope(resource_type: str, patients: list[str]) -> str:
        # A resource of several patients (a Claim's payee, a shared CareTeam) is encrypted
        # under the first one's key, in sorted order so that it is stable across versions.
        return f"patient:{patients[0]}" if patients else f"type:{resource_type}"

    def _index_rows(
        self, body: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        resource_type, resource_id = body["resourceType"], body["id"]
        keys: dict[tuple[str, str], None] = {}
        dates: list[dict[str, Any]] = []
        for entry in extract_index(body):
            label = index_label(resource_type, entry.param)
            if entry.kind == "date" and not entry.phi:
                low, high = entry.values
                dates.append(
                    {
                        "resource_type": resource_type,
                        "id": resource_id,
                        "param": entry.param,
                        "low": low,
                        "high": high,
                    }
                )
                continue
            if entry.phi:
                if entry.kind == "string":
                    hashes = [
                        h for value in entry.values for h in self._blind.prefixes(label, str(value))
                    ]
                else:
                    hashes = [self._blind.exact(label, key) for key in entry.keys]
                for value in hashes:
                    keys[(entry.param, value)] = None
            else:
                for key in entry.keys:
                    if len(key) > MAX_INDEX_KEY:  # never truncated: a prefix could match wrongly
                        key = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
                    keys[(entry.param, key)] = None
        key_rows = [
            {"resource_type": resource_type, "id": resource_id, "param": p, "key": k}
            for p, k in keys
        ]
        return key_rows, dates

    async def _replace_index(
        self,
        conn: AsyncConnection,
        body: dict[str, Any] | None,
        resource_type: str,
        resource_id: str,
    ) -> None:
        for table in (fhir_index_keys, fhir_index_dates):
            await conn.execute(
                delete(table).where(
                    and_(table.c.resource_type == resource_type, table.c.id == resource_id)
                )
            )
        if body is None:
            return
        key_rows, date_rows = self._index_rows(body)
        if key_rows:
            await conn.execute(insert(fhir_index_keys), key_rows)
        if date_rows:
            await conn.execute(insert(fhir_index_dates), date_rows)

    async def _replace_compartments(
        self, conn: AsyncConnection, resource_type: str, resource_id: str, patients: list[str]
    ) -> None:
        await conn.execute(
            delete(fhir_compartments).where(
                and_(
                    fhir_compartments.c.resource_type == resource_type,
                    fhir_compartments.c.id == resource_id,
                )
            )
        )
        if patients:
            await conn.execute(
                insert(fhir_compartments),
                [
                    {"resource_type": resource_type, "id": resource_id, "patient_id": p}
                    for p in patients
                ],
            )

    # --- writes ---------------------------------------------------------------------------

    def _stamp(
        self, body: dict[str, Any], resource_id: str, version: int, now: float
    ) -> dict[str, Any]:
        stamped = dict(body)
        stamped["id"] = resource_id
        meta = dict(stamped.get("meta") or {})
        meta["versionId"] = str(version)
        meta["lastUpdated"] = instant(now)
        stamped["meta"] = meta
        return stamped

    async def create(self, body: dict[str, Any]) -> StoredResource:
        """Store a validated resource under a new server-assigned id (any client id is ignored)."""
        op = WriteOperation("create", body["resourceType"], str(uuid.uuid4()), body)
        return (await self.write_many([op]))[0]

    async def update(
        self,
        resource_type: str,
        resource_id: str,
        body: dict[str, Any],
        *,
        if_match: int | None = None,
        allow_create: bool = False,
    ) -> tuple[StoredResource, bool]:
        """Write a new version; return it and whether the resource was created."""
        op = WriteOperation(
            "update", resource_type, resource_id, body, if_match, allow_create=allow_create
        )
        stored = (await self.write_many([op]))[0]
        return stored, stored.version == 1  # versions only grow: 1 is the creating write

    async def delete(
        self, resource_type: str, resource_id: str, *, if_match: int | None = None
    ) -> StoredResource:
        """Logical delete: a new, empty version; history keeps the earlier ones."""
        op = WriteOperation("delete", resource_type, resource_id, if_match=if_match)
        return (await self.write_many([op]))[0]

    async def write_many(self, operations: Sequence[WriteOperation]) -> list[StoredResource]:
        """Apply creates, updates and deletes in ONE database transaction: all or nothing.

        Results are in the order of `operations`. Every body is encrypted first, outside the
        transaction (a new data key is created in the envelope's own transaction; creating it
        while holding the write lock would invert the lock order on SQLite). Then one write
        transaction does every compare-and-swap, insert, index and compartment write; if any
        of them fails, everything is rolled back and the error is raised (NotFound,
        VersionConflict, WriteContention, IntegrityError), with `operation_index` set on
        store errors to the position of the failing operation. Rules per operation are those of
        create (new row; the given id must be new), update without update-as-create (with an
        optional If-Match version) and delete (deleting a deleted resource is a no-op). Two
        operations on the same resource are refused (ValueError): a transaction must not
        touch one resource twice.
        """
        targets = [(op.resource_type, op.resource_id) for op in operations]
        if len(set(targets)) != len(targets):
            raise ValueError("two operations on one resource")
        if not operations:
            return []
        for _ in range(WRITE_ATTEMPTS):
            currents: list[tuple[Any, ...] | None] = []
            for index, op in enumerate(operations):
                current = (
                    None
                    if op.action == "create"
                    else await self._current(op.resource_type, op.resource_id)
                )
                if current is None and not (op.action == "create" or op.allow_create):
                    raise _at(NotFound("not found"), index)
                version = current[0] if current else 0
                if current is not None and op.action == "update" and current[3]:
                    raise _at(Erased(version, self._clock()), index)
                if op.if_match is not None and op.if_match != version:
                    raise _at(VersionConflict("version conflict"), index)
                currents.append(current)
            now = self._clock()
            # (stamped body, patients, scope, ciphertext) per operation; None for no-op deletes
            prepared: list[tuple[dict[str, Any] | None, list[str], str, bytes] | None] = []
            for op, current in zip(operations, currents, strict=True):
                version = current[0] if current else 0
                if op.action == "delete":
                    assert current is not None
                    prepared.append(None if current[1] else (None, [], current[2], b""))
                    continue
                if op.body is None:
                    raise ValueError("a create or update needs a body")
                stamped = self._stamp(op.body, op.resource_id, version + 1, now)
                patients = self.patients_of(stamped)
                scope = self._scope(op.resource_type, patients)
                try:
                    ciphertext = await self._envelope.encrypt(
                        scope,
                        orjson.dumps(stamped),
                        associated_data(op.resource_type, op.resource_id, version + 1),
                    )
                except KeyDestroyed:  # a referenced patient was erased
                    raise _at(Erased(version, now), operations.index(op)) from None
                prepared.append((stamped, patients, scope, ciphertext))
            results: list[StoredResource] = []
            bumped = False  # an access fact was written: the generation moves once
            try:
                async with write_transaction(self._engine) as conn:
                    for op, current, prep in zip(operations, currents, prepared, strict=True):
                        version = current[0] if current else 0
                        if prep is None:  # deleting a deleted resource: nothing to write
                            results.append(
                                StoredResource(
                                    op.resource_type, op.resource_id, version, now, True, None
                                )
                            )
                            continue
                        stamped, patients, scope, ciphertext = prep
                        deleted = op.action == "delete"
                        if current is None:
                            await conn.execute(
                                insert(fhir_resources).values(
                                    resource_type=op.resource_type,
                                    id=op.resource_id,
                                    version=1,
                                    last_updated=now,
                                    deleted=False,
                                    scope=scope,
                                )
                            )
                        else:
                            swapped = await conn.execute(
                                update(fhir_resources)
                                .where(
                                    and_(
                                        fhir_resources.c.resource_type == op.resource_type,
                                        fhir_resources.c.id == op.resource_id,
                                        fhir_resources.c.version == version,
                                    )
                                )
                                .values(
                                    version=version + 1,
                                    last_updated=now,
                                    deleted=deleted,
                                    scope=scope,
                                )
                            )
                            if swapped.rowcount != 1:
                                raise _Retry
                        await conn.execute(
                            insert(fhir_versions).values(
                                resource_type=op.resource_type,
                                id=op.resource_id,
                                version=version + 1,
                                last_updated=now,
                                deleted=deleted,
                                scope=scope,
                                body=ciphertext,
                            )
                        )
                        if not deleted:  # a delete keeps its compartments, like delete()
                            await self._replace_compartments(
                                conn, op.resource_type, op.resource_id, patients
                            )
                        await self._replace_index(conn, stamped, op.resource_type, op.resource_id)
                        bumped = bumped or op.resource_type in ACCESS_FACT_TYPES
                        results.append(
                            StoredResource(
                                op.resource_type, op.resource_id, version + 1, now, deleted, stamped
                            )
                        )
                    # Last, after every resource row: a writer that locks a resource row and
                    # then the generation's (break-glass, erasure) must never find this
                    # transaction holding the generation's row while it waits for a resource
                    # row (a deadlock on PostgreSQL, one side answered 500).
                    if bumped and self._access_generation is not None:
                        await bump_in(conn)
            except _Retry:
                continue
            except IntegrityError:
                # An update-as-create lost a race with another creator of the same id: read
                # again and update it instead. A plain create must not silently become an update.
                if any(op.action == "update" and op.allow_create for op in operations):
                    continue
                raise
            if bumped and self._access_generation is not None:
                self._access_generation.changed()
            return results
        raise WriteContention("contention")

    # --- reads ----------------------------------------------------------------------------

    async def _current(
        self, resource_type: str, resource_id: str
    ) -> tuple[int, bool, str, bool] | None:
        """(version, deleted, scope, erased) of the current version, or None."""
        key = {"resource_type": resource_type, "id": resource_id}
        rows = await read_by_key(self._engine, _POINTER, key)
        if not rows:
            return None
        row = rows[0]
        return row.version, bool(row.deleted), row.scope, row.erased_at is not None

    async def _decrypt(
        self, resource_type: str, resource_id: str, version: int, scope: str, ciphertext: bytes
    ) -> dict[str, Any]:
        try:
            plaintext = await self._envelope.decrypt(
                scope, ciphertext, associated_data(resource_type, resource_id, version)
            )
            return orjson.loads(plaintext)
        except (DecryptionFailed, orjson.JSONDecodeError) as err:
            raise IntegrityFailure("integrity") from err

    async def read(self, resource_type: str, resource_id: str) -> StoredResource:
        key = {"resource_type": resource_type, "id": resource_id}
        rows = await read_by_key(self._engine, _CURRENT, key)
        return await self._materialise(rows[0] if rows else None)

    async def read_many(
        self, resource_type: str, resource_ids: list[str]
    ) -> dict[str, StoredResource]:
        """Current versions of the given resources of one type, by id; ids that do not exist or
        are deleted are left out (read-only; used by search)."""
        if not resource_ids:
            return {}
        key = {"resource_type": resource_type, "ids": sorted(set(resource_ids))}
        rows = await read_by_key(self._engine, _CURRENT_IN[self._engine.dialect.name], key)
        return await self.materialise_many(rows)

    async def materialise_many(self, rows: Sequence[Any]) -> dict[str, StoredResource]:
        """Current versions already read, by id, decrypted: rows with the columns of a version
        (resource_type, id, version, last_updated, deleted, scope, body), as `read_many` reads
        them or a search's page brings them (`search.SearchResult.rows`). A row without a
        version (body None: a search's outer join found none) or of a deletion is left out,
        as `read_many` leaves them out."""
        found: dict[str, StoredResource] = {}
        for row in rows:
            if row.body is not None and not row.deleted:
                found[row.id] = await self._materialise(row)
        return found

    async def vread(self, resource_type: str, resource_id: str, version: int) -> StoredResource:
        key = {"resource_type": resource_type, "id": resource_id, "version": version}
        rows = await read_by_key(self._engine, _VERSION, key)
        return await self._materialise(rows[0] if rows else None)

    async def _materialise(self, row: Any) -> StoredResource:
        if row is None:
            raise NotFound("not found")
        if row.deleted:
            raise Gone(row.version, row.last_updated)
        body = await self._decrypt(row.resource_type, row.id, row.version, row.scope, row.body)
        return StoredResource(row.resource_type, row.id, row.version, row.last_updated, False, body)

    async def history(
        self, resource_type: str, resource_id: str | None = None, *, limit: int = 100
    ) -> list[StoredResource]:
        """Versions, newest first: of one resource, or of every resource of the type."""
        conditions = [fhir_versions.c.resource_type == resource_type]
        erased = select(fhir_resources.c.id).where(
            and_(
                fhir_resources.c.resource_type == resource_type,
                fhir_resources.c.erased_at.is_not(None),
            )
        )
        if resource_id is not None:
            conditions.append(fhir_versions.c.id == resource_id)
        else:
            conditions.append(fhir_versions.c.id.not_in(erased))  # erased: not listed at all
        async with read_connection(self._engine) as conn:
            if resource_id is not None:
                gone = (
                    await conn.execute(
                        select(fhir_resources.c.version, fhir_resources.c.last_updated).where(
                            and_(
                                fhir_resources.c.resource_type == resource_type,
                                fhir_resources.c.id == resource_id,
                                fhir_resources.c.erased_at.is_not(None),
                            )
                        )
                    )
                ).first()
                if gone is not None:
                    raise Erased(gone.version, gone.last_updated)
            rows = (
                await conn.execute(
                    select(fhir_versions)
                    .where(and_(*conditions))
                    .order_by(fhir_versions.c.last_updated.desc(), fhir_versions.c.version.desc())
                    .limit(limit)
                )
            ).all()
        if resource_id is not None and not rows:
            raise NotFound("not found")
        result = []
        for row in rows:
            body = (
                None
                if row.deleted
                else await self._decrypt(
                    row.resource_type, row.id, row.version, row.scope, row.body
                )
            )
            result.append(
                StoredResource(
                    row.resource_type,
                    row.id,
                    row.version,
                    row.last_updated,
                    bool(row.deleted),
                    body,
                )
            )
        return result


def _current_versions() -> Any:
    """SELECT of the current version row of resources (the pointer joined to its version)."""
    return select(fhir_versions).join(
        fhir_resources,
        and_(
            fhir_resources.c.resource_type == fhir_versions.c.resource_type,
            fhir_resources.c.id == fhir_versions.c.id,
            fhir_resources.c.version == fhir_versions.c.version,
        ),
    )


# Built once: the hot reads skip building and cache-keying a statement per request.
_POINTER = select(
    fhir_resources.c.version,
    fhir_resources.c.deleted,
    fhir_resources.c.scope,
    fhir_resources.c.erased_at,
).where(
    and_(
        fhir_resources.c.resource_type == bindparam("resource_type"),
        fhir_resources.c.id == bindparam("id"),
    )
)
_CURRENT = _current_versions().where(
    and_(
        fhir_resources.c.resource_type == bindparam("resource_type"),
        fhir_resources.c.id == bindparam("id"),
    )
)
_CURRENT_IN = {  # one list parameter, whatever its length
    dialect: _current_versions().where(
        and_(
            fhir_resources.c.resource_type == bindparam("resource_type"),
            in_list(fhir_resources.c.id, "ids", dialect),
            fhir_resources.c.deleted.is_(False),
        )
    )
    for dialect in DIALECTS
}
_VERSION = select(fhir_versions).where(
    and_(
        fhir_versions.c.resource_type == bindparam("resource_type"),
        fhir_versions.c.id == bindparam("id"),
        fhir_versions.c.version == bindparam("version"),
    )
)


class _Retry(Exception):
    """Internal: the compare-and-swap lost; read again and retry."""
