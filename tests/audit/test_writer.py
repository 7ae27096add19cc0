"""Group commit's waiters: a request that goes away while its entries wait for their commit
(the client disconnected, the request timed out) cancels only its own wait. Its entries are
committed all the same, in their place in the chain, and the requests waiting beside it are
answered as if nothing happened."""

from __future__ import annotations

import asyncio

from carevault.audit.entry import AuditEntry, Outcome
from carevault.audit.log import AuditLog
from carevault.audit.writer import AuditWriter
from carevault.config import Settings
from carevault.crypto.custody import KeyCustody
from carevault.db.engine import create_engine, dispose
from tests.audit.conftest import verify_db
from tests.audit.trail import audit_documents


def _entry(name: str) -> AuditEntry:
    return AuditEntry(action="test.waiter", outcome=Outcome.permit, resource_id=name)


async def test_a_cancelled_waiter_leaves_its_entries_and_its_neighbours_committed(
    settings: Settings,
) -> None:
    engine = create_engine(settings)
    trail = AuditLog(engine, KeyCustody.from_settings(settings).audit_keys)
    writer = AuditWriter(trail)
    try:
        # The first write's flush is running: the next three wait together for the one after.
        first = asyncio.create_task(writer.write([_entry("first")]))
        await asyncio.sleep(0)
        waiters = {
            name: asyncio.create_task(writer.write([_entry(name)]))
            for name in ("before", "gone", "after")
        }
        await asyncio.sleep(0)
        waiters["gone"].cancel()
        await first
        await asyncio.gather(waiters["before"], waiters["after"])
        assert waiters["gone"].cancelled()
        await writer.drain()
        written = [d["id"] for d in await audit_documents(engine, "test.waiter")]
        assert written == ["first", "before", "gone", "after"]
    finally:
        await trail.close()
        await dispose(engine)
    assert verify_db(settings).ok
