"""Fixtures of the OAuth tests: `world` is an app with issuer https://testserver, on each store."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.oauth.support import BASE, OAuthWorld, build_oauth_world


@pytest.fixture
async def world(settings_factory: Any) -> AsyncIterator[OAuthWorld]:
    # No grace window for a refresh token retried at once: the tests replay tokens on purpose.
    settings = settings_factory(issuer_url=BASE, refresh_grace_seconds=0)
    async with contextlib.AsyncExitStack() as stack:
        yield await build_oauth_world(stack, settings)
