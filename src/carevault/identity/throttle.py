"""Login throttling: per account (exponential backoff, then lockout) and per client address.

Attempts are counted *before* the password is checked, in one transaction, so a burst of
parallel guesses cannot slip more than one attempt past the limit. The account key is a keyed
hash of the attempted username, existing or not: unknown and real accounts lock alike, and the
table holds no names.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import case, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from carevault.config import Settings
from carevault.db.engine import write_transaction
from carevault.db.tables import login_throttle

# An attempt still "being checked" after this long was abandoned by a crashed worker.
IN_FLIGHT_STALE_SECONDS = 60.0


@dataclass(frozen=True)
class AttemptVerdict:
    allowed: bool
    reason: str = ""  # locked | backoff


class AddressThrottled(Exception):
    def __init__(self, retry_after: int) -> None:
        self.retry_after = retry_after
        super().__init__("too many failed logins from this address")


async def _ensure_row(conn: AsyncConnection, key: str, now: float) -> None:
    values = {
        "key": key,
        "failures": 0,
        "window_started_at": now,
        "last_failure_at": 0.0,
        "in_flight": 0,
    }
    if conn.dialect.name == "postgresql":
        stmt = postgresql.insert(login_throttle).values(**values).on_conflict_do_nothing()
    else:
        stmt = sqlite.insert(login_throttle).values(**values).on_conflict_do_nothing()
    await conn.execute(stmt)


class LoginThrottle:
    def __init__(
        self, settings: Settings, engine: AsyncEngine, clock: Callable[[], float] = time.time
    ) -> None:
        self._s = settings
        self._engine = engine
        self._clock = clock

    def backoff_seconds(self, failures: int) -> float:
        if failures <= 0:
            return 0.0
        return min(
            self._s.login_backoff_base_seconds * 2 ** (failures - 1),
            self._s.login_backoff_max_seconds,
        )

    async def check_address(self, address: str) -> None:
        """Raise `AddressThrottled` when this address has failed too often lately."""
        now = self._clock()
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    select(login_throttle).where(login_throttle.c.key == f"addr:{address}")
                )
            ).first()
        if row is None:
            return
        window_end = row.window_started_at + self._s.login_address_window_seconds
        if now < window_end and row.failures >= self._s.login_max_failures_per_address:
            raise AddressThrottled(max(1, int(window_end - now) + 1))

    async def begin_attempt(self, account_key: str) -> AttemptVerdict:
        """Reserve an attempt against the account before its password is checked.

        Confirmed failures plus attempts still being checked may not exceed the limit, so a
        burst of parallel guesses gets no more tries than a sequence would; legitimate
        parallel logins (below the limit) all proceed.
        """
        key = f"acct:{account_key}"
        async with write_transaction(self._engine) as conn:
            now = self._clock()
            await _ensure_row(conn, key, now)
            row = (
                await conn.execute(select(login_throttle).where(login_throttle.c.key == key))
            ).one()
            failures = row.failures
            in_flight = row.in_flight
            if row.in_flight_at is None or now - row.in_flight_at > IN_FLIGHT_STALE_SECONDS:
                in_flight = 0  # left behind by a crashed worker
            if row.locked_until is not None:
                if now < row.locked_until:
                    return AttemptVerdict(False, "locked")
                failures = 0  # the lockout has run its course: start afresh
            elif failures and now < row.last_failure_at + self.backoff_seconds(failures):
                return AttemptVerdict(False, "backoff")
            if failures + in_flight >= self._s.login_max_failures:
                return AttemptVerdict(False, "backoff")
            await conn.execute(
                update(login_throttle)
                .where(login_throttle.c.key == key)
                .values(
                    failures=failures, in_flight=in_flight + 1, in_flight_at=now, locked_until=None
                )
            )
            return AttemptVerdict(True)

    async def failed(self, account_key: str) -> bool:
        """Record a failed attempt; return True when it locked the account."""
        key = f"acct:{account_key}"
        async with write_transaction(self._engine) as conn:
            now = self._clock()
            await _ensure_row(conn, key, now)
            row = (
                await conn.execute(select(login_throttle).where(login_throttle.c.key == key))
            ).one()
            failures = row.failures + 1
            locked = failures >= self._s.login_max_failures
            await conn.execute(
                update(login_throttle)
                .where(login_throttle.c.key == key)
                .values(
                    failures=failures,
                    last_failure_at=now,
                    in_flight=max(0, row.in_flight - 1),
                    locked_until=now + self._s.login_lockout_seconds if locked else None,
                )
            )
            return locked

    async def succeeded(self, account_key: str) -> None:
        # Reset rather than delete: a concurrent attempt of the same account may be between
        # its insert-if-missing and its read of this row (PostgreSQL, READ COMMITTED).
        async with write_transaction(self._engine) as conn:
            await conn.execute(
                update(login_throttle)
                .where(login_throttle.c.key == f"acct:{account_key}")
                .values(
                    failures=0,
                    locked_until=None,
                    in_flight=case(
                        (login_throttle.c.in_flight > 0, login_throttle.c.in_flight - 1), else_=0
                    ),
                )
            )

    async def release(self, account_key: str) -> None:
        """End an attempt that neither failed nor completed the login (the password was right
        and a second factor is asked for): the failure count stays as it is."""
        async with write_transaction(self._engine) as conn:
            await conn.execute(
                update(login_throttle)
                .where(login_throttle.c.key == f"acct:{account_key}")
                .values(
                    in_flight=case(
                        (login_throttle.c.in_flight > 0, login_throttle.c.in_flight - 1), else_=0
                    )
                )
            )

    async def address_failed(self, address: str) -> None:
        key = f"addr:{address}"
        async with write_transaction(self._engine) as conn:
            now = self._clock()
            await _ensure_row(conn, key, now)
            row = (
                await conn.execute(select(login_throttle).where(login_throttle.c.key == key))
            ).one()
            if now - row.window_started_at > self._s.login_address_window_seconds:
                values = {"failures": 1, "window_started_at": now, "last_failure_at": now}
            else:
                values = {"failures": row.failures + 1, "last_failure_at": now}
            await conn.execute(
                update(login_throttle).where(login_throttle.c.key == key).values(**values)
            )
