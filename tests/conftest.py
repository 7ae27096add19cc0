"""Shared fixtures: a fresh carevault per test, on SQLite and (when one answers) PostgreSQL.

Every test that takes `services`, `app` or `client` runs once per store: `sqlite` always,
`postgresql` when CAREVAULT_TEST_DATABASE_URL is set (`make test` sets it when a server answers
on 127.0.0.1:5432), otherwise that case is skipped with the reason in the summary. Each case
gets its own data directory and a clean schema, migrated: each pytest process runs the real
Alembic migrations once per store and copies the result into every case (tests/db_templates.py;
tests/db/ and `make_settings` migrate for themselves).
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
from tests.argon2_reuse import REUSE as ARGON2_REUSE
from tests.db_templates import MigrationTemplates, SchemaDropper, schema_url

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

# Argon2 runs at the production cost everywhere; outside these modules a process computes each
# hash and each verification once and reuses it (tests/argon2_reuse.py). These test hashing
# itself (its cost and parameters, the dummy verify's timing, hashing off the event loop), so
# every hash and verify in them is computed.
REAL_ARGON2 = (
    "tests/identity/test_login.py",
    "tests/identity/test_enumeration_timing.py",
)
ARGON2_REUSE.install()


class FakeClock:
    """An injectable wall clock: tests move time instead of sleeping."""

    def __init__(self, start: float | None = None) -> None:
        import time

        self.now = time.time() if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture(autouse=True)
def argon2_reuse(request: pytest.FixtureRequest) -> Iterator[None]:
    """Reuse of Argon2 results for this test (not in REAL_ARGON2); off again after it, so
    module- and session-scoped fixtures compute theirs."""
    ARGON2_REUSE.begin_test(enabled=request.node.nodeid.split("::")[0] not in REAL_ARGON2)
    yield
    ARGON2_REUSE.begin_test(enabled=False)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest) -> str:
    if request.param == "postgresql" and not PG_URL:
        pytest.skip(PG_SKIP)
    return request.param


@pytest.fixture(scope="session")
def schema_dropper() -> Iterator[Any]:
    """Drops test schemas on a thread of its own: a DROP SCHEMA ... CASCADE of a migrated
    schema mostly waits for the server to unlink its files, and the next test need not wait
    with it. Every schema queued is dropped before the session ends."""
    dropper = SchemaDropper(PG_URL) if PG_URL else None
    yield dropper
    if dropper is not None:
        dropper.close()


class SchemaFactory:
    """`pg_schema`: `factory()` makes a new, empty schema; `factory.migrated(templates)` takes
    a new schema already at head (None: the templates cannot make one). Either way the URL is
    the test's alone, and the schema is dropped after the test."""

    def __init__(self) -> None:
        self.created: list[str] = []

    def __call__(self) -> str:
        import psycopg

        assert PG_URL
        name = f"cv_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{name}"')  # name is ours, not input
        self.created.append(name)
        # The application name marks this test's connections for the teardown below.
        return schema_url(PG_URL, name)

    def migrated(self, templates: MigrationTemplates) -> str | None:
        assert PG_URL
        name = templates.take_pg_schema()
        if name is None:
            return None
        self.created.append(name)
        return schema_url(PG_URL, name)


@pytest.fixture
def pg_schema(schema_dropper: Any) -> Iterator[Any]:
    """A factory of fresh PostgreSQL schemas, dropped after the test."""
    import psycopg

    factory = SchemaFactory()
    yield factory
    if factory.created:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            for name in factory.created:
                # A test's app may still hold a connection mid-transaction (a background
                # checkpoint caught by the end of the test, its event loop no longer running):
                # end those, or the DROP waits for them forever.
                conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = %s AND pid <> pg_backend_pid()",
                    (name,),
                )
        for name in factory.created:
            schema_dropper.drop(name)


def _settings(data_dir: Path, database_url: str | None = None, **overrides: Any) -> Settings:
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
    return Settings(**values)


def make_settings(data_dir: Path, database_url: str | None = None, **overrides: Any) -> Settings:
    """Settings for `data_dir` (and `database_url`, else SQLite), with key material, migrated
    by the real migrations (databases that are already at head are left as they are)."""
    settings = _settings(data_dir, database_url, **overrides)
    ensure_key_material(settings)
    migrate.upgrade(settings)
    return settings


@pytest.fixture(scope="session")
def migration_templates(
    tmp_path_factory: pytest.TempPathFactory, schema_dropper: Any
) -> Iterator[MigrationTemplates]:
    """This process's migrated databases (tests/db_templates.py), built on first use."""
    templates = MigrationTemplates(tmp_path_factory.mktemp("migration-templates"), PG_URL)
    yield templates
    for name in templates.close():  # schemas made ahead and never taken
        schema_dropper.drop(name)


@pytest.fixture
def migration_templates_enabled() -> bool:
    """Whether `settings_factory` copies migrated templates (tests/db/ says no)."""
    return True


def templated_settings(
    templates: MigrationTemplates,
    data_dir: Path,
    database_url: str | None = None,
    database_at_head: bool = False,
    **overrides: Any,
) -> Settings:
    """`make_settings` for a new data directory and either SQLite or `database_url`, a new
    schema that `pg_schema.migrated` brought to head (`database_at_head`): the same settings,
    key material and databases, the SQLite ones copied from this process's templates.
    Whatever the templates do not cover (a vault elsewhere) is migrated as make_settings does."""
    settings = _settings(data_dir, database_url, **overrides)
    ensure_key_material(settings)
    migrated = True
    if settings.database_url is None:
        templates.copy_sqlite_data(settings)
    elif not (database_at_head and settings.database_url == database_url):
        migrated = False
    if settings.key_database_url is None:
        templates.copy_sqlite_vault(settings)
    else:
        migrated = False
    if not migrated:
        migrate.upgrade(settings)
    return settings


@pytest.fixture
def settings_factory(
    store: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
    migration_templates_enabled: bool,
) -> Any:
    """Build migrated settings for this store; extra keyword arguments override defaults."""

    def factory(**overrides: Any) -> Settings:
        data_dir = tmp_path / f"var-{uuid.uuid4().hex[:8]}"
        if not migration_templates_enabled:
            database_url = None
            if store == "postgresql":
                database_url = request.getfixturevalue("pg_schema")()
            return make_settings(data_dir, database_url, **overrides)
        templates = request.getfixturevalue("migration_templates")
        if store != "postgresql":
            return templated_settings(templates, data_dir, None, **overrides)
        schemas = request.getfixturevalue("pg_schema")
        at_head = schemas.migrated(templates)
        if at_head is not None:
            return templated_settings(templates, data_dir, at_head, True, **overrides)
        return make_settings(data_dir, schemas(), **overrides)

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
