"""Security events (login ok/failed/locked, refresh reuse, logout-all, key rotation, ...).

An interim table that the audit trail takes over. Entries never hold a password, a token, a
username or anything clinical: an attempted username appears only as a keyed hash.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from carevault.db.engine import write_transaction
from carevault.db.tables import security_events


@dataclass
class SecurityEvent:
    event: str
    outcome: str  # success | failure | denied | alert
    user_id: str | None = None
    client_id: str | None = None
    subject_hash: str | None = None
    source_address: str | None = None
    request_id: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


class SecurityEventLog:
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine

    async def record(self, event: SecurityEvent) -> None:
        async with write_transaction(self._engine) as conn:
            await conn.execute(
                insert(security_events).values(
                    occurred_at=dt.datetime.now(dt.UTC),
                    event=event.event,
                    outcome=event.outcome,
                    user_id=event.user_id,
                    client_id=event.client_id,
                    subject_hash=event.subject_hash,
                    source_address=event.source_address,
                    request_id=event.request_id,
                    details=event.details or None,
                )
            )
