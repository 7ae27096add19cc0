"""A security event that cannot be recorded fails its request with 503 (never a 500, never a
success that left no trace): a login is refused, a logout is not confirmed."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, text

from carevault.db.engine import write_transaction
from carevault.db.tables import refresh_families
from tests.audit.trail import audit_documents

BLOCK_SQLITE = (
    "CREATE TRIGGER test_block_audit BEFORE INSERT ON audit_entries "
    "BEGIN SELECT RAISE(ABORT, 'blocked'); END"
)
BLOCK_PG = [
    "CREATE FUNCTION test_block_audit() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'blocked'; "
    "END $$ LANGUAGE plpgsql",
    "CREATE TRIGGER test_block_audit BEFORE INSERT ON audit_entries FOR EACH ROW "
    "EXECUTE FUNCTION test_block_audit()",
]


async def _block(engine: Any) -> None:
    async with write_transaction(engine) as conn:  # waits its turn like every writer
        if conn.dialect.name == "postgresql":
            for statement in BLOCK_PG:
                await conn.execute(text(statement))
        else:
            await conn.execute(text(BLOCK_SQLITE))


async def _unblock(engine: Any) -> None:
    async with write_transaction(engine) as conn:
        if conn.dialect.name == "postgresql":
            await conn.execute(text("DROP TRIGGER test_block_audit ON audit_entries"))
            await conn.execute(text("DROP FUNCTION test_block_audit()"))
        else:
            await conn.execute(text("DROP TRIGGER test_block_audit"))


async def test_login_is_refused_when_it_cannot_be_recorded(harness: Any) -> None:
    h = harness
    await h.add_user("alice")
    await _block(h.services.engine)
    response = await h.client.post(
        "/auth/login", json={"username": "alice", "password": _password()}
    )
    assert response.status_code == 503
    assert response.headers["content-type"].startswith("application/problem+json")
    assert "access_token" not in response.text and "Traceback" not in response.text
    async with h.services.engine.connect() as conn:  # no session was started either
        families = (await conn.execute(select(func.count()).select_from(refresh_families))).scalar()
    assert families == 0
    await _unblock(h.services.engine)
    tokens = await h.login("alice")
    assert tokens["access_token"]
    logins = await audit_documents(h.services.engine, "security.login")
    assert [d["outcome"] for d in logins] == ["permit"]  # only the one that was recorded


def _password() -> str:
    from tests.conftest import STRONG_PASSWORD

    return STRONG_PASSWORD
