"""Recovery codes: ten single-use codes shown once, for a user who lost their authenticator.

Each code is 12 characters from a 32-letter alphabet (60 bits), grouped `xxxx-xxxx-xxxx`.
Only a keyed hash (the instance's HMAC key, bound to the user) is stored: at 60 random bits a
slow password hash adds nothing against guessing, and the key keeps a database dump from being
checked offline at all. A code is spent by the same statement that checks it is unspent.
Generating a new set deletes the old one.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from carevault.crypto.instance_secrets import InstanceSecrets
from carevault.db.engine import write_transaction
from carevault.db.key_reads import read_by_key
from carevault.db.tables import recovery_codes

COUNT = 10
ALPHABET = "abcdefghijkmnpqrstuvwxyz23456789"  # no l, o, 0, 1: read aloud safely
LENGTH = 12  # 12 x 5 bits
MAX_CODE_CHARS = 32
assert len(ALPHABET) == 32  # noqa: S101 - 5 bits a character


def normalize(code: str) -> str | None:
    compact = code.replace("-", "").replace(" ", "").lower()
    if len(compact) != LENGTH or any(c not in ALPHABET for c in compact):
        return None
    return compact


def _formatted(compact: str) -> str:
    return "-".join(compact[i : i + 4] for i in range(0, LENGTH, 4))


_REMAINING = (
    select(func.count())
    .select_from(recovery_codes)
    .where(recovery_codes.c.user_id == bindparam("user_id"), recovery_codes.c.used_at.is_(None))
)


class RecoveryCodes:
    def __init__(
        self,
        engine: AsyncEngine,
        instance_secrets: InstanceSecrets,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._secrets = instance_secrets
        self._clock = clock

    def _hash(self, user_id: str, compact: str) -> str:
        return self._secrets.keyed_hash(f"recovery-code:{user_id}:{compact}")

    async def generate(self, user_id: str) -> list[str]:
        """A new set of codes (the old set stops working); the only time they are shown."""
        codes = ["".join(secrets.choice(ALPHABET) for _ in range(LENGTH)) for _ in range(COUNT)]
        now = self._clock()
        async with write_transaction(self._engine) as conn:
            await conn.execute(delete(recovery_codes).where(recovery_codes.c.user_id == user_id))
            await conn.execute(
                insert(recovery_codes),
                [
                    {"code_hash": self._hash(user_id, c), "user_id": user_id, "created_at": now}
                    for c in codes
                ],
            )
        return [_formatted(c) for c in codes]

    async def use(self, user_id: str, code: str) -> bool:
        """Spend a code; False when it is wrong or already spent."""
        compact = normalize(code[:MAX_CODE_CHARS])
        if compact is None:
            return False
        async with write_transaction(self._engine) as conn:
            spent = await conn.execute(
                update(recovery_codes)
                .where(
                    recovery_codes.c.code_hash == self._hash(user_id, compact),
                    recovery_codes.c.user_id == user_id,
                    recovery_codes.c.used_at.is_(None),
                )
                .values(used_at=self._clock())
            )
        return spent.rowcount == 1

    async def remaining(self, user_id: str) -> int:
        rows = await read_by_key(self._engine, _REMAINING, {"user_id": user_id})
        return int(rows[0][0])

    async def remove_all(self, user_id: str) -> None:
        async with write_transaction(self._engine) as conn:
            await conn.execute(delete(recovery_codes).where(recovery_codes.c.user_id == user_id))
