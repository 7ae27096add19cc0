"""Database engines and connections.

Request paths use SQLAlchemy Core on an async engine (aiosqlite or psycopg 3). SQLite runs in
WAL mode with foreign keys on and `synchronous=FULL` (a committed refresh-token rotation or
security event survives a power cut). Write transactions on SQLite start with
`BEGIN IMMEDIATE` so that two writers serialise on the write lock up front instead of failing
when a read lock is upgraded.

Hot reads go through `run_read(engine, work)`: `work` gets a synchronous SQLAlchemy
`Connection` on a read-only connection of its own pool, and runs in one call to a worker thread.
aiosqlite crosses to its thread and back for every cursor step, and SQLAlchemy's asyncio layer
adds a greenlet switch per driver call: one FHIR read by primary key (`ResourceStore.read`,
in-process, 10k-patient data set) cost 1.27 ms of event-loop CPU on SQLite that way against
0.15 ms in one call, and 0.70 ms against 0.20 ms on PostgreSQL. Writes stay on the async engine;
on SQLite a process's writers take turns (`writer_turn`) before asking for the write lock, on
one connection kept open for them (`_KeptWriter`).

On SQLite a read does not even cross to a thread at first: it runs on the event loop's own
connection, with a budget of `_LOOP_BUDGET_SECONDS`. Its statements take microseconds (a
resource by id 5 us, a search page by name 14 us: a WAL reader waits for no writer, and the
pages are in the OS cache), while the crossing costs a queue put, a thread wake-up, a self-pipe
write and GIL hand-overs, during which the worker threads' Python holds the loop up: 1 worker
served 980 reads/s through the threads and 1,420/s on the loop (wrk -t1 -c32, 1,000 patients).
A read that runs over its budget is interrupted (SQLite's progress handler) and done again on
a thread, where it may take as long as it needs; so is one that finds the database locked (the
loop's connection never waits: a crashed writer's log being recovered, say).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import sqlite3
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, event
from sqlalchemy import create_engine as create_sync_engine
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from carevault.config import Settings

_WRITE = "carevault_write"
_NO_WAIT = "carevault_no_wait"  # SQLite: a connection whose busy timeout is 0 (the audit writer)
_READ_THREADS = 8
READS_APPLICATION = "carevault-reads"  # PostgreSQL: the read pool's name in pg_stat_activity
# SQLite: how long a read may run on the event loop before it is interrupted and done again on
# a thread, and how many virtual-machine steps pass between two looks at the clock.
_LOOP_BUDGET_SECONDS = 0.001
_PROGRESS_STEPS = 1000
_WRITER_WAIT_SECONDS = 30.0  # as SQLite's busy_timeout
_MAX_DELAY = 0.005  # between two tries for SQLite's write lock (`WriteLockWait`)
URGENT_MAX_DELAY = 0.001  # the same for the audit trail's appends
T = TypeVar("T")


def create_engine(settings: Settings) -> AsyncEngine:
    """The data database."""
    return _engine(settings.sqlalchemy_url, pool_size=10)


def create_vault_engine(settings: Settings) -> AsyncEngine:
    """The key vault (`Settings.key_database_url`). On SQLite it runs with `secure_delete`, so
    a destroyed data key's bytes are overwritten in the file instead of left in a free page."""
    return _engine(settings.key_vault_url, pool_size=4, secure_delete=True)


def _engine(url: str, *, pool_size: int, secure_delete: bool = False) -> AsyncEngine:
    # Every engine hides a failed statement's parameters from the error's text (names,
    # identifiers, password hashes go into writes): an error must never carry PHI anywhere.
    if url.startswith("sqlite"):
        engine = create_async_engine(
            url,
            connect_args={"isolation_level": None, "timeout": 30},
            pool_size=min(pool_size, 8),
            max_overflow=8,
            hide_parameters=True,
        )
        _configure_sqlite(engine, secure_delete)
        return engine
    return create_async_engine(
        url, pool_size=pool_size, max_overflow=10, pool_pre_ping=True, hide_parameters=True
    )


