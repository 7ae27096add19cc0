"""Short write transactions of prebuilt statements (a login's throttle row, a new session's
refresh family): the login path's writes, run the way `key_reads` runs the hot reads.

`write_by_key(engine)` gives a transaction with `rows(statement, params)` (a SELECT, or a
write's RETURNING) and `count(statement, params)` (rows changed). On PostgreSQL it runs on
psycopg's asyncio connections directly, on the event loop: each statement compiled once and
prepared by the server, no pool checkout with its liveness ping, no greenlet switch per driver
call. Through SQLAlchemy's asyncio layer a login's three write transactions cost ~2.2 ms of
its ~6.7 ms of event-loop time. On SQLite it is `write_transaction` (the process's kept writer
connection) with the same statements.

Statements must be built once (module constants), every value a named `bindparam`: each is
compiled once per dialect and cached by identity. On PostgreSQL a failed statement raises
SQLAlchemy's error for it, as SQLAlchemy would; the connection is then closed and the
transaction rolled back by the server.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any, Protocol

from sqlalchemy import Executable
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from carevault.db.engine import write_transaction
from carevault.db.key_reads import driver_pool


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
    async with write_transaction(engine) as conn:
        yield _OnConnection(conn)


class _OnConnection:
    def __init__(self, conn: AsyncConnection) -> None:
        self._conn = conn

    async def rows(self, statement: Executable, params: Mapping[str, Any]) -> list[Any]:
        return list((await self._conn.execute(statement, params)).all())

    async def count(self, statement: Executable, params: Mapping[str, Any]) -> int:
        return (await self._conn.execute(statement, params)).rowcount  # type: ignore[attr-defined,no-any-return]
