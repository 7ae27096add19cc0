"""Shared fixtures: a fresh carevault per test, on SQLite and (when one answers) PostgreSQL.

Every test that takes `services`, `app` or `client` runs once per store: `sqlite` always,
`postgresql` when CAREVAULT_TEST_DATABASE_URL is set (`make test` sets it when a server answers
on 127.0.0.1:5432), otherwise that case is skipped with the reason in the summary. Each case
gets its own data directory and a clean schema, migrated by the real Alembic migrations.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from carevault.app import create_app
from carevault.config import Settings
from carevault.db import migrate
from carevault.identity.roles import Role
from carevault.runtime import Services, build_services, ensure_key_material

PG_URL = os.environ.get("CAREVAULT_TEST_DATABASE_URL")
REDIS_URL = os.environ.get("CAREVAULT_TEST_REDIS_URL")
PG_SKIP = (
    "PostgreSQL not available: CAREVAULT_TEST_DATABASE_URL is not set "
    "(no server answered on 127.0.0.1:5432)"
)
REDIS_SKIP = (
    "Redis not available: CAREVAULT_TEST_REDIS_URL is not set "
    "(no server answered on 127.0.0.1:6379)"
)

STRONG_PASSWORD = "correct-Horse-battery-staple-91"


class FakeClock:
    """An injectable wall clock: tests move time instead of sleeping."""

    def __init__(self, start: float | None = None) -> None:
        import time

        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest) -> str:
    if request.param == "postgresql" and not PG_URL:
        pytest.skip(PG_SKIP)
    return request.param


@pytest.fixture
def pg_schema() -> Iterator[Any]:
    """A factory of fresh PostgreSQL schemas, dropped after the test."""
    import psycopg

    created: list[str] = []

    def make() -> str:
        assert PG_URL
        name = f"cv_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')  # name is ours, not input
        created.append(name)
        # The application name marks this test's connections for the teardown below.
        return f"{PG_URL}?application_name={name}&options=-csearch_path%3D{name}"

    yield make
    if created:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            for name in created:
                # A test's app may still hold a connection mid-transaction (a background
                # checkpoint caught by the end of the test, its event loop no longer running):
                # end those, or the DROP waits for them forever.
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
                conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def make_settings(data_dir: Path, database_url: str | None = None, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": database_url,
        "key_reload_interval_seconds": 0.05,
        "issuer_url": "http://testserver",
        # MFA is on by default for staff roles; tests of other features log in with passwords
        # alone. tests/identity/mfa/ runs with the shipped default and checks it.
        "mfa_required_roles": [],
    }
    values.update(overrides)
    settings = Settings(**values)
    ensure_key_material(settings)
    migrate.upgrade(settings)
    return settings


@pytest.fixture
def settings_factory(store: str, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """Build migrated settings for this store; extra keyword arguments override defaults."""

    def factory(**overrides: Any) -> Settings:
        data_dir = tmp_path / f"var-{uuid.uuid4().hex[:8]}"
        database_url = None
        if store == "postgresql":
            database_url = request.getfixturevalue("pg_schema")()
        return make_settings(data_dir, database_url, **overrides)

    return factory


@pytest.fixture
def settings(settings_factory: Any) -> Settings:
    return settings_factory()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def services(settings: Settings) -> AsyncIterator[Services]:
    built = build_services(settings)
    await built.start()
    try:
        yield built
    finally:
        await built.close()


class Harness:
    """One running app (in-process ASGI) with an HTTP client and helpers that act as a client."""

    def __init__(self, app: Any, services: Services, client: httpx.AsyncClient) -> None:
        self.app = app
        self.services = services
        self.client = client

    async def add_user(
        self,
        username: str,
        role: Role = Role.physician,
        password: str = STRONG_PASSWORD,
        **links: Any,
    ) -> Any:
        if role is Role.patient and "patient_id" not in links:
            links["patient_id"] = f"pat-{username}"
        return await self.services.accounts.add_user(username, password, role, **links)

    async def login(
        self, username: str, password: str = STRONG_PASSWORD, expect: int = 200
    ) -> dict[str, Any]:
        response = await self.client.post(
            "/auth/login", json={"username": username, "password": password}
        )
        assert response.status_code == expect, response.text
        return response.json()

    async def me(self, access_token: str) -> httpx.Response:
        return await self.client.get(
            "/auth/me", headers={"Authorization": f"Bearer {access_token}"}
        )

    async def refresh(self, refresh_token: str) -> httpx.Response:
        return await self.client.post("/auth/refresh", json={"refresh_token": refresh_token})


@pytest.fixture
async def harness_factory() -> AsyncIterator[Any]:
    """Start apps for given settings (and optional clock); all are shut down after the test."""
    import contextlib

    stack = contextlib.AsyncExitStack()

    async def start(settings: Settings, clock: Any = None) -> Harness:
        built = build_services(settings, clock) if clock is not None else build_services(settings)
        app = create_app(settings, built)
        await stack.enter_async_context(app.router.lifespan_context(app))
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        )
        await stack.enter_async_context(client)
        return Harness(app, built, client)

    async with stack:
        yield start


@pytest.fixture
async def harness(harness_factory: Any, settings: Settings) -> Harness:
    return await harness_factory(settings)


@pytest.fixture
async def clocked(harness_factory: Any, settings: Settings, clock: FakeClock) -> Harness:
    """A harness whose server-side clock is `clock`."""
    return await harness_factory(settings, clock)


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
