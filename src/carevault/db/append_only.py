"""Database triggers that make the audit tables append-only: UPDATE and DELETE (and, on
PostgreSQL, TRUNCATE) are refused whoever asks. They stop mistakes and application bugs; an
owner who drops them is caught by the hash chain and the signed checkpoints instead.

Retention (`audit/retention.py`) is the one path that removes rows: it lifts the triggers for
its own transaction only (DDL is transactional on both databases), so a failure leaves them on.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.engine import Connection

from carevault.db.tables import AUDIT_TABLES

MESSAGE = "audit tables are append-only"

_PG_FUNCTION = f"""
CREATE OR REPLACE FUNCTION carevault_audit_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION '{MESSAGE}' USING ERRCODE = 'insufficient_privilege';
END
$$ LANGUAGE plpgsql
"""


def create_statements(dialect: str, tables: tuple[str, ...] = AUDIT_TABLES) -> list[str]:
    if dialect == "postgresql":
        statements = [_PG_FUNCTION]
        for table in tables:
            statements += [
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION carevault_audit_append_only()",
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION carevault_audit_append_only()",
            ]
        return statements
    statements = []
    for table in tables:
        for operation in ("UPDATE", "DELETE"):
            statements.append(
                f"CREATE TRIGGER {table}_no_{operation.lower()} BEFORE {operation} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{MESSAGE}'); END"
            )
    return statements


def drop_statements(dialect: str, tables: tuple[str, ...] = AUDIT_TABLES) -> list[str]:
    if dialect == "postgresql":
        return [
            f"DROP TRIGGER IF EXISTS {table}_{suffix} ON {table}"
            for table in tables
            for suffix in ("append_only", "no_truncate")
        ]
    return [
        f"DROP TRIGGER IF EXISTS {table}_no_{operation}"
        for table in tables
        for operation in ("update", "delete")
    ]


def create(conn: Connection, tables: tuple[str, ...] = AUDIT_TABLES) -> None:
    for statement in create_statements(conn.dialect.name, tables):
        conn.execute(text(statement))


def drop(conn: Connection, tables: tuple[str, ...] = AUDIT_TABLES) -> None:
    for statement in drop_statements(conn.dialect.name, tables):
        conn.execute(text(statement))
