"""Argon2id at the production cost, computed once per pytest process instead of in every test.

The tests hash and verify a handful of passwords thousands of times (every `add_user`, every
login, every service start's dummy hash), each ~20-50 ms of CPU at the OWASP parameters the
settings insist on. This module keeps those parameters and the hashes real, and only avoids
computing the same thing twice in one process:

* `verify(hash, password)` depends on nothing else, so its answer (a match or a mismatch) is
  remembered; other outcomes (a malformed hash...) are not, and are computed each time.
* `hash(password)` returns, for the n-th hash of that password with those parameters within a
  test, the n-th hash made for them in this process (made the first time it is needed, with a
  random salt as always). Within a test every hash is still distinct (its own salt), exactly as
  without reuse; across tests, which never share a database, the same strings come back. An
  explicit `salt=` is never reused.

Timing is what changes, so the tests of hashing itself (its cost, its parameters, running off
the event loop, unknown users costing as much as known ones) run without reuse: see
`REAL_ARGON2` in tests/conftest.py. Hashes made in other processes (CLI subprocesses, servers
of tests/e2e) are not touched.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import argon2
from argon2.exceptions import VerifyMismatchError

_original_hash = argon2.PasswordHasher.hash
_original_verify = argon2.PasswordHasher.verify


class Argon2Reuse:
    def __init__(self) -> None:
        self.enabled = False
        self._lock = threading.Lock()
        self._hashes: dict[tuple[Any, ...], dict[int, str]] = {}
        self._uses: Counter[tuple[Any, ...]] = Counter()  # hashes handed out in this test
        # (hash, password) -> None for a match, else the mismatch error's arguments
        self._verdicts: dict[tuple[bytes, bytes], tuple[Any, ...] | None] = {}
        self.computed = 0  # Argon2 runs made (statistics for the curious)
        self.reused = 0

    def begin_test(self, enabled: bool) -> None:
        with self._lock:
            self.enabled = enabled
            self._uses.clear()

    def install(self) -> None:
        reuse = self

        def hash(
            self: argon2.PasswordHasher, password: str | bytes, *, salt: bytes | None = None
        ) -> str:
            if salt is not None or not reuse.enabled:
                return _original_hash(self, password, salt=salt)
            return reuse._hash(self, password)

        def verify(self: argon2.PasswordHasher, hash: str | bytes, password: str | bytes) -> Any:
            if not reuse.enabled:
                return _original_verify(self, hash, password)
            return reuse._verify(self, hash, password)

        hash.__doc__ = _original_hash.__doc__
        verify.__doc__ = _original_verify.__doc__
        argon2.PasswordHasher.hash = hash  # type: ignore[method-assign]
        argon2.PasswordHasher.verify = verify  # type: ignore[method-assign]

    def _hash(self, hasher: argon2.PasswordHasher, password: str | bytes) -> str:
        secret = password.encode(hasher.encoding) if isinstance(password, str) else password
        key = (
            secret,
            hasher.time_cost,
            hasher.memory_cost,
            hasher.parallelism,
            hasher.hash_len,
            hasher.salt_len,
            hasher.type,
        )
        with self._lock:
            index = self._uses[key]
            self._uses[key] += 1
            made = self._hashes.setdefault(key, {}).get(index)
            if made is not None:
                self.reused += 1
                return made
        made = _original_hash(hasher, password)
        with self._lock:
            self.computed += 1
            # Another thread may have made this index meanwhile: the first one stays.
            return self._hashes[key].setdefault(index, made)

    def _verify(
        self, hasher: argon2.PasswordHasher, hash: str | bytes, password: str | bytes
    ) -> Any:
        key = (
            hash.encode("ascii") if isinstance(hash, str) else bytes(hash),
            password.encode(hasher.encoding) if isinstance(password, str) else bytes(password),
        )
        with self._lock:
            known = key in self._verdicts
            mismatch = self._verdicts.get(key)
        if known:
            self.reused += 1
            if mismatch is not None:
                raise VerifyMismatchError(*mismatch)
            return True
        try:
            result = _original_verify(hasher, hash, password)
        except VerifyMismatchError as err:
            with self._lock:
                self.computed += 1
                self._verdicts[key] = err.args
            raise
        with self._lock:
            self.computed += 1
            self._verdicts[key] = None
        return result


REUSE = Argon2Reuse()
