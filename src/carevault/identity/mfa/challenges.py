"""Single-use, short-lived proofs between two requests: the `mfa_token` that carries a login
from the password to the second factor, and the challenges of WebAuthn ceremonies.

The value handed out is 256 random bits and only its SHA-256 is stored, so a database reader
cannot finish someone's login. `consume` marks a challenge used in the same statement that
checks it is unused and unexpired: of two requests racing with one token, one wins.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from carevault.db.engine import read_connection, write_transaction
from carevault.db.tables import mfa_challenges

TOKEN_BYTES = 32
MAX_TOKEN_CHARS = 64


class ChallengeInvalid(Exception):
    """Unknown, expired, already used, or for another purpose: deliberately one error."""


@dataclass(frozen=True)
class Challenge:
    id_hash: str
    purpose: str
    user_id: str
    bound_to: str | None
    challenge: bytes | None
    expires_at: float


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ChallengeStore:
    def __init__(self, engine: AsyncEngine, clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._clock = clock

    async def issue(
        self,
        purpose: str,
        user_id: str,
        ttl: float,
        *,
        bound_to: str | None = None,
        challenge: bytes | None = None,
    ) -> str:
        """A new single-use token for `purpose`; returns the value to hand out."""
        token = secrets.token_urlsafe(TOKEN_BYTES)
        now = self._clock()
        async with write_transaction(self._engine) as conn:
            # Expired rows go as new ones arrive: the table holds minutes of attempts.
            await conn.execute(delete(mfa_challenges).where(mfa_challenges.c.expires_at < now - 60))
            await conn.execute(
                insert(mfa_challenges).values(
                    id_hash=token_hash(token),
                    purpose=purpose,
                    user_id=user_id,
                    bound_to=bound_to,
                    challenge=challenge,
                    created_at=now,
                    expires_at=now + ttl,
                )
            )
        return token

    async def peek(self, token: str, purpose: str) -> Challenge:
        """The live challenge behind `token`, without using it up (a WebAuthn login's options
        are asked for with the mfa_token that the assertion will then consume)."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            raise ChallengeInvalid
        return await self.peek_hash(token_hash(token), purpose)

    async def peek_hash(self, id_hash: str, purpose: str) -> Challenge:
        """As `peek`, by the stored hash (a browser session keeps only the hash of its login
        attempt's token)."""
        async with read_connection(self._engine) as conn:
            row = (
                await conn.execute(
                    select(mfa_challenges).where(mfa_challenges.c.id_hash == id_hash)
                )
            ).first()
        if (
            row is None
            or row.purpose != purpose
            or row.used_at is not None
            or row.expires_at <= self._clock()
        ):
            raise ChallengeInvalid
        return _challenge(row)

    async def consume(self, token: str, purpose: str) -> Challenge:
        """Use the challenge up and return it, or raise `ChallengeInvalid`."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            raise ChallengeInvalid
        return await self.consume_hash(token_hash(token), purpose)

    async def consume_hash(self, id_hash: str, purpose: str) -> Challenge:
        now = self._clock()
        async with write_transaction(self._engine) as conn:
            used = await conn.execute(
                update(mfa_challenges)
                .where(
                    mfa_challenges.c.id_hash == id_hash,
                    mfa_challenges.c.purpose == purpose,
                    mfa_challenges.c.used_at.is_(None),
                    mfa_challenges.c.expires_at > now,
                )
                .values(used_at=now)
            )
            if used.rowcount != 1:
                raise ChallengeInvalid
            row = (
                await conn.execute(
                    select(mfa_challenges).where(mfa_challenges.c.id_hash == id_hash)
                )
            ).one()
        return _challenge(row)

    async def consume_bound(self, purpose: str, bound_to: str) -> Challenge:
        """Use up the newest live challenge of `purpose` issued for `bound_to` (a WebAuthn
        challenge: the client returns the challenge bytes, not a token, so it is found by what
        it was issued for; the caller compares the bytes)."""
        now = self._clock()
        async with read_connection(self._engine) as conn:
            row = (
                await conn.execute(
                    select(mfa_challenges.c.id_hash)
                    .where(
                        mfa_challenges.c.purpose == purpose,
                        mfa_challenges.c.bound_to == bound_to,
                        mfa_challenges.c.used_at.is_(None),
                        mfa_challenges.c.expires_at > now,
                    )
                    .order_by(mfa_challenges.c.created_at.desc())
                    .limit(1)
                )
            ).first()
        if row is None:
            raise ChallengeInvalid
        return await self.consume_hash(row.id_hash, purpose)

    async def revoke_user(self, user_id: str) -> None:
        """Void every open challenge of a user (factors reset, account disabled)."""
        async with write_transaction(self._engine) as conn:
            await conn.execute(
                update(mfa_challenges)
                .where(mfa_challenges.c.user_id == user_id, mfa_challenges.c.used_at.is_(None))
                .values(used_at=self._clock())
            )


def _challenge(row: object) -> Challenge:
    return Challenge(
        id_hash=row.id_hash,  # type: ignore[attr-defined]
        purpose=row.purpose,  # type: ignore[attr-defined]
        user_id=row.user_id,  # type: ignore[attr-defined]
        bound_to=row.bound_to,  # type: ignore[attr-defined]
        challenge=row.challenge,  # type: ignore[attr-defined]
        expires_at=row.expires_at,  # type: ignore[attr-defined]
    )
