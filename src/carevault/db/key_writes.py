"""Short write transactions of prebuilt statements (a login's throttle row, a new session's
refresh family): the login path's writes, run the way `key_reads` runs the hot reads.

`write_by_key(engine)` gives a transaction with `rows(statement, params)` (a SELECT, or a
write's RETURNING) and `count(statement, params)` (rows changed). On PostgreSQL it runs on
psycopg's asyncio connections directly, on the event loop: each statement compiled once and
prepared by the server, no pool checkout with its liveness ping, no greenlet switch per driver
call. Through SQLAlchemy's asyncio layer a login's three write transactions cost ~2.2 ms of
its ~6.7 ms of event-loop time. On SQLite the statements run on the event loop's own write
connection (`engine.loop_write_transaction`), compiled once as well: once the write lock is
taken, the transaction runs to its COMMIT without giving the loop up, instead of holding the
lock while each statement crossed to aiosqlite's thread and back.

Statements must be built once (module constants), every value a named `bindparam`: each is
compiled once per dialect and cached by identity. On PostgreSQL a failed statement raises
SQLAlchemy's error for it, as SQLAlchemy would; the connection is then closed and the
transaction rolled back by the server.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

from sqlalchemy import Executable
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncEngine

from carevault.db.engine import loop_write_transaction
from carevault.db.key_reads import driver_pool, on_sqlite_driver


class KeyWrites(Protocol):
    async def rows(self, statement: Executable, params: Mapping[str, Any]) -> list[Any]: ...

    async def count(self, statement: Executable, params: Mapping[str, Any]) -> int: ...


@contextlib.asynccontextmanager
async def write_by_key(engine: AsyncEngine) -> AsyncIterator[KeyWrites]:
    """A write transaction: committed when the block ends, rolled back on any error."""
    if engine.dialect.name == "postgresql":
        async with driver_pool(engine, writes=True).transaction(engine.dialect) as transaction:
            yield transaction
        return
    async with loop_write_transaction(engine) as conn:
        yield _OnSqlite(conn, engine.dialect)


class _OnSqlite:
    """Statements of a `loop_write_transaction`: they run at once, the awaits never wait."""

    def __init__(self, conn: sqlite3.Connection, dialect: Dialect) -> None:
        self._conn = conn
        self._dialect = dialect

    async def rows(self, statement: Executable, params: Mapping[str, Any]) -> list[Any]:
        return on_sqlite_driver(self._conn, self._dialect, statement, params)[0]

    async def count(self, statement: Executable, params: Mapping[str, Any]) -> int:
        return on_sqlite_driver(self._conn, self._dialect, statement, params)[1]
