"""Idle and absolute limits of a browser session, on the server's injected clock, and the ends
that come from elsewhere (logout-all). On SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import select

from carevault.db.tables import browser_sessions
from carevault.identity.roles import Role
from tests.identity.web.conftest import assert_problem


async def _ended_reason(services: Any) -> str | None:
    async with services.engine.connect() as conn:
        return (await conn.execute(select(browser_sessions.c.ended_reason))).scalar_one()


async def test_idle_timeout(web: Any, browsers: Any, web_clock: Any) -> None:
    await web.add_user("pat.idle", Role.patient)
    browser = await browsers(web.app)
    await browser.login("pat.idle")
    web_clock.advance(899)
    assert (await browser.client.get("/auth/me")).status_code == 200  # in time: it counts as use
    web_clock.advance(899)
    assert (await browser.info()).status_code == 200
    web_clock.advance(901)
    assert_problem(await browser.client.get("/auth/me"), 401)
    assert_problem(await browser.info(), 401)
    assert await _ended_reason(web.services) == "idle_timeout"


@pytest.fixture
async def busy_web(harness_factory: Any, settings_factory: Any, web_clock: Any) -> Any:
    """`web` with room for 12 hours of requests on the server's clock, sent within seconds of
    real time (the rate limits count real time)."""
    settings = settings_factory(rate_limit_auth_per_address="1000/minute")
    return await harness_factory(settings, web_clock)


async def test_absolute_timeout_however_busy(busy_web: Any, browsers: Any, web_clock: Any) -> None:
    web = busy_web
    await web.add_user("pat.busy", Role.patient)
    browser = await browsers(web.app)
    await browser.login("pat.busy")
    started = web_clock()
    while web_clock() + 600 < started + 43200:
        web_clock.advance(600)  # a request every 10 minutes keeps it from going idle
        response = await browser.client.get("/auth/me")
        assert response.status_code == 200, (web_clock() - started, response.text)
    assert web_clock() - started == 43200 - 600
    web_clock.advance(600)  # 12 hours after the login
    assert_problem(await browser.client.get("/auth/me"), 401)
    assert_problem(await browser.info(), 401)
    assert await _ended_reason(web.services) == "absolute_timeout"


async def test_the_principal_expires_with_the_session(web: Any, browsers: Any, web_clock: Any):
    await web.add_user("pat.exp", Role.patient)
    browser = await browsers(web.app)
    await browser.login("pat.exp")
    login_time = int(web_clock())
    assert (await browser.client.get("/auth/me")).json()["expires_at"] == login_time + 900
    web_clock.advance(600)  # use moves the idle limit
    assert (await browser.client.get("/auth/me")).json()["expires_at"] == login_time + 1500


async def test_logout_all_ends_browser_sessions_too(web: Any, browsers: Any, web_clock: Any):
    await web.add_user("pat.all", Role.patient)
    browser = await browsers(web.app)
    await browser.login("pat.all")
    token = (await web.login("pat.all"))["access_token"]
    web_clock.advance(5)
    out = await web.client.post("/auth/logout-all", headers={"Authorization": f"Bearer {token}"})
    assert out.status_code == 204
    assert_problem(await browser.client.get("/auth/me"), 401)
    assert await _ended_reason(web.services) == "logout_all"  # ended at once, by name
    # a login after the cut-off is a new session that works
    web_clock.advance(1)
    await browser.login("pat.all")
    assert (await browser.client.get("/auth/me")).status_code == 200
