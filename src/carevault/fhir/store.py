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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import and_, delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from carevault.crypto.blind_index import BlindIndex
from carevault.crypto.envelope import DecryptionFailed, EnvelopeCipher
from carevault.db.engine import read_connection, write_transaction
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
        return datetime.fromtimestamp(self.last_updated, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")


def instant(epoch: float) -> str:
    """A FHIR instant (UTC, millisecond precision)."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z")


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
    ) -> None:
        self._engine = engine
        self._envelope = envelope
        self._blind = blind_index
        self._compartment = compartment
        self._clock = clock

    # --- scope and indexing ---------------------------------------------------------------

    def _patients(self, body: dict[str, Any]) -> list[str]:
        if body["resourceType"] == "Patient":
            return [body["id"]]
        return sorted(self._compartment.patient_ids(body))

    @staticmethod
    def _scope(resource_type: str, patients: list[str]) -> str:
        # A resource of several patients (a Claim's payee, a shared CareTeam) is encrypted
        # under the first one's key, in sorted order so that it is stable across versions.
        return f"patient:{patients[0]}" if patients else f"type:{resource_type}"

    def _index_rows(self, body: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        resource_type, resource_id = body["resourceType"], body["id"]
        keys: dict[tuple[str, str], None] = {}
        dates: list[dict[str, Any]] = []
        for entry in extract_index(body):
            label = index_label(resource_type, entry.param)
            if entry.kind == "date" and not entry.phi:
                low, high = entry.values
                dates.append({"resource_type": resource_type, "id": resource_id,
                              "param": entry.param, "low": low, "high": high})
                continue
            if entry.phi:
                if entry.kind == "string":
                    hashes = [h for value in entry.values
                              for h in self._blind.prefixes(label, str(value))]
                else:
                    hashes = [self._blind.exact(label, key) for key in entry.keys]
                for value in hashes:
                    keys[(entry.param, value)] = None
            else:
                for key in entry.keys:
                    if len(key) > MAX_INDEX_KEY:  # never truncated: a prefix could match wrongly
                        key = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
                    keys[(entry.param, key)] = None
        key_rows = [{"resource_type": resource_type, "id": resource_id, "param": p, "key": k}
                    for p, k in keys]
        return key_rows, dates

    async def _replace_index(self, conn: AsyncConnection, body: dict[str, Any] | None,
                             resource_type: str, resource_id: str) -> None:
        for table in (fhir_index_keys, fhir_index_dates):
            await conn.execute(delete(table).where(and_(table.c.resource_type == resource_type,
                                                        table.c.id == resource_id)))
        if body is None:
            return
        key_rows, date_rows = self._index_rows(body)
        if key_rows:
            await conn.execute(insert(fhir_index_keys), key_rows)
        if date_rows:
            await conn.execute(insert(fhir_index_dates), date_rows)

    async def _replace_compartments(self, conn: AsyncConnection, resource_type: str,
                                    resource_id: str, patients: list[str]) -> None:
        await conn.execute(delete(fhir_compartments).where(and_(
            fhir_compartments.c.resource_type == resource_type,
            fhir_compartments.c.id == resource_id)))
        if patients:
            await conn.execute(insert(fhir_compartments), [
                {"resource_type": resource_type, "id": resource_id, "patient_id": p}
                for p in patients])

    # --- writes ---------------------------------------------------------------------------

    def _stamp(self, body: dict[str, Any], resource_id: str, version: int,
               now: float) -> dict[str, Any]:
        stamped = dict(body)
        stamped["id"] = resource_id
        meta = dict(stamped.get("meta") or {})
        meta["versionId"] = str(version)
        meta["lastUpdated"] = instant(now)
        stamped["meta"] = meta
        return stamped

    async def create(self, body: dict[str, Any]) -> StoredResource:
        """Store a validated resource under a new server-assigned id (any client id is ignored)."""
        stored, _ = await self._write(body["resourceType"], str(uuid.uuid4()), body,
                                      if_match=None, allow_create=True, must_create=True)
        return stored

    async def update(self, resource_type: str, resource_id: str, body: dict[str, Any], *,
                     if_match: int | None = None,
                     allow_create: bool = False) -> tuple[StoredResource, bool]:
        """Write a new version; return it and whether the resource was created."""
        return await self._write(resource_type, resource_id, body, if_match=if_match,
                                 allow_create=allow_create, must_create=False)

    async def delete(self, resource_type: str, resource_id: str) -> StoredResource:
        """Logical delete: a new, empty version; history keeps the earlier ones."""
        for _ in range(WRITE_ATTEMPTS):
            current = await self._current(resource_type, resource_id)
            if current is None:
                raise NotFound("not found")
            version, deleted, scope = current
            if deleted:
                return StoredResource(resource_type, resource_id, version, self._clock(), True,
                                      None)
            now = self._clock()
            async with write_transaction(self._engine) as conn:
                swapped = await conn.execute(
                    update(fhir_resources)
                    .where(and_(fhir_resources.c.resource_type == resource_type,
                                fhir_resources.c.id == resource_id,
                                fhir_resources.c.version == version))
                    .values(version=version + 1, last_updated=now, deleted=True))
                if swapped.rowcount != 1:
                    continue
                await conn.execute(insert(fhir_versions).values(
                    resource_type=resource_type, id=resource_id, version=version + 1,
                    last_updated=now, deleted=True, scope=scope, body=b""))
                await self._replace_index(conn, None, resource_type, resource_id)
            return StoredResource(resource_type, resource_id, version + 1, now, True, None)
        raise WriteContention("contention")

    async def _write(self, resource_type: str, resource_id: str, body: dict[str, Any], *,
                     if_match: int | None, allow_create: bool,
                     must_create: bool) -> tuple[StoredResource, bool]:
        for _ in range(WRITE_ATTEMPTS):
            current = None if must_create else await self._current(resource_type, resource_id)
            if current is None and not allow_create:
                raise NotFound("not found")
            version = current[0] if current else 0
            if if_match is not None and if_match != version:
                raise VersionConflict("version conflict")
            now = self._clock()
            stamped = self._stamp(body, resource_id, version + 1, now)
            patients = self._patients(stamped)
            scope = self._scope(resource_type, patients)
            ciphertext = await self._envelope.encrypt(
                scope, orjson.dumps(stamped), associated_data(resource_type, resource_id,
                                                              version + 1))
            try:
                async with write_transaction(self._engine) as conn:
                    if current is None:
                        await conn.execute(insert(fhir_resources).values(
                            resource_type=resource_type, id=resource_id, version=1,
                            last_updated=now, deleted=False, scope=scope))
                    else:
                        swapped = await conn.execute(
                            update(fhir_resources)
                            .where(and_(fhir_resources.c.resource_type == resource_type,
                                        fhir_resources.c.id == resource_id,
                                        fhir_resources.c.version == version))
                            .values(version=version + 1, last_updated=now, deleted=False,
                                    scope=scope))
                        if swapped.rowcount != 1:
                            raise _Retry
                    await conn.execute(insert(fhir_versions).values(
                        resource_type=resource_type, id=resource_id, version=version + 1,
                        last_updated=now, deleted=False, scope=scope, body=ciphertext))
                    await self._replace_compartments(conn, resource_type, resource_id, patients)
                    await self._replace_index(conn, stamped, resource_type, resource_id)
            except _Retry:
                continue
            except IntegrityError:
                if must_create:
                    raise
                continue  # someone created it between our read and our insert
            stored = StoredResource(resource_type, resource_id, version + 1, now, False, stamped)
            return stored, current is None
        raise WriteContention("contention")

    # --- reads ----------------------------------------------------------------------------

    async def _current(self, resource_type: str, resource_id: str) -> tuple[int, bool, str] | None:
        async with read_connection(self._engine) as conn:
            row = (await conn.execute(
                select(fhir_resources.c.version, fhir_resources.c.deleted, fhir_resources.c.scope)
                .where(and_(fhir_resources.c.resource_type == resource_type,
                            fhir_resources.c.id == resource_id)))).first()
        return (row.version, bool(row.deleted), row.scope) if row else None

    async def _decrypt(self, resource_type: str, resource_id: str, version: int, scope: str,
                       ciphertext: bytes) -> dict[str, Any]:
        try:
            plaintext = await self._envelope.decrypt(
                scope, ciphertext, associated_data(resource_type, resource_id, version))
            return orjson.loads(plaintext)
        except (DecryptionFailed, orjson.JSONDecodeError) as err:
            raise IntegrityFailure("integrity") from err

    async def read(self, resource_type: str, resource_id: str) -> StoredResource:
        async with read_connection(self._engine) as conn:
            row = (await conn.execute(
                select(fhir_versions)
                .join(fhir_resources, and_(
                    fhir_resources.c.resource_type == fhir_versions.c.resource_type,
                    fhir_resources.c.id == fhir_versions.c.id,
                    fhir_resources.c.version == fhir_versions.c.version))
                .where(and_(fhir_resources.c.resource_type == resource_type,
                            fhir_resources.c.id == resource_id)))).first()
        return await self._materialise(row)

    async def vread(self, resource_type: str, resource_id: str, version: int) -> StoredResource:
        async with read_connection(self._engine) as conn:
            row = (await conn.execute(
                select(fhir_versions).where(and_(
                    fhir_versions.c.resource_type == resource_type,
                    fhir_versions.c.id == resource_id,
                    fhir_versions.c.version == version)))).first()
        return await self._materialise(row)

    async def _materialise(self, row: Any) -> StoredResource:
        if row is None:
            raise NotFound("not found")
        if row.deleted:
            raise Gone(row.version, row.last_updated)
        body = await self._decrypt(row.resource_type, row.id, row.version, row.scope, row.body)
        return StoredResource(row.resource_type, row.id, row.version, row.last_updated, False,
                              body)

    async def history(self, resource_type: str, resource_id: str | None = None, *,
                      limit: int = 100) -> list[StoredResource]:
        """Versions, newest first: of one resource, or of every resource of the type."""
        conditions = [fhir_versions.c.resource_type == resource_type]
        if resource_id is not None:
            conditions.append(fhir_versions.c.id == resource_id)
        async with read_connection(self._engine) as conn:
            rows = (await conn.execute(
                select(fhir_versions).where(and_(*conditions))
                .order_by(fhir_versions.c.last_updated.desc(), fhir_versions.c.version.desc())
                .limit(limit))).all()
        if resource_id is not None and not rows:
            raise NotFound("not found")
        result = []
        for row in rows:
            body = None if row.deleted else await self._decrypt(
                row.resource_type, row.id, row.version, row.scope, row.body)
            result.append(StoredResource(row.resource_type, row.id, row.version,
                                         row.last_updated, bool(row.deleted), body))
        return result


class _Retry(Exception):
    """Internal: the compare-and-swap lost; read again and retry."""
