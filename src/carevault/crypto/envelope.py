"""Envelope encryption of data at rest: one data key (DEK) per scope, wrapped by the KEK.

A scope is a short string such as ``"patient:<fhir id>"`` or ``"type:Organization"``. Its DEK is
a tink AES256_GCM keyset, created on first use and stored in the key vault's `data_keys` (a
database apart from the ciphertexts: `Settings.key_database_url`) wrapped by the KEK
(`custody.py`) with tink's encrypted keyset format; the wrapping's associated data is
``b"carevault-dek:" + scope``, so a wrapped DEK copied into another scope's row does not unwrap.
Ciphertexts are tink AEAD output (key-id prefix, nonce, ciphertext, tag); the caller's
associated data (resource type, id, version) keeps a ciphertext from being moved between rows.

Destroying a scope (crypto-shredding) empties its wrapped DEK for good: every ciphertext of the
scope becomes unreadable, wherever a copy of it is, and the scope cannot be encrypted to again.

Decrypted DEKs are cached per process (LRU, bounded, absolute TTL). A destroy evicts at once in
its own process and, through a memory-mapped change counter in the data directory, in every
other process of the host on its next call; processes on other hosts (PostgreSQL deployments)
keep a cached DEK for at most `dek_cache_ttl_seconds`.

KEK rotation: `KeyCustody.rotate_kek` adds a new primary, `rewrap_all` re-wraps every DEK not yet
under it (resumable: progress is `kek_key_id`), and `retire_unused_kek_keys` drops the old keys
once nothing is wrapped under them. The DEKs themselves do not change, so ciphertexts and other
processes' cached DEKs stay valid throughout.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import tink
from google.protobuf.message import DecodeError
from sqlalchemy import and_, bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine
from tink import aead

from carevault.crypto.custody import KekState, KeyCustody
from carevault.db.engine import read_connection, write_transaction
from carevault.db.key_reads import read_by_key
from carevault.db.tables import data_keys
from carevault.tokens.signal import ChangeSignal

DEK_TEMPLATE = aead.aead_key_templates.AES256_GCM
_KEY_ROW = select(data_keys.c.wrapped, data_keys.c.kek_key_id, data_keys.c.destroyed_at).where(
    data_keys.c.scope == bindparam("scope")
)
DEK_AD_PREFIX = b"carevault-dek:"
MAX_SCOPE_LENGTH = 100  # data_keys.scope is String(100)
TOMBSTONE_KEK_ID = 0  # kek_key_id of a scope destroyed before it ever had a DEK


class EnvelopeError(Exception):
    """Base class of this module's errors. Messages never hold key material or plaintext."""


class InvalidScope(EnvelopeError, ValueError):
    """A scope that is empty, too long, or not printable ASCII."""


class DecryptionFailed(EnvelopeError):
    """The data cannot be decrypted: tampered, wrong associated data, wrong or missing key."""


class KeyDestroyed(DecryptionFailed):
    """The scope's data key was destroyed; its data is gone (also raised by `encrypt`)."""


@dataclass(frozen=True)
class RewrapProgress:
    """Where a `rewrap_all` run stands. `total` is how many DEKs needed re-wrapping when the run
    started; `remaining` is exact in the final report and an estimate after each batch."""

    primary_key_id: int
    total: int
    processed: int
    rewrapped: int
    remaining: int
    failed: tuple[str, ...] = ()  # scopes whose DEK no key of the KEK unwraps


class _DekCache:
    """LRU with an absolute TTL: an entry lives `ttl` seconds from load, however often used, so
    the TTL bounds how long another host's destroy can go unnoticed."""

    def __init__(self, size: int, ttl: float) -> None:
        self._size = size
        self._ttl = ttl
        self._entries: OrderedDict[str, tuple[float, aead.Aead]] = OrderedDict()

    def get(self, scope: str, now: float) -> aead.Aead | None:
        entry = self._entries.get(scope)
        if entry is None:
            return None
        if now >= entry[0]:
            self._entries.pop(scope, None)
            return None
        self._entries.move_to_end(scope)
        return entry[1]

    def put(self, scope: str, dek: aead.Aead, now: float) -> None:
        if self._size <= 0 or self._ttl <= 0:
            return
        self._entries[scope] = (now + self._ttl, dek)
        self._entries.move_to_end(scope)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def evict(self, scope: str) -> None:
        self._entries.pop(scope, None)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)


