"""Authorization codes (RFC 6749 §4.1, with RFC 7636 PKCE): single use, 60 seconds, bound to
the client, the redirect URI and the code challenge.

Only a code's SHA-256 is stored. Consuming is one conditional update (`used_at IS NULL`), so two
workers racing on a code cannot both redeem it. A code that comes back after it was redeemed was
stolen or replayed (RFC 6749 §4.1.2): the caller ends the session it started, which revokes the
tokens issued from it (RFC 9700 §4.2.4).
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import and_, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from carevault.db.engine import write_transaction
from carevault.db.tables import oauth_codes
from carevault.tokens.refresh import hash_token

CODE_BYTES = 32
CODE_TTL_SECONDS = 60
MAX_CODE_CHARS = 128


@dataclass(frozen=True)
class AuthorizationCode:
    client_id: str
    user_id: str
    redirect_uri: str
    scope: str
    code_challenge: str
    nonce: str | None
    patient: str | None
    dpop_jkt: str | None
    amr: list[str]
    acr: str | None
    auth_time: int
    family_id: str  # the session the code starts, fixed when it is redeemed

    # authlib's AuthorizationCodeMixin
    def get_redirect_uri(self) -> str | None:
        return self.redirect_uri or None

    def get_scope(self) -> str:
        return self.scope

    def get_nonce(self) -> str | None:
        return self.nonce

    def get_auth_time(self) -> int:
        return self.auth_time


@dataclass(frozen=True)
class Redemption:
    """The outcome of presenting a code: the code, or the session a replayed code started."""

    code: AuthorizationCode | None
    replayed_family: str | None = None
    replayed_user: str | None = None


class AuthorizationCodes:
    def __init__(self, engine: AsyncEngine, clock: Callable[[], float] = time.time) -> None:
        self._engine = engine
        self._clock = clock

    async def issue(
        self,
        *,
        client_id: str,
        user_id: str,
        redirect_uri: str,
        scope: str,
        code_challenge: str,
        nonce: str | None,
        patient: str | None,
        dpop_jkt: str | None,
        amr: list[str],
        acr: str | None,
        auth_time: int,
    ) -> str:
        code = secrets.token_urlsafe(CODE_BYTES)
        now = self._clock()
        async with write_transaction(self._engine) as conn:
            # Codes live a minute: whatever expired long ago goes with each new one.
            await conn.execute(delete(oauth_codes).where(oauth_codes.c.expires_at < now - 86400))
            await conn.execute(
                insert(oauth_codes).values(
                    code_hash=hash_token(code),
                    client_id=client_id,
                    user_id=user_id,
                    redirect_uri=redirect_uri,
                    scope=scope,
                    code_challenge=code_challenge,
                    nonce=nonce,
                    patient=patient,
                    dpop_jkt=dpop_jkt,
                    amr=amr,
                    acr=acr,
                    auth_time=auth_time,
                    created_at=now,
                    expires_at=now + CODE_TTL_SECONDS,
                )
            )
        return code

    async def redeem(self, code: str, client_id: str) -> Redemption:
        """Mark the code used and return it, if it is this client's, unused and unexpired."""
        if not code or len(code) > MAX_CODE_CHARS:
            return Redemption(None)
        code_hash = hash_token(code)
        async with write_transaction(self._engine) as conn:
            now = self._clock()
            # The session id is written with `used_at`, so a replay, however soon, finds the
            # session to end.
            family_id = str(uuid.uuid4())
            claimed = await conn.execute(
                update(oauth_codes)
                .where(
                    and_(
                        oauth_codes.c.code_hash == code_hash,
                        oauth_codes.c.client_id == client_id,
                        oauth_codes.c.used_at.is_(None),
                        oauth_codes.c.expires_at > now,
                    )
                )
                .values(used_at=now, family_id=family_id)
            )
            row = (
                (
                    await conn.execute(
                        select(oauth_codes).where(oauth_codes.c.code_hash == code_hash)
                    )
                )
                .mappings()
                .first()
            )
        if row is None or row["client_id"] != client_id:
            return Redemption(None)
        if claimed.rowcount != 1:
            if row["used_at"] is not None:
                return Redemption(
                    None, replayed_family=row["family_id"], replayed_user=row["user_id"]
                )
            return Redemption(None)  # expired
        return Redemption(
            AuthorizationCode(
                client_id=row["client_id"],
                user_id=row["user_id"],
                redirect_uri=row["redirect_uri"],
                scope=row["scope"],
                code_challenge=row["code_challenge"],
                nonce=row["nonce"],
                patient=row["patient"],
                dpop_jkt=row["dpop_jkt"],
                amr=list(row["amr"]),
                acr=row["acr"],
                auth_time=row["auth_time"],
                family_id=family_id,
            )
        )
