"""Refresh tokens: opaque, single use, rotated, grouped in families (one family per login).

A token is 256 random bits; only its SHA-256 is stored. Rotation marks the presented token used
and issues its successor in one transaction, guarded by `used_at IS NULL`, so two workers racing
on one token cannot both rotate it. Presenting a used token again is theft (OAuth 2.0 Security
BCP, RFC 9700 §4.14.2): the whole family is revoked, and only that family.

Grace window: a retry of the same token by the same client within `refresh_grace_seconds` of
its first use gets the *same* successor instead of a reuse alarm, so two browser tabs refreshing
together do not log the user out. The successor is HMAC(instance key, presented token): it can
be derived again from the presented token, so nothing is ever stored in the clear. With the
window at 0 every second presentation is reuse, however close together (Keycloak #50999 compared
whole seconds and let a same-second replay through; `used_at` here is a float).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, bindparam, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from carevault.config import Settings
from carevault.crypto.instance_secrets import InstanceSecrets
from carevault.db.engine import write_transaction
from carevault.db.key_writes import write_by_key
from carevault.db.tables import refresh_families, refresh_tokens

TOKEN_BYTES = 32  # 256 bits
MAX_TOKEN_CHARS = 128


class RefreshError(Exception):
    """The refresh token is not usable. `reuse` says a used token came back (family revoked)."""

    def __init__(
        self,
        reason: str,
        *,
        family_id: str | None = None,
        user_id: str | None = None,
        reuse: bool = False,
    ) -> None:
        self.reason = reason
        self.family_id = family_id
        self.user_id = user_id
        self.reuse = reuse
        super().__init__(reason)


@dataclass(frozen=True)
class Family:
    id: str
    user_id: str
    client_id: str
    scope: str
    amr: list[str]
    auth_time: int
    expires_at: float
    acr: str | None = None
    patient: str | None = None  # the SMART launch patient of an OAuth grant
    dpop_jkt: str | None = None  # a public client's DPoP key: its refreshes must prove it


@dataclass(frozen=True)
class Rotation:
    family: Family
    refresh_token: str
    replayed_in_grace: bool


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


# A login's new family and its first token: prebuilt, for `write_by_key`.
_NEW_FAMILY = insert(refresh_families).values(
    id=bindparam("family_id"),
    user_id=bindparam("family_user"),
    client_id=bindparam("family_client"),
    scope=bindparam("family_scope"),
    amr=bindparam("family_amr"),
    auth_time=bindparam("family_auth_time"),
    created_at=bindparam("now"),
    expires_at=bindparam("family_expires_at"),
    acr=bindparam("family_acr"),
    address=bindparam("family_address"),
    device=bindparam("family_device"),
    last_used_at=bindparam("now"),
    patient=bindparam("family_patient"),
    dpop_jkt=bindparam("family_dpop_jkt"),
)
_NEW_TOKEN = insert(refresh_tokens).values(
    token_hash=bindparam("new_token_hash"),
    family_id=bindparam("family_id"),
    issued_at=bindparam("now"),
    idle_expires_at=bindparam("token_idle_expires_at"),
)


class RefreshTokenService:
    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        instance_secrets: InstanceSecrets,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._successor_key = instance_secrets.refresh_successor
        self._clock = clock

    def _successor(self, token: str) -> str:
        digest = hmac.new(self._successor_key, token.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    async def start_family(
        self,
        *,
        user_id: str,
        client_id: str,
        scope: str,
        amr: list[str],
        auth_time: int,
        acr: str | None = None,
        address: str | None = None,
        device: str | None = None,
        patient: str | None = None,
        dpop_jkt: str | None = None,
        family_id: str | None = None,
    ) -> tuple[Family, str]:
        now = self._clock()
        family = Family(
            id=family_id or str(uuid.uuid4()),
            user_id=user_id,
            client_id=client_id,
            scope=scope,
            amr=amr,
            auth_time=auth_time,
            expires_at=now + self._settings.refresh_absolute_ttl_seconds,
            acr=acr,
            patient=patient,
            dpop_jkt=dpop_jkt,
        )
        token = secrets.token_urlsafe(TOKEN_BYTES)
        async with write_by_key(self._engine) as writes:
            await writes.count(
                _NEW_FAMILY,
                {
                    "family_id": family.id,
                    "family_user": user_id,
                    "family_client": client_id,
                    "family_scope": scope,
                    "family_amr": amr,
                    "family_auth_time": auth_time,
                    "now": now,
                    "family_expires_at": family.expires_at,
                    "family_acr": acr,
                    "family_address": address,
                    "family_device": device,
                    "family_patient": patient,
                    "family_dpop_jkt": dpop_jkt,
                },
            )
            await writes.count(
                _NEW_TOKEN,
                {
                    "new_token_hash": hash_token(token),
                    "family_id": family.id,
                    "now": now,
                    "token_idle_expires_at": min(
                        now + self._settings.refresh_idle_ttl_seconds, family.expires_at
                    ),
                },
            )
        return family, token

    async def rotate(self, token: str, client_id: str) -> Rotation:
        """Exchange `token` for its successor, or raise `RefreshError`."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            raise RefreshError("malformed")
        presented = hash_token(token)
        successor = self._successor(token)
        successor_hash = hash_token(successor)
        reuse: RefreshError | None = None
        async with write_transaction(self._engine) as conn:
            row = (
                (
                    await conn.execute(
                        select(refresh_tokens, refresh_families)
                        .join(refresh_families, refresh_families.c.id == refresh_tokens.c.family_id)
                        .where(refresh_tokens.c.token_hash == presented)
                    )
                )
                .mappings()
                .first()
            )
            # Read the clock after the read: a use committed before it is never in our future.
            now = self._clock()
            family = _live_family(row, client_id, now)

            used_at = row["used_at"]
            if used_at is None:
                if now >= row["idle_expires_at"]:
                    raise RefreshError("idle", family_id=family.id, user_id=family.user_id)
                claimed = await conn.execute(
                    update(refresh_tokens)
                    .where(
                        and_(
                            refresh_tokens.c.token_hash == presented,
                            refresh_tokens.c.used_at.is_(None),
                        )
                    )
                    .values(used_at=now, successor_hash=successor_hash)
                )
                if claimed.rowcount == 1:
                    await conn.execute(
                        update(refresh_families)
                        .where(refresh_families.c.id == family.id)
                        .values(last_used_at=now)
                    )
                    await conn.execute(
                        insert(refresh_tokens).values(
                            token_hash=successor_hash,
                            family_id=family.id,
                            issued_at=now,
                            idle_expires_at=min(
                                now + self._settings.refresh_idle_ttl_seconds, family.expires_at
                            ),
                        )
                    )
                    return Rotation(family, successor, replayed_in_grace=False)
                # Another worker rotated it between our read and our update: read its result.
                used_at = (
                    await conn.execute(
                        select(refresh_tokens.c.used_at).where(
                            refresh_tokens.c.token_hash == presented
                        )
                    )
                ).scalar_one()
                # PostgreSQL: the winner's `now` can be later than ours (we read the row before
                # it committed), so look at the clock again.
                now = self._clock()

            grace = self._settings.refresh_grace_seconds
            # abs(): another host's clock may run a little ahead of ours.
            if (
                grace > 0
                and abs(now - used_at) <= grace
                and row["successor_hash"]
                in (
                    None,
                    successor_hash,
                )
            ):
                return Rotation(family, successor, replayed_in_grace=True)

            await conn.execute(
                update(refresh_families)
                .where(refresh_families.c.id == family.id)
                .values(revoked_at=now, revoked_reason="reuse")
            )
            reuse = RefreshError("reuse", family_id=family.id, user_id=family.user_id, reuse=True)
        raise reuse

    async def peek(self, token: str, client_id: str) -> Family:
        """The family of a refresh token that `rotate` would accept now, changing nothing (so a
        request refused for another reason does not burn the token); raises `RefreshError`."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            raise RefreshError("malformed")
        async with self._engine.connect() as conn:
            row = (
                (
                    await conn.execute(
                        select(refresh_tokens, refresh_families)
                        .join(refresh_families, refresh_families.c.id == refresh_tokens.c.family_id)
                        .where(refresh_tokens.c.token_hash == hash_token(token))
                    )
                )
                .mappings()
                .first()
            )
        now = self._clock()
        family = _live_family(row, client_id, now)
        if row["used_at"] is None and now >= row["idle_expires_at"]:
            raise RefreshError("idle", family_id=family.id, user_id=family.user_id)
        return family

    async def lookup(self, token: str) -> tuple[Family, bool] | None:
        """The family of any refresh token this server issued, and whether the token could be
        used now (for revocation and introspection); None for an unknown token."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            return None
        async with self._engine.connect() as conn:
            row = (
                (
                    await conn.execute(
                        select(refresh_tokens, refresh_families)
                        .join(refresh_families, refresh_families.c.id == refresh_tokens.c.family_id)
                        .where(refresh_tokens.c.token_hash == hash_token(token))
                    )
                )
                .mappings()
                .first()
            )
        if row is None:
            return None
        try:
            family = _live_family(row, row["client_id"], self._clock())
        except RefreshError:
            return _family(row), False
        active = row["used_at"] is None and self._clock() < row["idle_expires_at"]
        return family, active

    async def revoke_family(self, family_id: str, reason: str) -> None:
        async with write_transaction(self._engine) as conn:
            await conn.execute(
                update(refresh_families)
                .where(
                    and_(
                        refresh_families.c.id == family_id, refresh_families.c.revoked_at.is_(None)
                    )
                )
                .values(revoked_at=self._clock(), revoked_reason=reason)
            )

    async def revoke_user_families(
        self, user_id: str, reason: str, client_id: str | None = None
    ) -> list[str]:
        """Revoke every live family of a user (of one client only, when given); return their
        ids (the access tokens' `sid`)."""
        where = [refresh_families.c.user_id == user_id, refresh_families.c.revoked_at.is_(None)]
        if client_id is not None:
            where.append(refresh_families.c.client_id == client_id)
        # One statement: on PostgreSQL (READ COMMITTED) an UPDATE by ids read a moment before
        # would overwrite a revocation committed in between (a reuse's time and reason, the
        # evidence of a theft); this one checks `revoked_at IS NULL` again on each row it waits
        # for.
        async with write_transaction(self._engine) as conn:
            return list(
                (
                    await conn.execute(
                        update(refresh_families)
                        .where(and_(*where))
                        .values(revoked_at=self._clock(), revoked_reason=reason)
                        .returning(refresh_families.c.id)
                    )
                ).scalars()
            )

    async def unexpired_families(self, user_id: str, client_id: str) -> list[str]:
        """The ids of a user's families with one client that have not reached their absolute
        lifetime, revoked or not (denying their access tokens again is harmless)."""
        async with self._engine.connect() as conn:
            return list(
                (
                    await conn.execute(
                        select(refresh_families.c.id).where(
                            and_(
                                refresh_families.c.user_id == user_id,
                                refresh_families.c.client_id == client_id,
                                refresh_families.c.expires_at > self._clock(),
                            )
                        )
                    )
                ).scalars()
            )

    async def family_of(self, token: str) -> str | None:
        async with self._engine.connect() as conn:
            return (
                await conn.execute(
                    select(refresh_tokens.c.family_id).where(
                        refresh_tokens.c.token_hash == hash_token(token)
                    )
                )
            ).scalar_one_or_none()


def _live_family(row: Any, client_id: str, now: float) -> Family:
    """The family of a token row, or `RefreshError` when it is unknown, revoked, another
    client's, or past its absolute lifetime."""
    if row is None:
        raise RefreshError("unknown")
    family = _family(row)
    if row["revoked_at"] is not None:
        raise RefreshError("family revoked", family_id=family.id, user_id=family.user_id)
    if not hmac.compare_digest(family.client_id, client_id):
        raise RefreshError("wrong client", family_id=family.id, user_id=family.user_id)
    if now >= family.expires_at:
        raise RefreshError("expired", family_id=family.id, user_id=family.user_id)
    return family


def _family(row: Any) -> Family:
    return Family(
        id=row["family_id"],
        user_id=row["user_id"],
        client_id=row["client_id"],
        scope=row["scope"],
        amr=list(row["amr"]),
        auth_time=row["auth_time"],
        expires_at=row["expires_at"],
        acr=row["acr"],
        patient=row["patient"],
        dpop_jkt=row["dpop_jkt"],
    )
