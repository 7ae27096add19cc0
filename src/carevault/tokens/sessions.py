"""Ending sessions: one login (logout) or every login of a user (logout-all and account changes).

Each end is immediate for access tokens too, unlike JWT servers that wait for expiry: the
revocation list denies the session ids and, for a user, every token issued before now.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from carevault.config import Settings
from carevault.tokens.refresh import RefreshTokenService
from carevault.tokens.revocation import RevocationList


class BrowserSessionEnder(Protocol):
    async def end_all(self, user_id: str, reason: str) -> list[str]: ...


class SessionRevoker:
    def __init__(
        self,
        settings: Settings,
        refresh: RefreshTokenService,
        revocations: RevocationList,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._refresh = refresh
        self._revocations = revocations
        self._clock = clock
        self.browser: BrowserSessionEnder | None = None  # set by build_services
        # A denial must outlive every access token it can match, whatever ttl was configured
        # when that token was issued.
        self._keep = 3600 + settings.clock_leeway_seconds

    async def end_session(self, sid: str, jti: str | None, token_exp: float | None) -> None:
        await self._refresh.revoke_family(sid, "logout")
        until = self._clock() + self._keep
        await self._revocations.revoke_sessions([sid], until)
        if jti is not None and token_exp is not None:
            await self._revocations.revoke_token(jti, token_exp + 60)

    async def end_family(self, sid: str) -> None:
        """Deny the access tokens of a family whose refresh tokens are already revoked."""
        await self._revocations.revoke_sessions([sid], self._clock() + self._keep)

    async def end_all(self, user_id: str, reason: str) -> list[str]:
        now = self._clock()
        if self.browser is not None:
            await self.browser.end_all(user_id, reason)
        sids = await self._refresh.revoke_user_families(user_id, reason)
        await self._revocations.revoke_user(user_id, now, now + self._keep)
        if sids:
            await self._revocations.revoke_sessions(sids, now + self._keep)
        return sids
