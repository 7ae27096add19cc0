"""Migrations build exactly the tables the code defines, on SQLite and PostgreSQL, in the
data database and in the key vault."""

from __future__ import annotations

import os
import stat

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect, select, text

from carevault.config import Settings
from carevault.db import migrate
from carevault.db.engine import create_engine as create_async
from carevault.db.engine import dispose, sync_url
from carevault.db.tables import data_keys, metadata, vault_metadata


@pytest.mark.parametrize(
    ("which", "tables", "version_table"),
    [
        ("data", metadata, "alembic_version"),
        ("vault", vault_metadata, migrate.VAULT_VERSION_TABLE),
    ],
)
def test_migrated_schema_matches_table_definitions(settings, which, tables, version_table):
    url = settings.sqlalchemy_url if which == "data" else settings.key_vault_url
    engine = create_engine(sync_url(url))
    try:
        inspector = inspect(engine)
        assert set(inspector.get_table_names()) - {version_table} == set(tables.tables)
        for name, table in tables.tables.items():
            columns = {c["name"] for c in inspector.get_columns(name)}
            assert columns == {c.name for c in table.columns}, name
    finally:
        engine.dispose()


def test_embedded_key_vault_is_a_private_file_apart_from_the_data(settings):
    vault = settings.keys_dir / "data-keys.db"
    assert settings.key_vault_url.endswith(str(vault.resolve()))
    assert stat.S_IMODE(os.stat(vault).st_mode) == 0o600
    assert settings.key_vault_url != settings.sqlalchemy_url


def test_the_vault_may_not_be_the_data_database(tmp_path):
    url = f"sqlite:///{tmp_path / 'one.db'}"
    with pytest.raises(ValueError, match="key_database_url"):
        Settings(data_dir=tmp_path, database_url=url, key_database_url=url)


def test_data_keys_of_an_older_release_move_into_the_vault(settings):
    """An instance from before the vault kept `data_keys` in the data database (revision
    0005): the upgrade copies them into the vault, then drops them from the data database."""
    row = {
        "scope": "patient:legacy",
        "wrapped": b"wrapped-by-the-kek",
        "kek_key_id": 7,
        "created_at": 1.0,
        "destroyed_at": None,
    }
    command.downgrade(migrate.alembic_config(settings), "0005")
    engine = create_engine(sync_url(settings.sqlalchemy_url))
    try:
        with engine.begin() as conn:
            conn.execute(data_keys.insert(), [row])
    finally:
        engine.dispose()

    migrate.upgrade(settings)
    migrate.upgrade(settings)  # re-runnable: the row is neither lost nor doubled

    vault = create_engine(sync_url(settings.key_vault_url))
    data = create_engine(sync_url(settings.sqlalchemy_url))
    try:
        with vault.connect() as conn:
            moved = [dict(r._mapping) for r in conn.execute(select(data_keys))]
        assert moved == [row]
        assert "data_keys" not in inspect(data).get_table_names()
    finally:
        vault.dispose()
        data.dispose()


async def test_sqlite_runs_in_wal_with_foreign_keys(settings):
    if settings.database_url:
        return  # PostgreSQL: nothing to check here
    engine = create_async(settings)  # the data database
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
            assert (await conn.execute(text("PRAGMA foreign_keys"))).scalar() == 1
            assert (await conn.execute(text("PRAGMA synchronous"))).scalar() == 2  # FULL
    finally:
        await dispose(engine)


def test_upgrade_is_idempotent(settings):
    migrate.upgrade(settings)
    migrate.upgrade(settings)
