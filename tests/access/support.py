"""Shared helpers for the pure access-control tests: the default policy, a fixed clock."""

from __future__ import annotations

import functools
from datetime import UTC, datetime

from carevault.access.policy import Policy, load_policy

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC).timestamp()


@functools.cache
def default_policy() -> Policy:
    return load_policy()


@functools.cache
def boundary_policy() -> Policy:
    return default_policy().model_copy(update={"organization_boundary": True})


def policy_for(org_boundary: bool) -> Policy:
    return boundary_policy() if org_boundary else default_policy()