def _configure_sqlite(engine: AsyncEngine, secure_delete: bool) -> None:
    # A connection waits for a lock in SQLite's busy handler (in sleeps of up to 100 ms), except
    # where this module's writers ask for the write lock: they poll on the loop instead
    # (`WriteLockWait`): `write_transaction`'s BEGIN IMMEDIATE, and the audit writer's
    # connection (`dedicated_write_connection`).
    _sqlite_events(engine.sync_engine, secure_delete=secure_delete, query_only=False)
    _SECURE_DELETE[engine] = secure_delete


def _sqlite_events(
    engine: Engine,
    *,
    secure_delete: bool,
    query_only: bool,
    busy_ms: int = 30000,
    transactions: bool = True,
    checkpoints: bool = True,
) -> None:
    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_ms)}")
        if secure_delete:
            cursor.execute("PRAGMA secure_delete=ON")
        if query_only:
            cursor.execute("PRAGMA query_only=ON")
        if not checkpoints:  # left to the connections whose commits run on threads
            cursor.execute("PRAGMA wal_autocheckpoint=0")
        cursor.close()

    if not transactions:
        return  # every statement its own implicit transaction (the driver's autocommit)

    @event.listens_for(engine, "begin")
    def _begin(conn):  # type: ignore[no-untyped-def]
        options = conn.get_execution_options()
        if not options.get(_WRITE, False):
            conn.exec_driver_sql("BEGIN")
        elif options.get(_NO_WAIT, False):  # its busy timeout is 0 for good
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        else:  # refused at once if another process holds the lock: the caller polls
            conn.exec_driver_sql("PRAGMA busy_timeout=0")
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            finally:
                conn.exec_driver_sql(f"PRAGMA busy_timeout={int(busy_ms)}")


@dataclass
class _ThreadedReads:
    """A database's read-only synchronous engine and the threads its reads run on; on SQLite
    also the connections reads try first on the calling thread."""

    engine: Engine
    threads: ThreadPoolExecutor
    on_loop: _LoopReads | None = None

    def run(self, work: Callable[[Connection], T]) -> T:
        try:
            with self.engine.connect() as conn:
                return work(conn)
        except DBAPIError as err:
            # No liveness ping per checkout (a round trip per read: 800 against 940 reads/s on
            # PostgreSQL); a connection the server closed (a restart, a failover, an idle
            # timeout) fails instead, the pool drops its generation, and the read, which may
            # run twice, runs again on a new one.
            if not err.connection_invalidated:
                raise
        with self.engine.connect() as conn:
            return work(conn)

    def close(self) -> None:
        self.threads.shutdown(wait=True)
        self.engine.dispose()
        if self.on_loop is not None:
            self.on_loop.close()


@dataclass
class _Held:
    conn: Connection
    deadline: float = math.inf  # read by the progress handler


