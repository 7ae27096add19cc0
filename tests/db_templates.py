"""Migrated databases for the test fixtures, made by the real migrations once per process.

Every case of `settings_factory` needs a data database (and a key vault) in the state a fresh
`carevault init` leaves them. Running the Alembic migrations for each case cost most of the
suite's time, so each pytest process (each xdist worker) migrates once per store, the first
time a case asks, with `carevault.db.migrate.upgrade` itself (so a new migration is picked up
without any change here), and then hands out copies:

* SQLite (the data file `carevault.db` and the embedded key vault `keys/data-keys.db`): the
  migrated files, copied byte for byte into the case's data directory, mode 0600 like
  `migrate.upgrade` makes them.
* PostgreSQL: the statements the migration sent to the server, recorded at the driver while it
  migrated a template schema, are replayed into each case's new, empty schema in one
  transaction (one round trip). Every name they use is unqualified (the schema comes from the
  connection's search_path), as in the real run. Before the first copy is handed out, a
  replayed schema is compared with the migrated template (tables, columns, defaults,
  constraints, indexes, triggers and their state, functions, sequences, types, views and every
  row); if they differ in any way, the cases fall back to running the migrations themselves,
  with a warning. The replay costs the server ~0.1-0.3 s, so a thread keeps two such schemas
  made ahead of the cases that take them (each schema is still new and used by one case only).

tests/db/ opts out (fixture `migration_templates_enabled`): the migration tests exercise
`migrate.upgrade` on empty databases, as before.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from carevault.config import KEY_VAULT_FILE, Settings
from carevault.db import migrate

DATA_FILE = "carevault.db"  # Settings.sqlalchemy_url's file in the data directory


def schema_url(base_url: str, schema: str, application_name: str | None = None) -> str:
    """A URL whose connections see only `schema` (and are marked `application_name`)."""
    name = application_name or schema
    return f"{base_url}?application_name={name}&options=-csearch_path%3D{schema}"


def write_private_file(path: Path, content: bytes) -> None:
    """Create `path` 0600 (as `migrate._create_private_file` does) holding `content`."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(content)


class MigrationTemplates:
    """The migrated databases of one pytest process; built lazily, one store at a time."""

    def __init__(self, root: Path, pg_url: str | None) -> None:
        self.root = root
        self.pg_url = pg_url
        self._lock = threading.Lock()
        self._sqlite: dict[str, bytes] | None = None
        self._pg_script: str | None = None
        self._pg_failed: str | None = None
        self._maker: SchemaMaker | None = None

    # --- SQLite ---------------------------------------------------------------------------

    def _sqlite_files(self) -> dict[str, bytes]:
        with self._lock:
            if self._sqlite is None:
                data_dir = self.root / "sqlite"
                settings = Settings(data_dir=data_dir, database_url=None, key_database_url=None)
                migrate.upgrade(settings)
                files = {
                    DATA_FILE: data_dir / DATA_FILE,
                    KEY_VAULT_FILE: settings.keys_dir / KEY_VAULT_FILE,
                }
                self._sqlite = {name: _sqlite_bytes(path) for name, path in files.items()}
            return self._sqlite

    def copy_sqlite_data(self, settings: Settings) -> None:
        """The migrated data database, as `settings.data_dir/carevault.db` (must not exist)."""
        write_private_file(settings.data_dir / DATA_FILE, self._sqlite_files()[DATA_FILE])

    def copy_sqlite_vault(self, settings: Settings) -> None:
        """The migrated key vault, as `settings.keys_dir/data-keys.db` (must not exist)."""
        write_private_file(settings.keys_dir / KEY_VAULT_FILE, self._sqlite_files()[KEY_VAULT_FILE])

    # --- PostgreSQL -----------------------------------------------------------------------

    def take_pg_schema(self) -> str | None:
        """The name of a new schema at head, made for the caller alone (who drops it); None
        when the template is not usable (the caller then makes a schema and migrates it)."""
        script = self._pg_migration_script()
        if script is None:
            return None
        with self._lock:
            if self._maker is None:
                assert self.pg_url
                self._maker = SchemaMaker(self.pg_url, script)
        return self._maker.take()

    def close(self) -> list[str]:
        """Stop making schemas; the names of those made but never taken (to be dropped)."""
        with self._lock:
            maker, self._maker = self._maker, None
        return maker.close() if maker is not None else []

    def _pg_migration_script(self) -> str | None:
        with self._lock:
            if self._pg_script is None and self._pg_failed is None:
                try:
                    self._pg_script = self._record_pg_migration()
                except TemplateMismatch as err:
                    self._pg_failed = str(err)
                    warnings.warn(
                        "PostgreSQL migration template not used (each case migrates its own "
                        f"schema): {err}",
                        stacklevel=2,
                    )
            return self._pg_script

    def _record_pg_migration(self) -> str:
        import psycopg
        from psycopg import ClientCursor
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        assert self.pg_url
        template = f"cv_tpl_{uuid.uuid4().hex[:12]}"
        clone = f"cv_tpl_{uuid.uuid4().hex[:12]}"
        recorded: list[tuple[str, Any, bool]] = []

        def record(
            conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool
        ) -> None:
            if conn.dialect.name == "postgresql":
                recorded.append((statement, parameters, executemany))

        with psycopg.connect(self.pg_url, autocommit=True) as admin:
            admin.execute(f'CREATE SCHEMA "{template}"')  # our names, not input
            admin.execute(f'CREATE SCHEMA "{clone}"')
            try:
                # A data directory of its own for the vault; the data is the template schema.
                settings = Settings(
                    data_dir=self.root / "pg-template",
                    database_url=schema_url(self.pg_url, template),
                    key_database_url=None,
                )
                event.listen(Engine, "before_cursor_execute", record)
                try:
                    migrate.upgrade(settings)
                finally:
                    event.remove(Engine, "before_cursor_execute", record)

                with ClientCursor(admin) as cursor:
                    statements = [
                        cursor.mogrify(statement, _plain(params))
                        for statement, parameters, many in recorded
                        for params in (parameters if many else [parameters])
                    ]
                for statement in statements:
                    if template in statement:
                        raise TemplateMismatch(f"a statement names the schema: {statement!r}")
                script = "BEGIN;\n" + ";\n".join(statements) + ";\nCOMMIT;"

                self_check = schema_url(self.pg_url, clone)
                with psycopg.connect(self_check, autocommit=True) as conn:
                    conn.execute(script)
                expected = describe_pg_schema(admin, template)
                replayed = describe_pg_schema(admin, clone)
                if expected != replayed:
                    raise TemplateMismatch(_difference(expected, replayed))
                return script
            finally:
                admin.execute(f'DROP SCHEMA IF EXISTS "{template}" CASCADE')
                admin.execute(f'DROP SCHEMA IF EXISTS "{clone}" CASCADE')


