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
from typing import Any

from sqlalchemy import bindparam, case, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from carevault.config import Settings
from carevault.db.key_reads import DIALECTS, read_by_key
from carevault.db.key_writes import KeyWrites, write_by_key
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


def _locked_row(dialect: str) -> Any:
    """The throttle row of `key`, inserted first if missing, locked until the transaction
    ends (an upsert takes the row lock on PostgreSQL, where a plain SELECT under READ
    COMMITTED would let parallel attempts all read one count and each write it back plus
    one; SQLite's write transactions are serialised anyway)."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(login_throttle).values(
        key=bindparam("throttle_key"),
        failures=0,
        window_started_at=bindparam("now"),
        last_failure_at=0.0,
        in_flight=0,
    )
    return stmt.on_conflict_do_update(
        index_elements=[login_throttle.c.key], set_={"key": stmt.excluded.key}
    ).returning(*login_throttle.c)


_LOCKED_ROW = {dialect: _locked_row(dialect) for dialect in DIALECTS}
_THIS_KEY = login_throttle.c.key == bindparam("throttle_key")
_ROW = select(login_throttle).where(_THIS_KEY)
_ONE_FEWER_IN_FLIGHT = case(
    (login_throttle.c.in_flight > 0, login_throttle.c.in_flight - 1), else_=0
)
_SUCCEEDED = (
    update(login_throttle)
    .where(_THIS_KEY)
    .values(failures=0, locked_until=None, in_flight=_ONE_FEWER_IN_FLIGHT)
)
_RELEASED = update(login_throttle).where(_THIS_KEY).values(in_flight=_ONE_FEWER_IN_FLIGHT)
_RESERVED = (
    update(login_throttle)
    .where(_THIS_KEY)
    .values(
        failures=bindparam("new_failures"),
        in_flight=bindparam("new_in_flight"),
        in_flight_at=bindparam("now"),
        locked_until=None,
    )
)
_FAILED = (
    update(login_throttle)
    .where(_THIS_KEY)
    .values(
        failures=bindparam("new_failures"),
        last_failure_at=bindparam("now"),
        in_flight=bindparam("new_in_flight"),
        locked_until=bindparam("new_locked_until"),
    )
)
_ADDRESS_FAILED = (
    update(login_throttle)
    .where(_THIS_KEY)
    .values(
        failures=bindparam("new_failures"),
        window_started_at=bindparam("new_window_started_at"),
        last_failure_at=bindparam("now"),
    )
)


async def _lock_row(writes: KeyWrites, dialect: str, key: str, now: float) -> Any:
    return (await writes.rows(_LOCKED_ROW[dialect], {"throttle_key": key, "now": now}))[0]


class LoginThrottle:
    def __init__(
        self, settings: Settings, engine: AsyncEngine, clock: Callable[[], float] = time.time
    ) -> None:
        self._s = settings
        self._engine = engine
        self._dialect = engine.dialect.name
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
        rows = await read_by_key(self._engine, _ROW, {"throttle_key": f"addr:{address}"})
        if not rows:
            return
        row = rows[0]
        window_end = row.window_started_at + self._s.login_address_window_seconds
        if now < window_end and row.failures >= self._s.login_max_failures_per_address:
            raise AddressThrottled(max(1, int(window_end - now) + 1))

    async def begin_attempt(self, account_key: str) -> AttemptVerdict:
        """Reserve an attempt against the account before its password is checked.

        Confirmed failures plus attempts still being checked may not exceed the limit, so a
        burst of parallel guesses gets no more tries than a sequence would; legitimate
        parallel logins (below the limit) all proceed.

        A refusal changes nothing, so it is decided on the committed row, read without a lock
        or a write: the locked path would refuse the same way had it run at that moment. Only
        an attempt that row would let through takes the row's lock (an upsert, which writes a
        row version on PostgreSQL and takes SQLite's write lock) and is decided again there.
        So guesses against a locked account, however many, write nothing.
        """
        key = f"acct:{account_key}"
        rows = await read_by_key(self._engine, _ROW, {"throttle_key": key})
        if rows:
            verdict, _, _ = self._decide(rows[0], self._clock())
            if not verdict.allowed:
                return verdict
        async with write_by_key(self._engine) as writes:
            now = self._clock()
            row = await _lock_row(writes, self._dialect, key, now)
            verdict, failures, in_flight = self._decide(row, now)
            if not verdict.allowed:
                return verdict
            reserved = {"new_failures": failures, "new_in_flight": in_flight + 1, "now": now}
            await writes.count(_RESERVED, {"throttle_key": key, **reserved})
            return verdict

    def _decide(self, row: Any, now: float) -> tuple[AttemptVerdict, int, int]:
        """The verdict on an attempt given the account's row, and the failures and attempts in
        flight it counts from (a lockout that has run its course and a crashed worker's
        attempts no longer count)."""
        failures = row.failures
        in_flight = row.in_flight
        if row.in_flight_at is None or now - row.in_flight_at > IN_FLIGHT_STALE_SECONDS:
            in_flight = 0  # left behind by a crashed worker
        if row.locked_until is not None:
            if now < row.locked_until:
                return AttemptVerdict(False, "locked"), failures, in_flight
            failures = 0  # the lockout has run its course: start afresh
        elif failures and now < row.last_failure_at + self.backoff_seconds(failures):
            return AttemptVerdict(False, "backoff"), failures, in_flight
        if failures + in_flight >= self._s.login_max_failures:
            return AttemptVerdict(False, "backoff"), failures, in_flight
        return AttemptVerdict(True), failures, in_flight

    async def failed(self, account_key: str) -> bool:
        """Record a failed attempt; return True when it locked the account."""
        key = f"acct:{account_key}"
        async with write_by_key(self._engine) as writes:
            now = self._clock()
            row = await _lock_row(writes, self._dialect, key, now)
            failures = row.failures + 1
            locked = failures >= self._s.login_max_failures
            failed = {
                "new_failures": failures,
                "now": now,
                "new_in_flight": max(0, row.in_flight - 1),
                "new_locked_until": now + self._s.login_lockout_seconds if locked else None,
            }
            await writes.count(_FAILED, {"throttle_key": key, **failed})
            return locked

    async def succeeded(self, account_key: str) -> None:
        # Reset rather than delete: the row still counts the account's other attempts in
        # flight.
        async with write_by_key(self._engine) as writes:
            await writes.count(_SUCCEEDED, {"throttle_key": f"acct:{account_key}"})

    async def release(self, account_key: str) -> None:
        """End an attempt that neither failed nor completed the login (the password was right
        and a second factor is asked for): the failure count stays as it is."""
        async with write_by_key(self._engine) as writes:
            await writes.count(_RELEASED, {"throttle_key": f"acct:{account_key}"})

    async def address_failed(self, address: str) -> None:
        key = f"addr:{address}"
        async with write_by_key(self._engine) as writes:
            now = self._clock()
            row = await _lock_row(writes, self._dialect, key, now)
            if now - row.window_started_at > self._s.login_address_window_seconds:
                counted = {"new_failures": 1, "new_window_started_at": now}
            else:
                counted = {
                    "new_failures": row.failures + 1,
                    "new_window_started_at": row.window_started_at,
                }
            await writes.count(_ADDRESS_FAILED, {"throttle_key": key, "now": now, **counted})
