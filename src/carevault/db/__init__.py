"""Storage: engine and connections, table definitions, Alembic migrations."""
