"""Alembic environment: runs migrations on the synchronous URL given by `carevault.db.migrate`
(also the key vault's environment: `vault_migrations/env.py` runs this file)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, event, pool

config = context.config
url = config.attributes["sqlalchemy_url"]
engine = create_engine(url, poolclass=pool.NullPool)

if url.startswith("sqlite"):

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection, _record):  # type: ignore[no-untyped-def]
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA foreign_keys=ON")


with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=None,
        render_as_batch=True,
        version_table=config.attributes.get("version_table", "alembic_version"),
    )
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
