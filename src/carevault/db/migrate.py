"""Apply Alembic migrations programmatically (used by `carevault init`, `serve` and tests).

Two databases, each with its own migrations: the key vault (`vault_migrations`, the wrapped data
keys) and the data database (`migrations`, everything else). The vault goes first, so that data
keys that an older release kept in the data database can be moved into it before the data
database's migration drops their table.
"""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, inspect, pool, select

from carevault.config import KEY_VAULT_FILE, Settings
from carevault.db.engine import sync_url
from carevault.db.tables import data_keys

MIGRATIONS = Path(__file__).parent / "migrations"
VAULT_MIGRATIONS = Path(__file__).parent / "vault_migrations"
# The vault may share a PostgreSQL server (another database or schema) with the data: its own
# version table keeps the two migration histories apart.
VAULT_VERSION_TABLE = "vault_alembic_version"


def alembic_config(settings: Settings) -> Config:
    return _config(settings.sqlalchemy_url, MIGRATIONS)


def vault_alembic_config(settings: Settings) -> Config:
    return _config(settings.key_vault_url, VAULT_MIGRATIONS, VAULT_VERSION_TABLE)


def _config(async_url: str, location: Path, version_table: str = "alembic_version") -> Config:
    config = Config()
    config.set_main_option("script_location", str(location))
    config.attributes["sqlalchemy_url"] = sync_url(async_url)
    config.attributes["version_table"] = version_table
    return config


def upgrade(settings: Settings) -> None:
    if settings.database_url is None:
        _create_private_file(settings.data_dir, "carevault.db")
    if settings.key_database_url is None:
        _create_private_file(settings.keys_dir, KEY_VAULT_FILE)
    command.upgrade(vault_alembic_config(settings), "head")
    _move_data_keys_into_vault(settings)
    command.upgrade(alembic_config(settings), "head")


def _create_private_file(directory: Path, name: str) -> None:
    # Create the file 0600 ourselves: SQLite would use the umask (usually 0644), and SQLite
    # gives the -wal and -shm files the database file's permissions.
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.close(os.open(directory / name, os.O_CREAT | os.O_WRONLY, 0o600))


def _move_data_keys_into_vault(settings: Settings) -> None:
    """Copy the wrapped data keys of a data database from before the vault (revision < 0006)
    into the vault; its migration 0006 then drops them. Re-runnable: rows already in the vault
    are kept as they are."""
    data = create_engine(sync_url(settings.sqlalchemy_url), poolclass=pool.NullPool)
    try:
        with data.connect() as conn:
            if not inspect(conn).has_table(data_keys.name):
                return
            rows = [dict(row._mapping) for row in conn.execute(select(data_keys))]
    finally:
        data.dispose()
    if not rows:
        return
    vault = create_engine(sync_url(settings.key_vault_url), poolclass=pool.NullPool)
    try:
        with vault.begin() as conn:
            present = set(conn.execute(select(data_keys.c.scope)).scalars())
            missing = [row for row in rows if row["scope"] not in present]
            if missing:
                conn.execute(data_keys.insert(), missing)
    finally:
        vault.dispose()
