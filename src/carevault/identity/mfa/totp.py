"""TOTP factors (RFC 6238 through pyotp: SHA-1, 6 digits, 30-second steps).

The shared secret exists in the database only as AEAD ciphertext (the envelope cipher, data
key scope `mfa:<user id>`, the factor id as associated data, so a ciphertext moved to another
row or user does not decrypt). A code is accepted within one step either side of now, and only
for a step newer than the last one accepted: the update that records the step is conditional
on it, so the same code cannot be used twice, even by two requests at once. Wrong codes count;
at `mfa_max_failures` the factor locks for the login lockout time.
"""

from __future__ import annotations

import hmac
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import pyotp
import segno
from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from carevault.config import Settings
from carevault.crypto.envelope import EnvelopeCipher
from carevault.db.engine import write_transaction
from carevault.db.key_reads import read_by_key
from carevault.db.tables import mfa_totp

STEP_SECONDS = 30
DIGITS = 6
WINDOW = 1  # steps accepted either side of the current one


_OF_USER = mfa_totp.c.user_id == bindparam("user_id")
_CONFIRMED = mfa_totp.c.confirmed_at.is_not(None)
_PENDING = mfa_totp.c.confirmed_at.is_(None)
_FACTORS = select(mfa_totp).where(_OF_USER).order_by(mfa_totp.c.created_at)
_CONFIRMED_FACTORS = select(mfa_totp).where(_OF_USER, _CONFIRMED).order_by(mfa_totp.c.created_at)
# A user has a factor or two: the newest is the first row, no LIMIT needed.
_CONFIRMED_NEWEST_FIRST = (
    select(mfa_totp).where(_OF_USER, _CONFIRMED).order_by(mfa_totp.c.created_at.desc())
)
_PENDING_NEWEST_FIRST = (
    select(mfa_totp).where(_OF_USER, _PENDING).order_by(mfa_totp.c.created_at.desc())
)


class TotpResult(Enum):
    ok = "ok"
    wrong = "wrong"  # counted
    replayed = "replayed"  # a right code for a step already used: counted too
    locked = "locked"  # too many wrong codes: refused whatever the code
    locked_now = "locked_now"  # this wrong code locked the factor


@dataclass(frozen=True)
class TotpFactor:
    id: str
    user_id: str
    created_at: float
    confirmed_at: float | None
    last_used_at: float | None
    locked_until: float | None


@dataclass(frozen=True)
class Enrollment:
    factor_id: str
    otpauth_uri: str
    qr_svg: str


def normalize_code(code: str) -> str | None:
    """Six digits (spaces allowed between them), else None."""
    digits = code.replace(" ", "")
    return digits if len(digits) == DIGITS and digits.isascii() and digits.isdigit() else None


def _aad(factor_id: str) -> bytes:
    return f"mfa_totp:{factor_id}".encode()


