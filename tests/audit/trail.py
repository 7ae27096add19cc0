"""Reading the audit trail in tests: the stored entries as the documents they chain."""

from __future__ import annotations

from typing import Any

import orjson
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from carevault.db.tables import audit_entries


async def audit_documents(engine: AsyncEngine, action: str | None = None) -> list[dict[str, Any]]:
    """Every entry (oldest first), or those of one action (e.g. "security.login")."""
    query = select(audit_entries.c.entry).order_by(audit_entries.c.seq)
    if action is not None:
        query = query.where(audit_entries.c.action == action)
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).scalars().all()
    return [orjson.loads(row) for row in rows]