class TemplateMismatch(Exception):
    pass


def _plain(parameters: Any) -> Any:
    """SQLAlchemy's parameter containers as psycopg's mogrify takes them (same shape)."""
    if parameters is None:
        return None
    if isinstance(parameters, Mapping):
        return dict(parameters)
    return tuple(parameters)


def _sqlite_bytes(path: Path) -> bytes:
    """The file's content with every committed page in it (no -wal left to carry along)."""
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    wal = path.with_name(path.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0, f"{wal} not checkpointed"
    return path.read_bytes()


# What a schema holds, with nothing that depends on its name or its objects' oids.
_DESCRIBE = """
SELECT 'relation', c.relname, c.relkind::text, c.relpersistence::text,
       c.relrowsecurity::text, coalesce(array_to_string(c.reloptions, ','), '')
FROM pg_class c WHERE c.relnamespace = %(schema)s::text::regnamespace
UNION ALL
SELECT 'column', c.relname, a.attnum::text, a.attname,
       format_type(a.atttypid, a.atttypmod) || ' notnull=' || a.attnotnull::text
       || ' identity=' || a.attidentity::text || ' generated=' || a.attgenerated::text
       || ' collation=' || a.attcollation::text,
       coalesce(pg_get_expr(d.adbin, d.adrelid), '')
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE c.relnamespace = %(schema)s::text::regnamespace AND a.attnum > 0 AND NOT a.attisdropped
UNION ALL
SELECT 'constraint', coalesce(c.relname, ''), con.conname, con.contype::text,
       pg_get_constraintdef(con.oid), con.condeferrable::text || con.condeferred::text
FROM pg_constraint con LEFT JOIN pg_class c ON c.oid = con.conrelid
WHERE con.connamespace = %(schema)s::text::regnamespace
UNION ALL
SELECT 'index', c.relname, i.indisunique::text, i.indisprimary::text,
       pg_get_indexdef(i.indexrelid), ''
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
WHERE c.relnamespace = %(schema)s::text::regnamespace
UNION ALL
SELECT 'trigger', c.relname, t.tgname, t.tgenabled::text, pg_get_triggerdef(t.oid), ''
FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
WHERE c.relnamespace = %(schema)s::text::regnamespace AND NOT t.tgisinternal
UNION ALL
SELECT 'function', p.proname, p.prokind::text, pg_get_function_identity_arguments(p.oid),
       pg_get_functiondef(p.oid), ''
FROM pg_proc p WHERE p.pronamespace = %(schema)s::text::regnamespace
UNION ALL
SELECT 'sequence', s.sequencename, s.data_type::text,
       concat_ws(',', s.start_value, s.min_value, s.max_value, s.increment_by, s.cycle,
                 s.cache_size),
       coalesce(s.last_value::text, 'null'), ''
FROM pg_sequences s WHERE s.schemaname = %(schema)s::text
UNION ALL
SELECT 'type', t.typname, t.typtype::text,
       coalesce((SELECT string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder)
                 FROM pg_enum e WHERE e.enumtypid = t.oid), ''),
       coalesce(format_type(t.typbasetype, t.typtypmod), ''), ''
FROM pg_type t WHERE t.typnamespace = %(schema)s::text::regnamespace
UNION ALL
SELECT 'view', viewname, '', '', definition, '' FROM pg_views WHERE schemaname = %(schema)s::text
UNION ALL
SELECT 'policy', tablename, policyname, cmd, coalesce(qual, '') || coalesce(with_check, ''), ''
FROM pg_policies WHERE schemaname = %(schema)s::text
"""


def describe_pg_schema(conn: Any, schema: str) -> dict[str, list[tuple[str, ...]]]:
    """Every object of `schema` (by definition, not by oid) and every row of its tables; the
    schema's own name reads `<schema>` (pg_get_functiondef qualifies the function's name)."""
    conn.execute(f'SET search_path TO "{schema}"')  # other definitions print unqualified names
    try:
        objects = sorted(
            tuple(str(value).replace(schema, "<schema>") for value in row)
            for row in conn.execute(_DESCRIBE, {"schema": schema})
        )
        described: dict[str, list[tuple[str, ...]]] = {"objects": objects}
        tables = [
            row[0]
            for row in conn.execute(
                "SELECT tablename FROM pg_tables WHERE schemaname = %s ORDER BY 1", (schema,)
            )
        ]
        for table in tables:  # names from the catalogue
            rows = conn.execute(f'SELECT row_to_json(t)::text FROM "{table}" t').fetchall()
            described[f"rows of {table}"] = sorted(tuple(row) for row in rows)
        return described
    finally:
        conn.execute("RESET search_path")


def _difference(expected: dict[str, Any], replayed: dict[str, Any]) -> str:
    for key in sorted(set(expected) | set(replayed)):
        want, got = expected.get(key), replayed.get(key)
        if want != got:
            missing = sorted(set(want or []) - set(got or []))[:3]
            extra = sorted(set(got or []) - set(want or []))[:3]
            return f"{key}: migrated has {missing}, replayed has {extra}"
    return "no difference found"


class SchemaDropper:
    """DROP SCHEMA ... CASCADE on a thread of its own, in the order asked; `close` waits for
    every drop. A failed drop is reported when the session ends (pytest shows the error)."""

    def __init__(self, pg_url: str) -> None:
        import queue

        self.pg_url = pg_url
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._errors: list[str] = []
        self._thread = threading.Thread(target=self._run, name="schema-dropper", daemon=True)
        self._thread.start()

    def drop(self, schema: str) -> None:
        self._queue.put(schema)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        assert not self._errors, "schemas not dropped:\n" + "\n".join(self._errors)

    def _run(self) -> None:
        import psycopg

        conn = None
        while (schema := self._queue.get()) is not None:
            try:
                if conn is None or conn.closed:
                    conn = psycopg.connect(self.pg_url, autocommit=True)
                    conn.execute("SET lock_timeout = '10s'")
                self._drop(conn, schema)
            except Exception as err:  # keep dropping the others; reported by close()
                self._errors.append(f"{schema}: {err!r}")
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()

    @staticmethod
    def _drop(conn: Any, schema: str) -> None:
        import psycopg

        for attempt in range(3):
            # The test ended its connections (application_name = schema); an app it left
            # running may have opened another since: end those too, or the DROP waits.
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s AND pid <> pg_backend_pid()",
                (schema,),
            )
            try:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')  # our names
                return
            except psycopg.errors.LockNotAvailable:
                if attempt == 2:
                    raise


