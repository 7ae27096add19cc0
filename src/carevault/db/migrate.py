"""Apply Alembic migrations programmatically (used by `carevault init`, `serve` and tests)."""

from __future__ import annotations

import os
from pathlib import Path

from alembic import command
from alembic.config import Config

from carevault.config import Settings
from carevault.db.engine import sync_url

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config(settings: Settings) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["sqlalchemy_url"] = sync_url(settings)
    return config


def upgrade(settings: Settings) -> None:
    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Create the file 0600 ourselves: SQLite would use the umask (usually 0644), and
        # SQLite gives the -wal and -shm files the database file's permissions.
        db_file = settings.data_dir / "carevault.db"
        os.close(os.open(db_file, os.O_CREAT | os.O_WRONLY, 0o600))
    command.upgrade(alembic_config(settings), "head")