class EnvelopeCipher:
    """Encrypts and decrypts bytes under per-scope DEKs. Use from one event loop per process."""

    def __init__(
        self,
        vault: AsyncEngine,
        custody: KeyCustody,
        *,
        cache_size: int = 10000,
        cache_ttl_seconds: float = 300.0,
        signal: ChangeSignal | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._engine = vault
        self._custody = custody
        self._cache = _DekCache(cache_size, cache_ttl_seconds)
        self._signal = signal
        self._generation = signal.read() if signal is not None else 0
        self._clock = clock  # timestamps stored in the table
        self._monotonic = monotonic  # cache expiry: immune to wall-clock jumps

    # -- public API ---------------------------------------------------------------------------

    async def encrypt(self, scope: str, plaintext: bytes, associated_data: bytes) -> bytes:
        """Encrypt under the scope's DEK (created on first use, race-safe across processes)."""
        dek = await self._dek(scope, create=True)
        return self._aead_encrypt(dek, plaintext, associated_data)

    async def decrypt(self, scope: str, ciphertext: bytes, associated_data: bytes) -> bytes:
        """Decrypt, or raise `DecryptionFailed` (`KeyDestroyed` once the scope is destroyed)."""
        dek = await self._dek(scope, create=False)
        return self._aead_decrypt(dek, ciphertext, associated_data)

    async def destroy(self, scope: str) -> None:
        """Crypto-shred the scope: its wrapped DEK is overwritten with nothing, for good.

        Also works for a scope that never had a DEK (a tombstone stops it getting one). On an
        SQLite vault the old bytes are zeroed in the file (`secure_delete`) and the write-ahead
        log is checkpointed and truncated, so no copy of the wrapped DEK stays in the vault's
        files; a PostgreSQL vault keeps the old row version until VACUUM. Copies of the vault
        itself taken before the destroy (its backups) still hold the wrapped DEK: they open
        only with a KEK key that wrapped them, so rotating the KEK (which drops old keys) after
        such copies expire completes the shredding.
        """
        _check_scope(scope)
        now = self._clock()
        stmt = self._insert(
            scope=scope,
            wrapped=b"",
            kek_key_id=TOMBSTONE_KEK_ID,
            created_at=now,
            destroyed_at=now,
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["scope"],
            set_={
                "wrapped": b"",
                "destroyed_at": func.coalesce(data_keys.c.destroyed_at, stmt.excluded.destroyed_at),
            },
        )
        async with write_transaction(self._engine) as conn:
            await conn.execute(stmt)
        if self._engine.dialect.name == "sqlite":
            async with read_connection(self._engine) as conn:
                await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        self._cache.evict(scope)
        if self._signal is not None:
            self._signal.bump()  # other processes on this host drop their caches

    async def is_destroyed(self, scope: str) -> bool:
        return await self.key_state(scope) == "destroyed"

    async def key_state(self, scope: str) -> str:
        """``"absent"`` (no DEK yet), ``"live"`` or ``"destroyed"``."""
        _check_scope(scope)
        row = await self._load_row(scope)
        if row is None:
            return "absent"
        return "live" if row.destroyed_at is None else "destroyed"

    async def kek_usage(self) -> dict[int, int]:
        """Live (not destroyed) DEKs per KEK key id that wraps them."""
        async with read_connection(self._engine) as conn:
            rows = await conn.execute(
                select(data_keys.c.kek_key_id, func.count())
                .where(data_keys.c.destroyed_at.is_(None))
                .group_by(data_keys.c.kek_key_id)
            )
            return {int(key_id): int(count) for key_id, count in rows}

    async def rewrap_all(
        self,
        batch_size: int = 500,
        progress: Callable[[RewrapProgress], None] | None = None,
    ) -> RewrapProgress:
        """Re-wrap every live DEK not yet under the KEK's current primary.

        Works in batches (one read, then one short write transaction per batch); `progress` is
        called after each. Resumable: an interrupted run (even one stopped by `progress`
        raising) is continued by running again, since what is left is exactly the rows whose
        `kek_key_id` is not the primary. Safe beside live traffic: a row is updated only if
        it still holds what was read (compare-and-set), so a concurrent destroy wins.
        """
        return await self._rewrap(batch_size, progress, unwrap_with=None)

    async def retire_unused_kek_keys(self, batch_size: int = 500) -> list[int]:
        """Drop every non-primary KEK key that no live DEK is wrapped under; return their ids."""
        before = self._custody.current_kek()
        usage = await self.kek_usage()
        unused = [
            key_id
            for key_id in before.key_ids
            if key_id != before.primary_id and usage.get(key_id, 0) == 0
        ]
        if not unused:
            return []
        dropped = self._custody.drop_kek_keys(unused)
        # A process that read kek.json before the rotation could have wrapped a new DEK under
        # an old key after the count above; `before` still holds those keys, so sweep once more.
        await self._rewrap(batch_size, None, unwrap_with=before)
        return dropped

    def cached_scopes(self) -> int:
        return len(self._cache)

    def close(self) -> None:
        if self._signal is not None:
            self._signal.close()

    # -- per-call pieces (kept apart so a benchmark can time them separately) ----------------

    async def _dek(self, scope: str, *, create: bool) -> aead.Aead:
        """The scope's DEK primitive: from the cache, else read and unwrapped (or created)."""
        _check_scope(scope)
        generation = self._signal.read() if self._signal is not None else 0
        if generation != self._generation:
            self._cache.clear()  # some process destroyed a scope: forget everything cached
            self._generation = generation
        now = self._monotonic()
        cached = self._cache.get(scope, now)
        if cached is not None:
            return cached
        row = await self._load_row(scope)
        if row is None:
            if not create:
                raise DecryptionFailed("no data key for this scope")
            dek = await self._create(scope)
        else:
            if row.destroyed_at is not None:
                raise KeyDestroyed("the data key of this scope was destroyed")
            dek = self._unwrap(scope, row.wrapped, row.kek_key_id).primitive(aead.Aead)
        # Cache only if no destroy was signalled while we read: else we might cache a DEK that
        # was destroyed between our read and now.
        if self._signal is None or self._signal.read() == generation:
            self._cache.put(scope, dek, now)
        return dek

    @staticmethod
    def _aead_encrypt(dek: aead.Aead, plaintext: bytes, associated_data: bytes) -> bytes:
        return dek.encrypt(plaintext, associated_data)

    @staticmethod
    def _aead_decrypt(dek: aead.Aead, ciphertext: bytes, associated_data: bytes) -> bytes:
        try:
            return dek.decrypt(ciphertext, associated_data)
        except tink.TinkError:
            raise DecryptionFailed("ciphertext failed authentication") from None

    def _unwrap(
        self, scope: str, wrapped: bytes, kek_key_id: int, unwrap_with: KekState | None = None
    ) -> tink.KeysetHandle:
        """The DEK keyset from its wrapped form (tink's encrypted keyset format)."""
        kek = unwrap_with or self._custody.kek()
        if kek_key_id not in kek.key_ids:
            kek = self._custody.current_kek()  # wrapped after a rotation we have not loaded
        try:
            return _parse_wrapped(wrapped, kek, scope)
        except DecryptionFailed:
            fresh = self._custody.current_kek()
            if fresh is kek:
                raise
            return _parse_wrapped(wrapped, fresh, scope)

    # -- internals ---------------------------------------------------------------------------

    async def _load_row(self, scope: str) -> Any:
        rows = await read_by_key(self._engine, _KEY_ROW, {"scope": scope})
        return rows[0] if rows else None

    async def _create(self, scope: str) -> aead.Aead:
        handle = tink.new_keyset_handle(DEK_TEMPLATE)
        kek = self._custody.current_kek()
        wrapped = _wrap(handle, kek, scope)
        # Insert-if-absent, then read back the winner: two processes creating the same scope's
        # DEK at once both end up using the one that was stored.
        async with write_transaction(self._engine) as conn:
            await conn.execute(
                self._insert(
                    scope=scope,
                    wrapped=wrapped,
                    kek_key_id=kek.primary_id,
                    created_at=self._clock(),
                    destroyed_at=None,
                ).on_conflict_do_nothing(index_elements=["scope"])
            )
            row = (
                await conn.execute(
                    select(
                        data_keys.c.wrapped, data_keys.c.kek_key_id, data_keys.c.destroyed_at
                    ).where(data_keys.c.scope == scope)
                )
            ).one()
        if row.destroyed_at is not None:
            raise KeyDestroyed("the data key of this scope was destroyed")
        if bytes(row.wrapped) != wrapped:
            return self._unwrap(scope, row.wrapped, row.kek_key_id).primitive(aead.Aead)
        await self._rewrap_if_rotated(scope, handle, wrapped, kek)
        return handle.primitive(aead.Aead)

    async def _rewrap_if_rotated(
        self, scope: str, handle: tink.KeysetHandle, wrapped: bytes, used: KekState
    ) -> None:
        """If the KEK rotated while we created this DEK, move it to the new primary ourselves:
        the rotation may already have counted (and be about to drop) the key we used."""
        current = self._custody.current_kek()
        if current.primary_id == used.primary_id:
            return
        async with write_transaction(self._engine) as conn:
            await conn.execute(
                update(data_keys)
                .where(
                    and_(
                        data_keys.c.scope == scope,
                        data_keys.c.wrapped == wrapped,
                        data_keys.c.destroyed_at.is_(None),
                    )
                )
                .values(wrapped=_wrap(handle, current, scope), kek_key_id=current.primary_id)
            )

    async def _rewrap(
        self,
        batch_size: int,
        progress: Callable[[RewrapProgress], None] | None,
        unwrap_with: KekState | None,
    ) -> RewrapProgress:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        kek = self._custody.current_kek()
        primary = kek.primary_id
        total = await self._count_pending(primary)
        processed = rewrapped = 0
        failed: list[str] = []
        after = ""  # keyset pagination: rows that fail to unwrap are not read again
        while True:
            async with read_connection(self._engine) as conn:
                rows = (
                    await conn.execute(
                        select(data_keys.c.scope, data_keys.c.wrapped, data_keys.c.kek_key_id)
                        .where(
                            and_(
                                data_keys.c.destroyed_at.is_(None),
                                data_keys.c.kek_key_id != primary,
                                data_keys.c.scope > after,
                            )
                        )
                        .order_by(data_keys.c.scope)
                        .limit(batch_size)
                    )
                ).all()
            if not rows:
                break
            changes: list[tuple[str, bytes, bytes]] = []
            for row in rows:
                try:
                    handle = self._unwrap(row.scope, row.wrapped, row.kek_key_id, unwrap_with)
                except DecryptionFailed:
                    failed.append(row.scope)
                    continue
                changes.append((row.scope, bytes(row.wrapped), _wrap(handle, kek, row.scope)))
            if changes:
                async with write_transaction(self._engine) as conn:
                    for scope, old, new in changes:
                        result = await conn.execute(
                            update(data_keys)
                            .where(
                                and_(
                                    data_keys.c.scope == scope,
                                    data_keys.c.wrapped == old,
                                    data_keys.c.destroyed_at.is_(None),
                                )
                            )
                            .values(wrapped=new, kek_key_id=primary)
                        )
                        rewrapped += result.rowcount
            processed += len(rows)
            after = rows[-1].scope
            if progress is not None:
                progress(
                    RewrapProgress(
                        primary,
                        total,
                        processed,
                        rewrapped,
                        max(total - processed, 0),
                        tuple(failed),
                    )
                )
        remaining = await self._count_pending(primary)
        return RewrapProgress(primary, total, processed, rewrapped, remaining, tuple(failed))

    async def _count_pending(self, primary: int) -> int:
        async with read_connection(self._engine) as conn:
            return int(
                (
                    await conn.execute(
                        select(func.count())
                        .select_from(data_keys)
                        .where(
                            and_(
                                data_keys.c.destroyed_at.is_(None),
                                data_keys.c.kek_key_id != primary,
                            )
                        )
                    )
                ).scalar_one()
            )

    def _insert(self, **values: Any) -> Any:
        if self._engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        return insert(data_keys).values(**values)


def _check_scope(scope: str) -> None:
    if (
        not isinstance(scope, str)
        or not 0 < len(scope) <= MAX_SCOPE_LENGTH
        or not all("!" <= ch <= "~" for ch in scope)
    ):
        raise InvalidScope(
            f"a scope is 1-{MAX_SCOPE_LENGTH} printable ASCII characters without spaces"
        )


def _dek_ad(scope: str) -> bytes:
    return DEK_AD_PREFIX + scope.encode()


def _wrap(handle: tink.KeysetHandle, kek: KekState, scope: str) -> bytes:
    return tink.proto_keyset_format.serialize_encrypted(handle, kek.aead, _dek_ad(scope))


def _parse_wrapped(wrapped: bytes, kek: KekState, scope: str) -> tink.KeysetHandle:
    try:
        return tink.proto_keyset_format.parse_encrypted(bytes(wrapped), kek.aead, _dek_ad(scope))
    except (tink.TinkError, DecodeError, ValueError):
        raise DecryptionFailed("the data key could not be unwrapped") from None
