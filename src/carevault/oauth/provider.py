"""The OAuth pieces of one process, built from the process's services: the authlib server, the
remembered consents, DPoP, and the SMART launch context of the sessions it started."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from authlib.common.security import is_secure_transport
from fastapi import HTTPException, Request
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from carevault.db.tables import refresh_families
from carevault.oauth.client_assertion import ClientAssertions
from carevault.oauth.codes import AuthorizationCodes
from carevault.oauth.consents import Consents
from carevault.oauth.dpop import DpopVerifier
from carevault.oauth.issuance import TokenIssuance
from carevault.oauth.replay import ReplayCache, build_replay_cache
from carevault.oauth.server import OAuthServer

_LAUNCH_CACHE_ENTRIES = 10_000


class LaunchContexts:
    """The launch patient of a session (`sid`), for the resource server: kept in the database,
    never in the token (a FHIR id may be meaningful), and cached here (it never changes)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._cache: dict[str, str | None] = {}

    async def patient(self, session_id: str) -> str | None:
        if session_id in self._cache:
            return self._cache[session_id]
        async with self._engine.connect() as conn:
            patient = (
                await conn.execute(
                    select(refresh_families.c.patient).where(refresh_families.c.id == session_id)
                )
            ).scalar_one_or_none()
        if len(self._cache) >= _LAUNCH_CACHE_ENTRIES:
            self._cache.clear()
        self._cache[session_id] = patient
        return patient


@dataclass
class OAuthProvider:
    server: OAuthServer
    consents: Consents
    dpop: DpopVerifier
    replay: ReplayCache
    issuance: TokenIssuance
    launch: LaunchContexts

    async def close(self) -> None:
        await self.replay.close()


def build_oauth(services: Any, clock: Callable[[], float] = time.time) -> OAuthProvider:
    settings = services.settings
    engine = services.engine
    replay = build_replay_cache(settings, engine, clock)
    issuance = TokenIssuance(settings, services.issuer, services.refresh, services.keyring, clock)
    token_endpoint = f"{settings.issuer}/oauth/token"
    server = OAuthServer(
        issuer=settings.issuer,
        clients=services.clients,
        codes=AuthorizationCodes(engine, clock),
        issuance=issuance,
        assertions=ClientAssertions(
            replay, frozenset({token_endpoint, settings.issuer}), clock=clock
        ),
        authenticator=services.authenticator,
        refresh=services.refresh,
        sessions=services.sessions,
        revocations=services.revocations,
        verifier=services.verifier,
        users=services.users,
        events=services.events,
    )
    nonce_secret = hmac.new(services.secrets.subject_hash, b"dpop-nonce", hashlib.sha256).digest()
    return OAuthProvider(
        server=server,
        consents=Consents(engine, clock),
        dpop=DpopVerifier(replay, nonce_secret, clock=clock),
        replay=replay,
        issuance=issuance,
        launch=LaunchContexts(engine),
    )


def oauth_offered(request: Request) -> None:
    """OAuth 2.0 needs TLS: authlib refuses every request whose URL (built on the issuer) is
    http:// and not a loopback name. A server configured with such an issuer offers no OAuth
    at all, so its endpoints and discovery documents answer 404 rather than fail; start-up
    logs why (see `warn_if_oauth_unavailable`)."""
    if not is_secure_transport(request.app.state.services.settings.issuer + "/"):
        raise HTTPException(status_code=404)


def warn_if_oauth_unavailable(issuer: str) -> None:
    if not is_secure_transport(issuer + "/"):
        structlog.get_logger("carevault.oauth").warning(
            "oauth_disabled", reason="issuer_not_https", fix="set CAREVAULT_ISSUER to https"
        )