class _LoopReads:
    """SQLite: a read-only connection per thread that asks, kept open (the event loop's, in
    practice; a test suite starts one loop per test client): a pool checkout and return cost
    more than a read by id (64 against 28 us). It never waits for a lock, and SQLite's
    progress handler interrupts a read that runs past its deadline."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._mine = threading.local()
        self._all: list[Connection] = []
        self._lock = threading.Lock()

    def _held(self) -> _Held:
        held: _Held | None = getattr(self._mine, "held", None)
        if held is None:
            conn = self.engine.connect()
            held = _Held(conn)
            driver = conn.connection.driver_connection
            assert driver is not None
            # Called every _PROGRESS_STEPS virtual-machine steps; a true answer interrupts.
            driver.set_progress_handler(
                lambda: time.perf_counter() > held.deadline, _PROGRESS_STEPS
            )
            self._mine.held = held
            with self._lock:
                self._all.append(conn)
        return held

    def run(self, work: Callable[[Connection], T], budget: float) -> T:
        held = self._held()
        conn = held.conn
        driver = conn.connection.driver_connection
        assert driver is not None
        try:
            driver.execute("BEGIN")  # one snapshot for all of `work`'s statements
            # Only now: the handler also runs during BEGIN (its step count accumulates over the
            # cached statement's runs), which the driver's bare error would then fail.
            held.deadline = time.perf_counter() + budget
            return work(conn)
        finally:
            held.deadline = math.inf
            try:
                conn.rollback()  # ends the read transaction and SQLAlchemy's bookkeeping
                if driver.in_transaction:  # `work` ran nothing through SQLAlchemy
                    driver.rollback()
            except Exception:
                self._mine.held = None  # unusable: the next read opens another
                with contextlib.suppress(Exception):
                    conn.close()

    def close(self) -> None:
        with self._lock:
            held, self._all = self._all, []
        for conn in held:
            with contextlib.suppress(Exception):
                conn.close()
        self.engine.dispose()


_SECURE_DELETE: weakref.WeakKeyDictionary[AsyncEngine, bool] = weakref.WeakKeyDictionary()
_THREADED: weakref.WeakKeyDictionary[AsyncEngine, _ThreadedReads] = weakref.WeakKeyDictionary()


def _read_engine(engine: AsyncEngine) -> Engine:
    url = engine.url
    if url.get_backend_name() == "sqlite":
        sync = create_sync_engine(
            sync_url(url.render_as_string(hide_password=False)),
            connect_args={"isolation_level": None, "timeout": 30, "check_same_thread": False},
            pool_size=_READ_THREADS,
            max_overflow=0,
            hide_parameters=True,
        )
        _sqlite_events(sync, secure_delete=_SECURE_DELETE.get(engine, False), query_only=True)
        return sync
    # PostgreSQL: every statement its own read-only transaction. Autocommit spares the BEGIN
    # and ROLLBACK round trips; under READ COMMITTED each statement takes its own snapshot
    # inside a transaction as well, so a read unit sees nothing less consistent.
    return create_sync_engine(
        read_only_url(url),
        isolation_level="AUTOCOMMIT",
        pool_size=_READ_THREADS,
        max_overflow=0,
        hide_parameters=True,
    )


def read_only_url(url: URL) -> URL:
    """PostgreSQL: `url` for connections whose every transaction is read-only, named
    READS_APPLICATION in pg_stat_activity (the read threads' pool, and `key_reads`)."""
    options = " ".join(
        part for part in (url.query.get("options"), "-c default_transaction_read_only=on") if part
    )
    return url.set(query={**url.query, "options": options, "application_name": READS_APPLICATION})


def _loop_reads(engine: AsyncEngine) -> _LoopReads | None:
    if engine.url.get_backend_name() != "sqlite":
        return None
    sync = create_sync_engine(
        sync_url(engine.url.render_as_string(hide_password=False)),
        connect_args={"isolation_level": None, "timeout": 0, "check_same_thread": False},
        poolclass=NullPool,  # held by `_LoopReads`: opened once per thread, closed by it
        hide_parameters=True,
    )
    _sqlite_events(
        sync,
        secure_delete=_SECURE_DELETE.get(engine, False),
        query_only=True,
        busy_ms=0,
        transactions=False,  # `_LoopReads.run` begins them itself, for less
    )
    return _LoopReads(sync)


def _threaded_reads(engine: AsyncEngine) -> _ThreadedReads:
    reads = _THREADED.get(engine)
    if reads is None:
        threads = ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="db-read")
        reads = _THREADED.setdefault(
            engine, _ThreadedReads(_read_engine(engine), threads, _loop_reads(engine))
        )
    return reads


def read_engines(engine: AsyncEngine) -> tuple[Engine, ...]:
    """The synchronous engines `run_read` runs on for `engine` (tools that watch statements)."""
    reads = _threaded_reads(engine)
    return (reads.engine,) if reads.on_loop is None else (reads.engine, reads.on_loop.engine)