class SchemaMaker:
    """Makes migrated schemas on a thread of its own, `depth` ahead of `take`."""

    def __init__(self, pg_url: str, script: str, depth: int = 2) -> None:
        import queue

        self.pg_url = pg_url
        self.script = script
        self._ready: queue.Queue[str] = queue.Queue()
        self._wanted = threading.Semaphore(depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="schema-maker", daemon=True)
        self._thread.start()

    def take(self) -> str:
        import queue

        try:
            name = self._ready.get_nowait()
        except queue.Empty:
            name = self.make()  # the thread is behind (or failed): make one here
        else:
            self._wanted.release()  # make the next one
        return name

    def make(self) -> str:
        import psycopg

        name = f"cv_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.pg_url, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')  # our name, not input
        try:
            with psycopg.connect(schema_url(self.pg_url, name), autocommit=True) as conn:
                conn.execute(self.script)  # no parameters: the simple protocol
        except BaseException:
            with psycopg.connect(self.pg_url, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
            raise
        return name

    def close(self) -> list[str]:
        """Stop; the schemas made and never taken."""
        import queue

        self._stop.set()
        self._wanted.release()
        self._thread.join()
        left = []
        while True:
            try:
                left.append(self._ready.get_nowait())
            except queue.Empty:
                return left

    def _run(self) -> None:
        while True:
            self._wanted.acquire()
            if self._stop.is_set():
                return
            try:
                self._ready.put(self.make())
            except Exception:  # noqa: S112 - take() makes its own and raises the error there
                return
