"""Reads of a row by its key (a resource by id or version, a data key's row): the hottest
statements of the record server, one round trip each.

`read_by_key(engine, statement, params)` runs a prebuilt SELECT with bound parameters (also
each statement of a search: fhir/search.py builds one per shape of search), compiled once for
the driver, which runs it without SQLAlchemy's execution around it. On SQLite it is `run_read`
(on the event loop's own connection, engine.py). On PostgreSQL it runs
with psycopg's asyncio connection directly, on the event loop: `run_read` would cross to a
worker thread and back, and that crossing (a queue put, a thread wake-up, a self-pipe write,
GIL hand-overs during which the read threads' Python holds the loop up) cost more than the
round trip itself: 1 worker served 944 reads/s through the threads and 1,440/s this way
(wrk -t1 -c32, 1,000 patients). SQLAlchemy's asyncio layer would not help (737/s): it adds a
greenlet switch per driver call and a pool checkout per read.

The connections are this module's own, per event loop: autocommit, every transaction
read-only (`default_transaction_read_only`), named `carevault-reads` in pg_stat_activity like
the read threads' pool, at most `_CONNECTIONS` at once. The statement text is compiled once
and prepared by the server. A connection that fails, or whose read was cancelled midway, is
closed rather than reused; a read on a connection the server closed meanwhile (a restart, a
failover, an idle timeout) runs again on a new one. `key_writes` runs its short write
transactions on a read-write pool of the same kind (`driver_pool(engine, writes=True)`, under
the database URL's own application name), with the same compiled statements.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sqlite3
import weakref
from collections import namedtuple
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from sqlalchemy import (
    ARRAY,
    JSON,
    ColumnElement,
    Connection,
    Executable,
    Select,
    String,
    any_,
    bindparam,
    func,
    literal_column,
    select,
)
from sqlalchemy.engine import URL, Dialect
from sqlalchemy.exc import DBAPIError, InvalidRequestError
from sqlalchemy.ext.asyncio import AsyncEngine

from carevault.db.engine import read_only_url, run_read

_CONNECTIONS = 8


async def read_by_key(
    engine: AsyncEngine, statement: Select[Any], params: Mapping[str, Any]
) -> list[Any]:
    """The rows of `statement` (attribute access by column name, as SQLAlchemy's rows)."""
    if engine.dialect.name == "postgresql":
        compiled = _compiled(statement, engine.dialect)
        try:
            return await driver_pool(engine).rows(compiled, params)
        except psycopg.Error as err:  # as SQLAlchemy raises it: callers catch its errors
            raise DBAPIError.instance(
                compiled.sql, None, err, psycopg.Error, hide_parameters=True
            ) from err
    return await run_read(engine, lambda conn: read_on(conn, statement, params))


def read_on(conn: Connection, statement: Select[Any], params: Mapping[str, Any]) -> list[Any]:
    """SQLite: the rows of `statement` on a connection `run_read` gave, as `read_by_key` reads
    them (several statements in one read transaction: a search)."""
    compiled = _compiled(statement, conn.dialect)
    if compiled.expanding:  # a list parameter only SQLAlchemy knows how to spread
        return conn.execute(statement, params).all()
    return compiled.on_sqlite(conn, params)


def on_sqlite_driver(
    dbapi_connection: Any, dialect: Dialect, statement: Executable, params: Mapping[str, Any]
) -> tuple[list[Any], int]:
    """A prebuilt statement on SQLite's own connection (`key_writes`): its rows and the number
    of rows it changed."""
    return _compiled(statement, dialect).on_sqlite_driver(dbapi_connection, params)


DIALECTS = ("sqlite", "postgresql")


def in_list(column: ColumnElement[Any], name: str, dialect: str) -> ColumnElement[bool]:
    """`column` among the items of the one list parameter `name`, so that a list of any length
    is one statement (an expanding parameter would send each read back through SQLAlchemy's
    execution): `= ANY(:name)` on PostgreSQL, `IN json_each(:name)` on SQLite. Statements that
    use it are built once per dialect (`DIALECTS`)."""
    if dialect == "postgresql":
        return column == any_(bindparam(name, type_=ARRAY(String)))
    items = select(literal_column("value")).select_from(func.json_each(bindparam(name, type_=JSON)))
    return column.in_(items)


@dataclass(frozen=True)
class _Compiled:
    """A statement compiled once for the driver: its text, and what SQLAlchemy would do around
    each execution (SQLAlchemy's own execution of a cached statement costs four times the
    SQLite read it wraps: 45 of 56 us)."""

    sql: str
    names: tuple[str, ...]  # SQLite: the parameters' names in placeholder order
    own: dict[str, Any]  # values the statement holds itself
    binds: dict[str, Callable[[Any], Any]]  # SQLite: parameters' conversions (a JSON column...)
    results: tuple[Callable[[Any], Any] | None, ...]  # SQLite: columns' conversions
    row: type
    expanding: bool  # a parameter spread at execution (`bindparam(..., expanding=True)`)

    def values(self, params: Mapping[str, Any]) -> Mapping[str, Any]:
        return {**self.own, **params} if self.own else params

    def on_sqlite(self, conn: Connection, params: Mapping[str, Any]) -> list[Any]:
        return self.on_sqlite_driver(conn.connection.dbapi_connection, params)[0]

    def on_sqlite_driver(
        self, dbapi_connection: Any, params: Mapping[str, Any]
    ) -> tuple[list[Any], int]:
        """The rows (a SELECT's, or a write's RETURNING) and the number of rows changed."""
        given = self.values(params)
        values = [
            self.binds[name](given[name]) if name in self.binds else given[name]
            for name in self.names
        ]
        try:
            raw, changed = _sqlite_rows(dbapi_connection, self.sql, tuple(values))
        except sqlite3.Error as err:  # as SQLAlchemy raises it (run_read, callers expect that)
            # Without the values in its text: they are ids and blind-index keys, never for a log.
            raise DBAPIError.instance(
                self.sql, values, err, sqlite3.Error, hide_parameters=True
            ) from err
        if not any(self.results):
            return [self.row(*r) for r in raw], changed
        rows = [
            self.row(*(v if f is None else f(v) for f, v in zip(self.results, r, strict=True)))
            for r in raw
        ]
        return rows, changed


def _sqlite_rows(dbapi_connection: Any, sql: str, values: tuple[Any, ...]) -> tuple[list[Any], int]:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(sql, values)
        return cursor.fetchall(), cursor.rowcount
    finally:
        cursor.close()


@functools.lru_cache(maxsize=2048)
def _compiled(statement: Executable, dialect: Dialect) -> _Compiled:
    """A statement names every value it is sent (`bindparam("id")`), or holds values of its
    own (a search's visibility condition: a literal IN list is rendered as one placeholder per
    item) alongside parameters given a None default."""
    try:
        compiled = statement.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
        own, expanding = dict(compiled.params), False
    except InvalidRequestError:  # a required parameter: its own values are sent beside it
        compiled = statement.compile(dialect=dialect)
        required = {name for bind, name in compiled.bind_names.items() if bind.required}
        own = {
            name: value
            for name, value in compiled.construct_params(_check=False).items()
            if name not in required
        }
        expanding = any(bind.expanding for bind in compiled.binds.values())
    # Column defaults SQLAlchemy computes in Python at each execution (an INSERT's `enabled`
    # of a new user): constants become the statement's own values; anything else is refused
    # here rather than written as NULL.
    for column in (*compiled.insert_prefetch, *compiled.update_prefetch):
        default = column.default if column in compiled.insert_prefetch else column.onupdate
        if default is None or not default.is_scalar:
            raise ValueError(f"{column}: a default computed per execution; give it a value")
        own[column.key] = default.arg  # type: ignore[attr-defined]
    binds = {}
    for name, bind in compiled.binds.items():
        convert = bind.type.bind_processor(dialect)
        if convert is not None:
            binds[name] = convert
    # A SELECT's columns, or an INSERT's or UPDATE's RETURNING (none without one).
    columns = (
        statement.selected_columns if isinstance(statement, Select) else statement.exported_columns  # type: ignore[attr-defined]
    )
    return _Compiled(
        sql=compiled.string,
        names=tuple(compiled.positiontup or ()),
        own=own,
        binds=binds,
        results=tuple(c.type.result_processor(dialect, None) for c in columns),
        row=namedtuple("Row", list(columns.keys()), rename=True),  # type: ignore[misc]
        expanding=expanding,
    )


class _DriverPool:
    """psycopg asyncio connections of one event loop."""

    def __init__(self, url: URL) -> None:
        # Passed apart: SQLAlchemy writes the spaces of `options` in the URL as "+", which
        # libpq does not read back as spaces.
        self._settings = {
            name: url.query[name] for name in ("options", "application_name") if name in url.query
        }
        self._conninfo = url.set(
            drivername="postgresql",
            query={k: v for k, v in url.query.items() if k not in self._settings},
        ).render_as_string(hide_password=False)
        self._slots = asyncio.Semaphore(_CONNECTIONS)
        self._idle: list[psycopg.AsyncConnection[Any]] = []

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(
            self._conninfo, autocommit=True, **self._settings
        )

    async def rows(self, compiled: _Compiled, params: Mapping[str, Any]) -> list[Any]:
        sql, row, params = compiled.sql, compiled.row, compiled.values(params)
        async with self._slots:
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else await self._connect()
            try:
                values = await _fetch(conn, sql, params)
            except psycopg.OperationalError:
                _close_now(conn)
                if not reused:
                    raise
                conn = await self._connect()  # the server closed the idle one: once more
                try:
                    values = await _fetch(conn, sql, params)
                except BaseException:
                    _close_now(conn)
                    raise
            except BaseException:  # cancelled midway, or an error: its state is unknown
                _close_now(conn)
                raise
            self._idle.append(conn)
        return [row(*value) for value in values]

    @contextlib.asynccontextmanager
    async def transaction(self, dialect: Dialect) -> AsyncIterator[DriverTransaction]:
        """A transaction on one of the pool's connections: committed when the block ends,
        and on any error or cancellation the connection is closed (the server rolls back)
        rather than reused in an unknown state."""
        async with self._slots:
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else await self._connect()
            try:
                try:
                    await conn.execute("BEGIN")
                except psycopg.OperationalError:
                    _close_now(conn)
                    if not reused:
                        raise
                    conn = await self._connect()  # the server closed the idle one: nothing sent
                    await conn.execute("BEGIN")
                yield DriverTransaction(conn, dialect)
                await conn.execute("COMMIT")
            except BaseException:
                _close_now(conn)
                raise
            self._idle.append(conn)

    def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            _close_now(conn)


class DriverTransaction:
    """Statements of one `_DriverPool.transaction`, each compiled once and prepared."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], dialect: Dialect) -> None:
        self._conn = conn
        self._dialect = dialect

    async def rows(self, statement: Executable, params: Mapping[str, Any]) -> list[Any]:
        """The rows `statement` returns (a SELECT, or a write's RETURNING)."""
        compiled, cursor = await self._execute(statement, params)
        return [compiled.row(*value) for value in await cursor.fetchall()]

    async def count(self, statement: Executable, params: Mapping[str, Any]) -> int:
        """The number of rows a write changed."""
        _, cursor = await self._execute(statement, params)
        return cursor.rowcount

    async def _execute(
        self, statement: Executable, params: Mapping[str, Any]
    ) -> tuple[_Compiled, psycopg.AsyncCursor[Any]]:
        compiled = _compiled(statement, self._dialect)
        given = compiled.values(params)
        values = {
            name: compiled.binds[name](value) if name in compiled.binds else value
            for name, value in given.items()
        }
        try:
            return compiled, await self._conn.execute(compiled.sql, values, prepare=True)
        except psycopg.Error as err:  # as SQLAlchemy raises it: callers catch its errors
            raise DBAPIError.instance(
                compiled.sql, None, err, psycopg.Error, hide_parameters=True
            ) from err


async def _fetch(
    conn: psycopg.AsyncConnection[Any], sql: str, params: Mapping[str, Any]
) -> list[Any]:
    cursor = await conn.execute(sql, params, prepare=True)
    return await cursor.fetchall()


def _close_now(conn: psycopg.AsyncConnection[Any]) -> None:
    """Close without awaiting (from any loop, or from a cancelled task): libpq's own close."""
    with contextlib.suppress(Exception):
        conn.pgconn.finish()


_POOLS: weakref.WeakKeyDictionary[
    AsyncEngine, weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[bool, _DriverPool]]
] = weakref.WeakKeyDictionary()


def driver_pool(engine: AsyncEngine, *, writes: bool = False) -> _DriverPool:
    """The read-only (or, for `key_writes`, read-write) pool of this engine on the running
    loop (connections belong to the loop that opened them; a test suite runs many)."""
    loop = asyncio.get_running_loop()
    pools = _POOLS.get(engine)
    if pools is None:
        pools = _POOLS.setdefault(engine, weakref.WeakKeyDictionary())
    kinds = pools.get(loop)
    if kinds is None:
        kinds = pools.setdefault(loop, {})
    pool = kinds.get(writes)
    if pool is None:
        url = engine.url if writes else read_only_url(engine.url)
        pool = kinds.setdefault(writes, _DriverPool(url))
    return pool


def close_key_reads(engine: AsyncEngine) -> None:
    """Close the engine's driver connections, reads' and writes', of every loop
    (`db.engine.dispose`)."""
    for kinds in list((_POOLS.pop(engine, None) or {}).values()):
        for pool in kinds.values():
            pool.close()
