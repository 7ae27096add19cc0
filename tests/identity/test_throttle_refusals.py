"""A refused login attempt writes nothing: guesses against a locked or backing-off account,
however many, neither rewrite the throttle row (a new row version on PostgreSQL each time) nor
take SQLite's write lock, which every request's audit append also needs."""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import psycopg

from carevault.config import Settings
from carevault.db.engine import create_engine, dispose
from carevault.identity.throttle import AttemptVerdict, LoginThrottle


class CommitProbe:
    """Its answer changes when anyone commits a change to the throttle rows (PostgreSQL: the
    row versions' xmin) or to the database at all (SQLite: `data_version`, which moves when
    another connection commits)."""

    def __init__(self, settings: Settings, store: str) -> None:
        self._settings = settings
        self._sqlite = None
        if store == "sqlite":
            self._sqlite = sqlite3.connect(settings.data_dir / "carevault.db")

    def __call__(self) -> Any:
        if self._sqlite is not None:
            return self._sqlite.execute("PRAGMA data_version").fetchone()[0]
        with psycopg.connect(self._settings.database_url, autocommit=True) as conn:
            rows = conn.execute("SELECT key, xmin::text FROM login_throttle ORDER BY key")
            return rows.fetchall()

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()


async def _fail(throttle: LoginThrottle, key: str) -> None:
    assert (await throttle.begin_attempt(key)).allowed
    await throttle.failed(key)


async def test_refused_attempts_write_nothing(settings_factory, clock, store) -> None:
    settings = settings_factory(login_max_failures=3)
    engine = create_engine(settings)
    throttle = LoginThrottle(settings, engine, clock)
    probe = CommitProbe(settings, store)
    try:
        await _fail(throttle, "guessed")
        seen = probe()
        for _ in range(5):  # within the backoff of the first failure
            assert await throttle.begin_attempt("guessed") == AttemptVerdict(False, "backoff")
        assert probe() == seen

        for _ in range(2):
            clock.advance(60)  # past the backoff
            await _fail(throttle, "guessed")
        seen = probe()
        for _ in range(10):
            clock.advance(60)  # a guess a minute: the lockout (15 minutes) refuses them all
            assert await throttle.begin_attempt("guessed") == AttemptVerdict(False, "locked")
        assert probe() == seen

        clock.advance(15 * 60)  # the lockout has run its course: the next attempt counts
        assert await throttle.begin_attempt("guessed") == AttemptVerdict(True)
        assert probe() != seen
    finally:
        probe.close()
        await dispose(engine)


async def test_the_locked_decision_still_bounds_parallel_attempts(
    settings_factory, clock, store
) -> None:
    """The unlocked read only refuses: attempts it lets through are decided again under the
    row's lock, so a burst that all read the same row still gets no more than the limit."""
    settings = settings_factory(login_max_failures=3)
    engine = create_engine(settings)
    throttle = LoginThrottle(settings, engine, clock)
    try:
        verdicts = await asyncio.gather(*(throttle.begin_attempt("burst") for _ in range(8)))
        assert sum(v.allowed for v in verdicts) == 3
        assert {v.reason for v in verdicts if not v.allowed} == {"backoff"}
    finally:
        await dispose(engine)
