"""Argon2id password hashing (argon2-cffi), run off the event loop.

Hashing is deliberately slow (~20-50 ms), so it runs on a bounded thread pool of its own:
argon2 releases the GIL, and a login storm then queues behind other logins instead of
starving the threads that database drivers and request handlers rely on. Its threads also run
at a lower CPU priority (nice +10, on Linux where a thread has its own): a storm of logins,
a credential-stuffing run among them, takes the CPU the request threads leave, not the CPU
they need (measured: p99 of a FHIR read during a login storm on two workers, bench/README.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from argon2 import PasswordHasher as _Argon2
from argon2 import Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from carevault.config import Settings

HASHING_NICENESS = 10


def lower_priority() -> None:
    """Give the calling thread a lower CPU priority (a thread's own nice value on Linux)."""
    with contextlib.suppress(OSError, AttributeError):  # elsewhere: the process's, or none
        if os.uname().sysname == "Linux":
            tid = threading.get_native_id()
            os.setpriority(
                os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + HASHING_NICENESS
            )


class PasswordHasher:
    """Hash and verify passwords; `verify` also says whether the stored hash needs an upgrade."""

    def __init__(self, settings: Settings) -> None:
        self._argon2 = _Argon2(
            time_cost=settings.argon2_time_cost,
            memory_cost=settings.argon2_memory_kib,
            parallelism=settings.argon2_parallelism,
            hash_len=32,
            salt_len=16,
            type=Type.ID,
        )
        threads = settings.password_hash_threads or (os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="argon2", initializer=lower_priority
        )
        # Verified against for unknown users, so that "no such user" costs as much as
        # "wrong password" and timing does not reveal which accounts exist.
        self._dummy_hash = self._argon2.hash("carevault-dummy-password-for-timing")

    def hash_sync(self, password: str) -> str:
        return self._argon2.hash(password)

    async def hash(self, password: str) -> str:
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self.hash_sync, password
        )

    def _verify_sync(self, stored_hash: str | None, password: str) -> tuple[bool, bool]:
        target = stored_hash or self._dummy_hash
        try:
            self._argon2.verify(target, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False, False
        if stored_hash is None:
            return False, False
        return True, self._argon2.check_needs_rehash(stored_hash)

    async def verify(self, stored_hash: str | None, password: str) -> tuple[bool, bool]:
        """Return (matches, needs_rehash). `stored_hash=None` burns a dummy verify."""
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, self._verify_sync, stored_hash, password
        )

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