async def run_read(engine: AsyncEngine, work: Callable[[Connection], T]) -> T:
    """`work(connection)` on a read-only connection, its result returned (rows fetched inside:
    nothing may be read from a cursor after `work` returns). `work` cannot write: SQLite's
    connections are `query_only`, PostgreSQL's transactions are read-only. On SQLite its
    statements share one transaction (one snapshot), and it runs first right here, on the
    calling thread (the module's docstring says why); on PostgreSQL, and on SQLite if it ran
    over its budget or found the database locked, in one call to a worker thread. It may
    therefore run twice: it must do nothing but read."""
    if engine.url.get_backend_name() == "sqlite" and engine.url.database in (None, "", ":memory:"):
        async with engine.connect() as conn:  # another connection would see another database
            return await conn.run_sync(work)
    reads = _threaded_reads(engine)
    if reads.on_loop is not None:
        try:
            return reads.on_loop.run(work, _LOOP_BUDGET_SECONDS)
        except (OperationalError, sqlite3.OperationalError) as err:  # BEGIN is the driver's
            if not _try_on_thread(err):
                raise
    return await asyncio.get_running_loop().run_in_executor(reads.threads, reads.run, work)


def _try_on_thread(err: OperationalError | sqlite3.OperationalError) -> bool:
    """The database was locked (waiting is harmless on a thread) or the budget on the loop ran
    out (SQLITE_INTERRUPT)."""
    orig = getattr(err, "orig", err)
    code = getattr(orig, "sqlite_errorcode", None)
    interrupted = code & 0xFF == 9 if code is not None else "interrupted" in str(orig)
    return interrupted or database_busy(err)


async def dispose(engine: AsyncEngine) -> None:
    """Close the engine's pooled connections, those of its read threads and those of its
    reads by key."""
    from carevault.db.key_reads import close_key_reads  # it builds on this module

    close_key_reads(engine)
    kept = engine.sync_engine.__dict__.pop(_KEPT_ATTRIBUTE, None)
    if kept is not None:
        await kept.close()
    loop_writer = engine.sync_engine.__dict__.pop(_LOOP_WRITER_ATTRIBUTE, None)
    if loop_writer is not None:
        loop_writer.close()
    reads = _THREADED.pop(engine, None)
    if reads is not None:
        await asyncio.to_thread(reads.close)
    await engine.dispose()


