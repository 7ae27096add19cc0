"""Browser-session tests: a browser is an https client of the app with its own cookie jar
(the session cookie is Secure, so it never travels over plain http)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from carevault.config import Settings
from carevault.identity.web.sessions import COOKIE
from tests.conftest import STRONG_PASSWORD, FakeClock

PROBLEM = "application/problem+json"
BROWSER_AGENT = "Mozilla/5.0 (X11; Linux x86_64) PortalTest/1.0"


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM, response.headers
    body = response.json()
    assert body["status"] == status and body["title"] and body["type"]
    return body


def set_cookies(response: httpx.Response) -> list[str]:
    return response.headers.get_list("set-cookie")


class Browser:
    """One browser: its cookie jar and the CSRF token the last login answered."""

    def __init__(self, app: Any, user_agent: str = BROWSER_AGENT) -> None:
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="https://testserver",
            headers={"User-Agent": user_agent},
        )
        self.csrf: str | None = None

    @property
    def cookie(self) -> str | None:
        return self.client.cookies.get(COOKIE)

    def guarded(self, **headers: str) -> dict[str, str]:
        return {"X-CSRF-Token": self.csrf or "", **headers}

    async def login(
        self, username: str, password: str = STRONG_PASSWORD, expect: int = 200
    ) -> httpx.Response:
        headers = self.guarded() if self.csrf else {}
        response = await self.client.post(
            "/auth/session/login",
            json={"username": username, "password": password},
            headers=headers,
        )
        assert response.status_code == expect, response.text
        if expect == 200:
            self.csrf = response.json()["csrf_token"]
        return response

    async def mfa(self, code: str, method: str = "totp", expect: int = 200) -> httpx.Response:
        response = await self.client.post(
            "/auth/session/mfa", json={"method": method, "code": code}, headers=self.guarded()
        )
        assert response.status_code == expect, response.text
        if expect == 200:
            self.csrf = response.json()["csrf_token"]
        return response

    async def info(self) -> httpx.Response:
        return await self.client.get("/auth/session")

    async def logout(self) -> httpx.Response:
        return await self.client.post("/auth/session/logout", headers=self.guarded())


@pytest.fixture
async def browsers() -> AsyncIterator[Any]:
    """Make browsers for an app; all are closed after the test."""
    stack = contextlib.AsyncExitStack()

    async def make(app: Any, user_agent: str = BROWSER_AGENT) -> Browser:
        browser = Browser(app, user_agent)
        await stack.enter_async_context(browser.client)
        return browser

    async with stack:
        yield make


async def with_cookie(app: Any, value: str, method: str, path: str, **kwargs: Any) -> Any:
    """One request carrying exactly this session cookie value, from a fresh client."""
    headers = {"Cookie": f"{COOKIE}={value}", **kwargs.pop("headers", {})}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="https://testserver"
    ) as client:
        return await client.request(method, path, headers=headers, **kwargs)


@pytest.fixture
def web_clock() -> FakeClock:
    return FakeClock(1_800_000_000.0)  # the start of a 30-second step: TOTP windows are exact


@pytest.fixture
async def web(harness_factory: Any, settings: Settings, web_clock: FakeClock) -> Any:
    """A harness with MFA off (make_settings) and the server on `web_clock`."""
    return await harness_factory(settings, web_clock)


@pytest.fixture
async def web_mfa(harness_factory: Any, settings_factory: Any, web_clock: FakeClock) -> Any:
    """A harness where staff roles must have a second factor (the shipped default)."""
    mfa_settings = settings_factory(mfa_required_roles=list(Settings().mfa_required_roles))
    return await harness_factory(mfa_settings, web_clock)
