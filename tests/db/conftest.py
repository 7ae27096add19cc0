"""The migration tests run `carevault.db.migrate.upgrade` on empty databases themselves: their
`settings` are not copied from the per-process templates of tests/db_templates.py."""

from __future__ import annotations

import pytest


@pytest.fixture
def migration_templates_enabled() -> bool:
    return False
