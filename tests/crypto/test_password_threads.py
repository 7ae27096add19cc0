"""Password hashing runs on threads of its own at a lower CPU priority, so that a login storm
takes the CPU the request threads leave (bench/README.md: the read-during-login-storm p99)."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

from carevault.crypto.passwords import HASHING_NICENESS, PasswordHasher
from tests.conftest import make_settings

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="a thread's own nice value")


async def test_hashing_runs_off_the_loop_at_a_lower_priority(tmp_path: Path) -> None:
    hasher = PasswordHasher(make_settings(tmp_path))
    seen: dict[str, int] = {}
    original = hasher.hash_sync

    def observed(password: str) -> str:
        tid = threading.get_native_id()
        seen["tid"] = tid
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, tid)
        return original(password)

    hasher.hash_sync = observed  # type: ignore[method-assign]
    try:
        await hasher.hash("correct horse battery staple")
    finally:
        hasher.close()
    loop_tid = threading.get_native_id()
    loop_nice = os.getpriority(os.PRIO_PROCESS, loop_tid)
    assert seen["tid"] != loop_tid
    if loop_nice < 19:  # already the lowest priority: nothing lower to take
        assert seen["nice"] > loop_nice
    assert seen["nice"] == min(loop_nice + HASHING_NICENESS, 19)
