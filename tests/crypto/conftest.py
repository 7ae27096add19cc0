"""Helpers for the data-at-rest tests: more service instances on one database."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from carevault.config import Settings
from carevault.runtime import Services, build_services
from tests.conftest import copy_tree, make_settings


def other_host_settings(first: Settings, data_dir: Path, **overrides: Any) -> Settings:
    """Another host on the same database and key vault: its own data directory (so no shared
    change counter) holding a copy of the first one's key files."""
    copy_tree(first.keys_dir, data_dir / "keys")
    database_url = first.database_url or f"sqlite:///{first.data_dir.resolve() / 'carevault.db'}"
    overrides.setdefault("key_database_url", first.key_vault_url)
    return make_settings(data_dir, database_url, **overrides)


@pytest.fixture
async def instances() -> AsyncIterator[Any]:
    """Start extra `Services` for given settings (another process or a restart); all are
    closed after the test."""
    stack = contextlib.AsyncExitStack()

    async def start(settings: Settings) -> Services:
        built = build_services(settings)
        await built.start()
        stack.push_async_callback(built.close)
        return built

    async with stack:
        yield start
