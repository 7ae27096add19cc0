"""The access generation: a change of access facts reaches this host's workers on their next
request (memory-mapped counter) and other hosts on PostgreSQL within the poll bound."""

from __future__ import annotations

from pathlib import Path

import pytest

from carevault.access.generation import AccessGeneration, bump_in
from carevault.db.engine import create_engine, dispose, write_transaction
from carevault.tokens.signal import ChangeSignal


class Monotonic:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_same_host_sees_a_change_on_the_next_request(settings, tmp_path: Path) -> None:
    engine = create_engine(settings)
    clock = Monotonic()
    writer = AccessGeneration(engine, ChangeSignal(settings.data_dir / "access.signal"))
    reader = AccessGeneration(
        engine, ChangeSignal(settings.data_dir / "access.signal"), 30.0, clock
    )
    try:
        before = await reader.current()
        async with write_transaction(engine) as conn:
            await bump_in(conn)
        writer.changed()
        assert await reader.current() != before  # no wait, whatever the poll interval
    finally:
        writer.close()
        reader.close()
        await dispose(engine)


async def test_other_host_sees_a_change_within_the_poll_bound(
    store: str, settings, tmp_path: Path
) -> None:
    if store != "postgresql":
        pytest.skip("SQLite is one host by construction: the counter is the whole story")
    engine = create_engine(settings)
    clock = Monotonic()
    here = AccessGeneration(engine, ChangeSignal(tmp_path / "host1.signal"))
    there = AccessGeneration(engine, ChangeSignal(tmp_path / "host2.signal"), 1.0, clock)
    try:
        before = await there.current()
        async with write_transaction(engine) as conn:
            await bump_in(conn)
        here.changed()  # host 1's counter: host 2 does not share it
        clock.now += 0.5
        assert await there.current() == before  # within the bound: not yet read
        clock.now += 0.5
        assert await there.current() != before  # the bound has passed: read again
    finally:
        here.close()
        there.close()
        await dispose(engine)


async def test_a_failed_read_of_the_generation_denies(store: str, settings, tmp_path) -> None:
    if store != "postgresql":
        pytest.skip("the database row is read on PostgreSQL only")
    engine = create_engine(settings)
    generation = AccessGeneration(engine, ChangeSignal(tmp_path / "g.signal"), 0.0)
    try:
        async with write_transaction(engine) as conn:
            from sqlalchemy import delete

            from carevault.db.tables import access_generation

            await conn.execute(delete(access_generation))
        with pytest.raises(RuntimeError):
            await generation.current()
    finally:
        generation.close()
        await dispose(engine)


async def test_unreadable_access_facts_answer_503_not_data(store: str, harness) -> None:
    """Fail closed over HTTP: with the generation row gone, a FHIR request is refused (503
    OperationOutcome), not served on stale or missing facts."""
    from sqlalchemy import delete

    from carevault.db.tables import access_generation
    from carevault.identity.roles import Role

    h = harness
    h.services.access_generation._poll_seconds = 0.0  # read the row on every request
    await h.add_user("svc.gen", Role.service)
    token = (await h.login("svc.gen"))["access_token"]
    async with write_transaction(h.services.engine) as conn:
        await conn.execute(delete(access_generation))
    response = await h.client.get(
        "/fhir/Patient?_count=1", headers={"Authorization": f"Bearer {token}"}
    )
    if store == "sqlite":
        assert response.status_code == 200  # one host: the memory-mapped counter decides
    else:
        assert response.status_code == 503, response.text
        assert response.json()["resourceType"] == "OperationOutcome"


async def test_requests_that_find_the_poll_due_share_one_read(
    store: str, settings, tmp_path: Path
) -> None:
    """32 requests in flight when the poll falls due send one read, not 32; a request
    cancelled meanwhile does not cancel the others' read; a failed read fails them all."""
    import asyncio

    if store != "postgresql":
        pytest.skip("the database row is read on PostgreSQL only")
    engine = create_engine(settings)
    clock = Monotonic()
    generation = AccessGeneration(engine, ChangeSignal(tmp_path / "g.signal"), 1.0, clock)
    reads = 0
    real_read = generation._read_database

    async def counted_read() -> None:
        nonlocal reads
        reads += 1
        await asyncio.sleep(0.01)  # long enough for every request to find it in flight
        await real_read()

    generation._read_database = counted_read  # type: ignore[method-assign]
    try:
        first = await generation.current()
        assert reads == 1
        async with write_transaction(engine) as conn:
            await bump_in(conn)
        clock.now += 1.0
        requests = [asyncio.create_task(generation.current()) for _ in range(32)]
        await asyncio.sleep(0)
        requests[0].cancel()
        answers = await asyncio.gather(*requests[1:])
        assert reads == 2
        assert {answer[1] for answer in answers} == {first[1] + 1}

        async with write_transaction(engine) as conn:
            from sqlalchemy import delete

            from carevault.db.tables import access_generation

            await conn.execute(delete(access_generation))
        clock.now += 1.0
        failed = await asyncio.gather(
            *(generation.current() for _ in range(8)), return_exceptions=True
        )
        assert reads == 3
        assert all(isinstance(f, RuntimeError) for f in failed)
    finally:
        generation.close()
        await dispose(engine)


async def test_with_no_poll_interval_every_request_reads_for_itself(
    store: str, settings, tmp_path: Path
) -> None:
    """Poll interval 0 means a read per request: a request must not take the answer of a read
    begun before it arrived (it could miss a change committed in between)."""
    import asyncio

    if store != "postgresql":
        pytest.skip("the database row is read on PostgreSQL only")
    engine = create_engine(settings)
    generation = AccessGeneration(engine, ChangeSignal(tmp_path / "g.signal"), 0.0)
    reads = 0
    real_read = generation._read_database

    async def counted_read() -> None:
        nonlocal reads
        reads += 1
        await asyncio.sleep(0.01)
        await real_read()

    generation._read_database = counted_read  # type: ignore[method-assign]
    try:
        await asyncio.gather(*(generation.current() for _ in range(4)))
        assert reads == 4
    finally:
        generation.close()
        await dispose(engine)
