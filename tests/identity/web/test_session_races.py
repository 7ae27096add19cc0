"""Browser sessions ended by requests in flight at the same time: a session ends once and one
request says so; a logout never takes credit for a session a rotation ended; logout-all ends
the session a parallel rotation started. On SQLite and PostgreSQL; the interleavings are
forced with a lock the test holds on the session's row."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import select

from carevault.db.engine import write_transaction
from carevault.db.tables import browser_sessions
from carevault.identity.authentication import RequestContext
from carevault.identity.roles import Role
from carevault.identity.web.sessions import ACTIVE, BrowserSession, SessionGone
from tests.audit.trail import audit_documents
from tests.identity.web.conftest import with_cookie
from tests.lock_waits import until_queued

PARALLEL = 10
CTX = RequestContext(address="192.0.2.10", device="Race/1.0")


async def _live_ids(services: Any, user_id: str) -> list[str]:
    async with services.engine.connect() as conn:
        return list(
            (
                await conn.execute(
                    select(browser_sessions.c.id).where(
                        browser_sessions.c.user_id == user_id,
                        browser_sessions.c.ended_at.is_(None),
                    )
                )
            ).scalars()
        )


async def _active_session(web: Any, username: str) -> BrowserSession:
    user = await web.add_user(username, Role.patient)
    session, _ = await web.services.browser_sessions.start(CTX, state=ACTIVE, user_id=user.id)
    return session  # type: ignore[no-any-return]


async def test_parallel_logouts_record_one_session_end(web: Any, browsers: Any) -> None:
    """One cookie, ten logouts at once (a double-clicking browser, a replaying attacker): each
    is answered, and the trail has one session_ended. Each logout read the session live; on
    PostgreSQL their UPDATEs then queued on the row and, unchecked, all nine losers also
    reported the end."""
    await web.add_user("pat.logout", Role.patient)
    browser = await browsers(web.app)
    await browser.login("pat.logout")
    cookie, csrf = browser.cookie, browser.csrf
    assert cookie is not None and csrf is not None

    responses = await asyncio.gather(
        *(
            with_cookie(
                web.app, cookie, "POST", "/auth/session/logout", headers={"X-CSRF-Token": csrf}
            )
            for _ in range(PARALLEL)
        )
    )

    assert {r.status_code for r in responses} <= {204, 401}, [r.text for r in responses]
    assert 204 in {r.status_code for r in responses}
    ended = await audit_documents(web.services.engine, "security.session_ended")
    assert len(ended) == 1, ended
    assert (await browser.info()).status_code == 401


async def test_parallel_ends_of_one_session_have_one_winner(web: Any) -> None:
    sessions = web.services.browser_sessions
    session = await _active_session(web, "pat.ends")

    results = await asyncio.gather(*(sessions.end(session.id, "logout") for _ in range(PARALLEL)))

    winners = [r for r in results if r is not None]
    assert [w.id for w in winners] == [session.id]
    assert await _live_ids(web.services, session.user_id) == []


@pytest.fixture
async def held_row(web: Any) -> Any:
    """Hold the lock of a session's row in a transaction of the test's own (on SQLite: the
    write lock), so that the calls started meanwhile queue behind it in a known order."""

    class Held:
        def __init__(self) -> None:
            self.release = asyncio.Event()
            self.holding = asyncio.Event()

        async def hold(self, session_id: str) -> None:
            async with write_transaction(web.services.engine) as conn:
                await conn.execute(
                    select(browser_sessions.c.id)
                    .where(browser_sessions.c.id == session_id)
                    .with_for_update()
                )
                self.holding.set()
                await self.release.wait()

    return Held()


async def test_a_logout_does_not_take_credit_for_a_rotated_session(web: Any, held_row: Any) -> None:
    """A rotation (the login's second factor, say) ends the session and starts its successor;
    a logout of the old session queued behind it must then find nothing to end, not report
    the session ended by itself (a second session_ended, with the wrong reason)."""
    sessions = web.services.browser_sessions
    old = await _active_session(web, "pat.rotate")
    holder = asyncio.create_task(held_row.hold(old.id))
    await held_row.holding.wait()
    rotating = asyncio.create_task(sessions.rotate(old, CTX, state=ACTIVE, user_id=old.user_id))
    await until_queued(web.services.engine, [rotating])
    ending = asyncio.create_task(sessions.end(old.id, "logout"))
    await until_queued(web.services.engine, [rotating, ending])
    held_row.release.set()
    await holder

    successor, _ = await rotating
    assert await ending is None
    assert await _live_ids(web.services, old.user_id) == [successor.id]


async def test_logout_all_ends_the_session_a_parallel_rotation_started(
    web: Any, held_row: Any
) -> None:
    """Logout-all queued behind a rotation of one of the user's sessions: the successor the
    rotation commits is a live session of the user too and must end with the rest. The ids
    read before the rotation committed do not name it."""
    sessions = web.services.browser_sessions
    old = await _active_session(web, "pat.everywhere")
    other, _ = await sessions.start(CTX, state=ACTIVE, user_id=old.user_id)
    holder = asyncio.create_task(held_row.hold(old.id))
    await held_row.holding.wait()
    rotating = asyncio.create_task(sessions.rotate(old, CTX, state=ACTIVE, user_id=old.user_id))
    await until_queued(web.services.engine, [rotating])
    ending = asyncio.create_task(sessions.end_all(old.user_id, "logout_all"))
    await until_queued(web.services.engine, [rotating, ending])
    held_row.release.set()
    await holder

    try:
        successor, _ = await rotating
    except SessionGone:  # ended by the logout-all first: as good
        successor = None
    ended = await ending
    assert await _live_ids(web.services, old.user_id) == []
    expected = {other.id, successor.id if successor is not None else old.id}
    assert set(ended) == expected