class TotpFactors:
    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        envelope: EnvelopeCipher,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._envelope = envelope
        self._clock = clock

    async def enroll(self, user_id: str, account_name: str) -> Enrollment:
        """A new, unconfirmed factor (any earlier unconfirmed one is replaced)."""
        secret = pyotp.random_base32()  # 160 bits, as RFC 4226 recommends
        factor_id = str(uuid.uuid4())
        ciphertext = await self._envelope.encrypt(_scope(user_id), secret.encode(), _aad(factor_id))
        async with write_transaction(self._engine) as conn:
            await conn.execute(
                delete(mfa_totp).where(
                    mfa_totp.c.user_id == user_id, mfa_totp.c.confirmed_at.is_(None)
                )
            )
            await conn.execute(
                insert(mfa_totp).values(
                    id=factor_id,
                    user_id=user_id,
                    secret=ciphertext,
                    created_at=self._clock(),
                    confirmed_at=None,
                    last_step=0,
                    failures=0,
                )
            )
        uri = pyotp.TOTP(secret).provisioning_uri(
            name=account_name, issuer_name=self._settings.totp_issuer
        )
        qr = segno.make(uri, error="m").svg_inline(scale=4)
        return Enrollment(factor_id, uri, qr)

    async def factors(self, user_id: str, *, confirmed_only: bool = True) -> list[TotpFactor]:
        query = _CONFIRMED_FACTORS if confirmed_only else _FACTORS
        rows = await read_by_key(self._engine, query, {"user_id": user_id})
        return [
            TotpFactor(
                r.id, r.user_id, r.created_at, r.confirmed_at, r.last_used_at, r.locked_until
            )
            for r in rows
        ]

    async def confirm(self, user_id: str, code: str) -> TotpResult:
        """Activate the user's pending factor with a first code from the authenticator app."""
        return await self._check(user_id, code, pending=True)

    async def verify(self, user_id: str, code: str) -> TotpResult:
        """Check a code against the user's confirmed factor."""
        return await self._check(user_id, code, pending=False)

    async def remove(self, user_id: str, factor_id: str) -> bool:
        async with write_transaction(self._engine) as conn:
            removed = await conn.execute(
                delete(mfa_totp).where(mfa_totp.c.id == factor_id, mfa_totp.c.user_id == user_id)
            )
        return removed.rowcount == 1

    async def remove_all(self, user_id: str) -> int:
        async with write_transaction(self._engine) as conn:
            removed = await conn.execute(delete(mfa_totp).where(mfa_totp.c.user_id == user_id))
        return removed.rowcount

    async def current_code(self, user_id: str) -> str | None:
        """The code the user's authenticator shows now (the demo's `carevault demo totp`)."""
        row = await self._row(user_id, pending=False)
        if row is None:
            return None
        return pyotp.TOTP(await self._secret(row)).now()

    async def _row(self, user_id: str, *, pending: bool) -> object | None:
        query = _PENDING_NEWEST_FIRST if pending else _CONFIRMED_NEWEST_FIRST
        rows = await read_by_key(self._engine, query, {"user_id": user_id})
        return rows[0] if rows else None

    async def _secret(self, row: object) -> str:
        plaintext = await self._envelope.decrypt(
            _scope(row.user_id),  # type: ignore[attr-defined]
            row.secret,  # type: ignore[attr-defined]
            _aad(row.id),  # type: ignore[attr-defined]
        )
        return plaintext.decode()

    async def _check(self, user_id: str, code: str, *, pending: bool) -> TotpResult:
        row = await self._row(user_id, pending=pending)
        if row is None:
            return TotpResult.wrong
        now = self._clock()
        if row.locked_until is not None and row.locked_until > now:  # type: ignore[attr-defined]
            return TotpResult.locked
        digits = normalize_code(code)
        step = _matching_step(await self._secret(row), digits, now) if digits else None
        factor_id = row.id  # type: ignore[attr-defined]
        if step is not None:
            values: dict[str, object] = {"last_step": step, "failures": 0, "last_used_at": now}
            if pending:
                values["confirmed_at"] = now
            async with write_transaction(self._engine) as conn:
                taken = await conn.execute(
                    update(mfa_totp)
                    .where(mfa_totp.c.id == factor_id, mfa_totp.c.last_step < step)
                    .values(**values)
                )
                if taken.rowcount == 1 and pending:
                    # One confirmed TOTP factor per user: a new one replaces the old.
                    await conn.execute(
                        delete(mfa_totp).where(
                            mfa_totp.c.user_id == user_id, mfa_totp.c.id != factor_id
                        )
                    )
            if taken.rowcount == 1:
                return TotpResult.ok
        return await self._failed(factor_id, now, replayed=step is not None)

    async def _failed(self, factor_id: str, now: float, *, replayed: bool) -> TotpResult:
        limit = self._settings.mfa_max_failures
        async with write_transaction(self._engine) as conn:
            await conn.execute(
                update(mfa_totp)
                .where(mfa_totp.c.id == factor_id)
                .values(failures=mfa_totp.c.failures + 1)
            )
            failures = (
                await conn.execute(select(mfa_totp.c.failures).where(mfa_totp.c.id == factor_id))
            ).scalar()
            if failures is not None and failures >= limit:
                await conn.execute(
                    update(mfa_totp)
                    .where(mfa_totp.c.id == factor_id)
                    .values(locked_until=now + self._settings.login_lockout_seconds, failures=0)
                )
                return TotpResult.locked_now
        return TotpResult.replayed if replayed else TotpResult.wrong


def _matching_step(secret: str, digits: str, now: float) -> int | None:
    totp = pyotp.TOTP(secret, digits=DIGITS, interval=STEP_SECONDS)
    current = int(now // STEP_SECONDS)
    found = None
    for step in range(current - WINDOW, current + WINDOW + 1):
        # Every candidate is compared (no early exit): the time taken does not depend on which.
        if hmac.compare_digest(totp.generate_otp(step), digits) and found is None:
            found = step
    return found


def _scope(user_id: str) -> str:
    return f"mfa:{user_id}"