def database_busy(err: BaseException) -> bool:
    """SQLite answered SQLITE_BUSY or SQLITE_LOCKED: another connection holds the lock."""
    orig = getattr(err, "orig", err)
    code = getattr(orig, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (5, 6)  # with their extended codes
    return isinstance(orig, sqlite3.OperationalError) and (
        "locked" in str(orig) or "busy" in str(orig)
    )


class WriteLockWait:
    """Waiting for SQLite's write lock while another process holds it: short sleeps on the
    event loop (0.5 ms, doubling up to `max_delay`) between tries, bounded like a busy timeout.

    SQLite's own busy handler sleeps in steps of up to 100 ms whenever the lock is released:
    with two workers on one file, the audit appends behind every read waited that long behind
    the other worker's logins (read p99 during a login storm 6.3x its p99 at rest). Within a
    process, writers hand the lock's turn to each other at once, so a process polling from
    outside can keep missing it: the audit trail, which every request waits on, polls at up
    to 1 ms (`URGENT_MAX_DELAY`) rather than 5 (SQLite, 2 workers, two A/B pairs of 2 rounds:
    read p99 in the login storm 104-120 -> 92-126 ms, reads in it 631-1,076 -> 932-1,100/s;
    a modest gain inside this machine's noise)."""

    def __init__(self, max_delay: float = _MAX_DELAY) -> None:
        self._deadline = time.monotonic() + _WRITER_WAIT_SECONDS
        self._delay = 0.0005
        self._max_delay = max_delay

    async def pause(self, err: BaseException) -> None:
        """Sleep before the next try if `err` says the database is busy and time remains;
        otherwise raise `err`."""
        if not database_busy(err) or time.monotonic() + self._delay > self._deadline:
            raise err
        await asyncio.sleep(self._delay)
        self._delay = min(self._delay * 2, self._max_delay)


@contextlib.asynccontextmanager
async def write_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A transaction that will write: committed on success, rolled back on any error."""
    async with writer_turn(engine):
        kept = _kept_writer(engine)
        if kept is not None and not kept.in_use:
            kept.in_use = True
            try:
                conn = await kept.connection(engine)
                async with _transaction(conn):
                    yield conn
            except BaseException:
                await kept.drop_if_unclean()
                raise
            finally:
                kept.in_use = False
            return
        async with engine.connect() as conn:
            conn = await conn.execution_options(**{_WRITE: True})
            async with _transaction(conn):
                yield conn


@contextlib.asynccontextmanager
async def _transaction(conn: AsyncConnection) -> AsyncIterator[None]:
    wait = WriteLockWait()
    while True:
        transaction = conn.begin()
        try:
            await transaction.start(is_ctxmanager=True)  # SQLite: BEGIN IMMEDIATE
            break
        except OperationalError as err:
            await wait.pause(err)
    try:
        yield
    except BaseException as err:
        await transaction.__aexit__(type(err), err, err.__traceback__)
        raise
    await transaction.__aexit__(None, None, None)


class _KeptWriter:
    """SQLite: the connection this process's write transactions run on, kept open. Writers
    of a process take turns anyway (`writer_turn`), so one connection serves them all, and it
    spares each transaction a pool checkout and return (a rollback) and the busy-timeout
    switches around BEGIN IMMEDIATE: each a crossing to aiosqlite's thread and back (a login's
    event-loop time 6.4 -> 5.45 ms without them). Its busy timeout is 0 for good, as the audit
    writer's (`dedicated_write_connection`). A transaction nested in another of the same
    task, or one of another event loop (a test suite's), gets a pooled connection as before."""

    def __init__(self) -> None:
        self._conn: AsyncConnection | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.in_use = False

    async def connection(self, engine: AsyncEngine) -> AsyncConnection:
        if self._conn is None:
            self._conn = await dedicated_write_connection(engine)
            self.loop = asyncio.get_running_loop()
        return self._conn

    async def drop_if_unclean(self) -> None:
        """After an error: a connection left inside a transaction, or invalidated, is closed
        (the next transaction opens another) rather than trusted again."""
        conn = self._conn
        if conn is not None and (conn.invalidated or conn.in_transaction()):
            await self.close()

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await close_write_connection(conn)


# Kept on the engine itself, not in a weak-keyed map: the connection refers to its engine, so
# a map's value would keep its own key alive; a cycle through the engine is collected with it.
_KEPT_ATTRIBUTE = "_carevault_kept_writer"


def _kept_writer(engine: AsyncEngine) -> _KeptWriter | None:
    if engine.dialect.name != "sqlite" or engine.url.database in (None, "", ":memory:"):
        return None
    kept: _KeptWriter | None = getattr(engine.sync_engine, _KEPT_ATTRIBUTE, None)
    if kept is None:
        kept = _KeptWriter()
        setattr(engine.sync_engine, _KEPT_ATTRIBUTE, kept)
    elif kept.loop is not None and kept.loop is not asyncio.get_running_loop():
        return None
    return kept


class _WriterGate:
    """Turns to write, first come first served, except that urgent writers (the audit trail,
    which every request waits on) go before the others that wait."""

    def __init__(self) -> None:
        self.holder: asyncio.Task[Any] | None = None
        self._queues: tuple[deque[asyncio.Future[None]], deque[asyncio.Future[None]]] = (
            deque(),  # urgent
            deque(),
        )

    async def acquire(self, task: asyncio.Task[Any] | None, urgent: bool) -> None:
        if self.holder is None and not any(self._queues):
            self.holder = task
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queue = self._queues[0 if urgent else 1]
        queue.append(turn)
        try:
            await asyncio.wait_for(asyncio.shield(turn), _WRITER_WAIT_SECONDS)
        except BaseException:
            if turn.done() and not turn.cancelled():
                self.release()  # handed over just as we gave up: pass it on
            else:
                turn.cancel()
                queue.remove(turn)
            raise
        self.holder = task

    def release(self) -> None:
        self.holder = None
        for queue in self._queues:
            while queue:
                turn = queue.popleft()
                if not turn.done():
                    self.holder = _GATE_HANDED_OVER
                    turn.set_result(None)
                    return


_GATE_HANDED_OVER: Any = object()  # held by a waiter that has not resumed yet
_GATES: weakref.WeakKeyDictionary[AsyncEngine, _WriterGate] = weakref.WeakKeyDictionary()


@contextlib.asynccontextmanager
async def writer_turn(engine: AsyncEngine, *, urgent: bool = False) -> AsyncIterator[None]:
    """On SQLite, this process's writers take turns before they ask the database for its
    write lock. Connections of one process that wait for that lock sleep in SQLite's busy
    handler, in steps of up to 100 ms, however soon it is released: the writes of a FHIR create
    or a login made the audit appends of every read wait that long (read p99 during a login
    storm 5.5x its p99 at rest). `urgent` turns (the audit trail's appends, which every
    request waits on) go first. A task already holding the turn passes; waiting is bounded
    like the busy timeout, then fails as a locked database would. Other processes are still
    kept out by SQLite's lock itself. PostgreSQL: no gate."""
    if engine.dialect.name != "sqlite":
        yield
        return
    gate = _GATES.get(engine)
    if gate is None:
        gate = _GATES.setdefault(engine, _WriterGate())
    task = asyncio.current_task()
    if task is not None and gate.holder is task:
        yield
        return
    try:
        await gate.acquire(task, urgent)
    except TimeoutError:
        raise OperationalError(
            "-- waiting for this process's writers", None, TimeoutError("database is locked")
        ) from None
    try:
        yield
    finally:
        gate.release()


class SqliteWriteThread:
    """SQLite: a write connection on a thread of its own. `await run(work)` calls
    `work(connection)` there (the driver's connection: autocommit, busy timeout 0), so a
    transaction of several statements is one crossing from the event loop and holds the
    database's write lock only while its statements run.

    Through aiosqlite each statement of a transaction is a crossing, and the task resumes only
    when its event loop comes round: with two workers on one file, a transaction of the audit
    trail held the lock across several turns of a loop busy with 32 requests, and the other
    worker's appends (which every request waits on) waited behind it. Errors reach the caller
    as SQLAlchemy's; SQLITE_BUSY (another process holds the lock) at once, to be waited out on
    the loop (`WriteLockWait`). After any other error the connection is closed and the next
    call opens another. File databases only: on its thread, a memory database would be
    another, empty one."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._executor: ThreadPoolExecutor | None = None  # started on first use
        self._sync: Engine | None = None
        self._conn: Any = None  # the pool's proxy for the driver's connection

    async def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """`work`'s answer; its errors are SQLAlchemy's, as from `write_transaction`."""
        if self._executor is None:  # closed, and used again
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="carevault-sqlite-writer")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._call, work)
        except sqlite3.Error as err:
            raise DBAPIError.instance(
                "-- a write on the writer thread", None, err, sqlite3.Error, hide_parameters=True
            ) from err

    def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        if self._conn is None:
            if self._sync is None:
                self._sync = _write_engine(self._engine)
            self._conn = self._sync.raw_connection()
        driver = self._conn.driver_connection
        try:
            return work(driver)
        except BaseException as err:
            if driver.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    driver.rollback()
            if not database_busy(err):
                self._close_connection()
            raise

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.invalidate()  # never back into the pool in an unknown state

    def _close(self) -> None:
        self._close_connection()
        if self._sync is not None:
            self._sync.dispose()
            self._sync = None

    async def close(self) -> None:
        if self._executor is None:
            return
        executor, self._executor = self._executor, None
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._close)
        finally:
            executor.shutdown(wait=False)


def _write_engine(engine: AsyncEngine, *, checkpoints: bool = True) -> Engine:
    sync = create_sync_engine(
        sync_url(engine.url.render_as_string(hide_password=False)),
        connect_args={"isolation_level": None, "check_same_thread": False},
        poolclass=NullPool,
        hide_parameters=True,
    )
    _sqlite_events(
        sync,
        secure_delete=_SECURE_DELETE.get(engine, False),
        query_only=False,
        busy_ms=0,
        transactions=False,
        checkpoints=checkpoints,
    )
    return sync


class _LoopWriter:
    """SQLite: a write connection per thread that asks (the event loop's, in practice),
    kept open, for `loop_write_transaction`."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._sync = _write_engine(engine, checkpoints=False)
        self._mine = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()

    def connection(self) -> sqlite3.Connection:
        conn = getattr(self._mine, "conn", None)
        if conn is None:
            conn = self._mine.conn = self._sync.raw_connection()
            with self._lock:
                self._all.append(conn)
        return conn.driver_connection  # type: ignore[no-any-return]

    def drop(self) -> None:
        """After an error other than a busy database: the next transaction opens another."""
        conn, self._mine.conn = getattr(self._mine, "conn", None), None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.invalidate()

    def close(self) -> None:
        with self._lock:
            held, self._all = self._all, []
        for conn in held:
            with contextlib.suppress(Exception):
                conn.invalidate()
        self._sync.dispose()


_LOOP_WRITER_ATTRIBUTE = "_carevault_loop_writer"


@contextlib.asynccontextmanager
async def loop_write_transaction(engine: AsyncEngine) -> AsyncIterator[sqlite3.Connection]:
    """SQLite: a write transaction on the event loop's own connection (the driver's), for
    short transactions of prebuilt statements (`key_writes`: a login's throttle row, a new
    session's refresh family). Once the database's write lock is taken (`BEGIN IMMEDIATE`,
    waited for on the loop like any writer's), the statements and the COMMIT run without the
    task giving the loop up, so the lock is held only while they run.

    Through aiosqlite every statement is a crossing to its thread, and the task resumes only
    when the loop comes round: during a login storm a login's transaction held the lock across
    several turns of a loop busy with requests, and every read's audit append (in this process
    and in the other workers) waited behind it. The loop does wait for the COMMIT's fsync
    (0.15 ms on this machine's disk); it never runs a WAL checkpoint there
    (`wal_autocheckpoint` is off on this connection: the audit trail's and the other writers'
    commits, on threads, run them). Errors are SQLAlchemy's, as from `write_transaction`."""
    async with writer_turn(engine):
        writer: _LoopWriter | None = getattr(engine.sync_engine, _LOOP_WRITER_ATTRIBUTE, None)
        if writer is None:
            writer = _LoopWriter(engine)
            setattr(engine.sync_engine, _LOOP_WRITER_ATTRIBUTE, writer)
        wait = WriteLockWait()
        try:
            conn = writer.connection()
            while True:
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    break
                except sqlite3.OperationalError as err:
                    await wait.pause(err)  # another process holds the lock; else raised
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.rollback()
                raise
        except sqlite3.Error as err:
            if not database_busy(err):
                writer.drop()
            raise DBAPIError.instance(
                "-- a write transaction", None, err, sqlite3.Error, hide_parameters=True
            ) from err


async def dedicated_write_connection(engine: AsyncEngine) -> AsyncConnection:
    """A connection kept by one writer (who closes it with `close_write_connection`): no
    pool checkout or liveness ping per write. On PostgreSQL each statement commits by itself
    (no BEGIN and COMMIT round trips: the writer makes every write one statement); on SQLite
    its transactions begin with `BEGIN IMMEDIATE`."""
    conn = await engine.connect()
    if conn.dialect.name == "sqlite":
        # Its lone INSERTs take the write lock without a BEGIN: refused at once if another
        # process holds it, so that the writer polls on the loop (`WriteLockWait`).
        raw = await conn.get_raw_connection()
        await raw.driver_connection.execute("PRAGMA busy_timeout=0")  # type: ignore[union-attr]
        return await conn.execution_options(**{_WRITE: True, _NO_WAIT: True})
    return await conn.execution_options(isolation_level="AUTOCOMMIT")


async def close_write_connection(conn: AsyncConnection) -> None:
    """Close a `dedicated_write_connection`. On SQLite it is dropped, not pooled again: other
    users of the pool expect to wait for locks."""
    if conn.dialect.name == "sqlite":
        await conn.invalidate()
    await conn.close()


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
