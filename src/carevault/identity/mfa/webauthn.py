"""WebAuthn / passkeys (the `webauthn` package): registration and authentication ceremonies.

Placeholder wired into the services; the ceremonies are being written (issue 6).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from carevault.audit.events import SecurityEventLog
from carevault.config import Settings
from carevault.identity.accounts import User
from carevault.identity.authentication import RequestContext
from carevault.identity.mfa.challenges import ChallengeStore
from carevault.identity.mfa.service import WebAuthnFailed, WebAuthnProof


class WebAuthnCredentials:
    """Implements `service.WebAuthnFactors` (what the login's second step and step-up call)."""

    def __init__(
        self,
        settings: Settings,
        engine: AsyncEngine,
        challenges: ChallengeStore,
        events: SecurityEventLog,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._engine = engine
        self._challenges = challenges
        self._events = events
        self._clock = clock

    async def has_credentials(self, user_id: str) -> bool:
        return False

    async def authenticate(
        self, user: User, bound_to: str, credential: dict[str, Any], ctx: RequestContext
    ) -> WebAuthnProof:
        raise WebAuthnFailed("not_implemented")

    async def remove_all(self, user_id: str) -> int:
        return 0

    async def describe(self, user_id: str) -> list[dict[str, Any]]:
        return []
