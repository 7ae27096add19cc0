"""Migrations build exactly the tables the code defines, on SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import create_engine, inspect, text

from carevault.db.engine import create_engine as create_async
from carevault.db.engine import sync_url
from carevault.db.tables import metadata


def test_migrated_schema_matches_table_definitions(settings):
    engine = create_engine(sync_url(settings))
    try:
        inspector = inspect(engine)
        tables = set(inspector.get_table_names()) - {"alembic_version"}
        assert tables == set(metadata.tables)
        for name, table in metadata.tables.items():
            columns = {c["name"] for c in inspector.get_columns(name)}
            assert columns == {c.name for c in table.columns}, name
    finally:
        engine.dispose()


async def test_sqlite_runs_in_wal_with_foreign_keys(settings):
    if settings.database_url:
        return  # PostgreSQL: nothing to check here
    engine = create_async(settings)
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
            assert (await conn.execute(text("PRAGMA foreign_keys"))).scalar() == 1
            assert (await conn.execute(text("PRAGMA synchronous"))).scalar() == 2  # FULL
    finally:
        await engine.dispose()


def test_upgrade_is_idempotent(settings):
    from carevault.db import migrate

    migrate.upgrade(settings)
    migrate.upgrade(settings)
