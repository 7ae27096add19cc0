"""Database engines and connections.

Request paths use SQLAlchemy Core on an async engine (aiosqlite or psycopg 3). SQLite runs in
WAL mode with foreign keys on and `synchronous=FULL` (a committed refresh-token rotation or
security event survives a power cut). Write transactions on SQLite start with
`BEGIN IMMEDIATE` so that two writers serialise on the write lock up front instead of failing
when a read lock is upgraded.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from carevault.config import Settings

_WRITE = "carevault_write"


def create_engine(settings: Settings) -> AsyncEngine:
    """The data database."""
    return _engine(settings.sqlalchemy_url, pool_size=10)


def create_vault_engine(settings: Settings) -> AsyncEngine:
    """The key vault (`Settings.key_database_url`). On SQLite it runs with `secure_delete`, so
    a destroyed data key's bytes are overwritten in the file instead of left in a free page."""
    return _engine(settings.key_vault_url, pool_size=4, secure_delete=True)


def _engine(url: str, *, pool_size: int, secure_delete: bool = False) -> AsyncEngine:
    if url.startswith("sqlite"):
        engine = create_async_engine(
            url,
            connect_args={"isolation_level": None, "timeout": 30},
            pool_size=min(pool_size, 8),
            max_overflow=8,
        )
        _configure_sqlite(engine, secure_delete)
        return engine
    return create_async_engine(url, pool_size=pool_size, max_overflow=10, pool_pre_ping=True)


def _configure_sqlite(engine: AsyncEngine, secure_delete: bool) -> None:
    sync_engine = engine.sync_engine

    @event.listens_for(sync_engine, "connect")
    def _pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=30000")
        if secure_delete:
            cursor.execute("PRAGMA secure_delete=ON")
        cursor.close()

    @event.listens_for(sync_engine, "begin")
    def _begin(conn):  # type: ignore[no-untyped-def]
        immediate = conn.get_execution_options().get(_WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


@contextlib.asynccontextmanager
async def write_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A transaction that will write: committed on success, rolled back on any error."""
    async with engine.connect() as conn:
        conn = await conn.execution_options(**{_WRITE: True})
        async with conn.begin():
            yield conn


async def dedicated_write_connection(engine: AsyncEngine) -> AsyncConnection:
    """A connection kept by one writer (the caller closes it): no pool checkout or liveness
    ping per write. On PostgreSQL each statement commits by itself (no BEGIN and COMMIT round
    trips: the writer makes every write one statement); on SQLite its transactions begin with
    `BEGIN IMMEDIATE`."""
    conn = await engine.connect()
    if conn.dialect.name == "sqlite":
        return await conn.execution_options(**{_WRITE: True})
    return await conn.execution_options(isolation_level="AUTOCOMMIT")


@contextlib.asynccontextmanager
async def read_connection(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    async with engine.connect() as conn:
        yield conn


def sync_url(async_url: str) -> str:
    """The synchronous driver URL for Alembic and offline tools."""
    url = make_url(async_url)
    if url.drivername == "sqlite+aiosqlite":
        url = url.set(drivername="sqlite")
    return url.render_as_string(hide_password=False)
