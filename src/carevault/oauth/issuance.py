"""The token response of an OAuth grant: an RFC 9068 access token (DPoP-bound when the request
proved a key), the refresh token of the grant's session when the client may refresh and asked
for `offline_access`, an OpenID Connect `id_token` for `openid`, and the SMART
launch context (`patient`).

Every user grant is a session (a refresh family, the access tokens' `sid`), whether or not a
refresh token is handed out: ending it (logout-all, a replayed code, a disabled client) revokes
what it issued.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from authlib.oidc.core.util import create_half_hash
from joserfc import jws

from carevault.config import Settings
from carevault.identity.accounts import User
from carevault.identity.authentication import RequestContext
from carevault.identity.roles import Role
from carevault.oauth.clients import Client
from carevault.oauth.scopes import FHIR_USER, LAUNCH_PATIENT, OFFLINE, OPENID
from carevault.tokens.access import AccessTokenIssuer
from carevault.tokens.keys import KeyRing
from carevault.tokens.refresh import Family, RefreshTokenService

ID_TOKEN_TTL_SECONDS = 300
SERVICE_SESSION_PREFIX = "cc-"  # the `sid` of client-credentials tokens: no session behind them


@dataclass(frozen=True)
class UserGrant:
    """What an authorization established for a user, carried from the code to the tokens."""

    client: Client
    user: User
    scope: list[str]
    amr: list[str]
    acr: str | None
    auth_time: int
    patient: str | None = None
    nonce: str | None = None


def token_type(jkt: str | None) -> str:
    return "DPoP" if jkt else "Bearer"


class TokenIssuance:
    def __init__(
        self,
        settings: Settings,
        issuer: AccessTokenIssuer,
        refresh: RefreshTokenService,
        keyring: KeyRing,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._issuer = issuer
        self._refresh = refresh
        self._keyring = keyring
        self._clock = clock

    async def start(
        self, grant: UserGrant, family_id: str, *, jkt: str | None, ctx: RequestContext
    ) -> tuple[dict[str, Any], Family]:
        """The first tokens of a user grant (authorization code): the session `family_id`."""
        refreshable = self._refreshable(grant.client, grant.scope)
        family, refresh_token = await self._refresh.start_family(
            family_id=family_id,
            user_id=grant.user.id,
            client_id=grant.client.id,
            scope=" ".join(grant.scope),
            amr=grant.amr,
            auth_time=grant.auth_time,
            acr=grant.acr,
            address=ctx.address,
            device=ctx.device,
            patient=grant.patient,
            # RFC 9449 §5: a public client's refresh tokens are bound to its DPoP key.
            dpop_jkt=jkt if grant.client.public else None,
        )
        body = self._user_tokens(grant, family.id, jkt)
        if refreshable:
            body["refresh_token"] = refresh_token
        return body, family

    def refreshed(
        self,
        grant: UserGrant,
        family: Family,
        refresh_token: str,
        *,
        jkt: str | None,
    ) -> dict[str, Any]:
        """Tokens for a rotated refresh token; `grant.scope` may be narrower than the family's."""
        body = self._user_tokens(grant, family.id, jkt)
        body["refresh_token"] = refresh_token
        return body

    def for_service(self, client: Client, scope: list[str], *, jkt: str | None) -> dict[str, Any]:
        """Client credentials (SMART Backend Services): the client is the subject, acting with
        the service role under its `system/` scopes. No refresh token (RFC 6749 §4.4.3)."""
        now = int(self._clock())
        token, _ = self._issuer.issue(
            subject=client.id,
            session_id=SERVICE_SESSION_PREFIX + uuid.uuid4().hex,
            client_id=client.id,
            scope=" ".join(scope),
            roles=[Role.service.value],
            amr=[],
            auth_time=now,
            jkt=jkt,
        )
        return {
            "access_token": token,
            "token_type": token_type(jkt),
            "expires_in": self._issuer.ttl,
            "scope": " ".join(scope),
        }

    def _refreshable(self, client: Client, scope: list[str]) -> bool:
        # `online_access` asks for a refresh token that dies when the user's session does; a
        # grant here is not tied to a browser session, so it gets none rather than one that
        # outlives the user's sign-out (the app signs in again when its access token expires).
        return client.allows_grant("refresh_token") and OFFLINE in scope

    def _user_tokens(self, grant: UserGrant, session_id: str, jkt: str | None) -> dict[str, Any]:
        access_token, claims = self._issuer.issue(
            subject=grant.user.id,
            session_id=session_id,
            client_id=grant.client.id,
            scope=" ".join(grant.scope),
            roles=list(grant.user.roles),
            amr=grant.amr,
            auth_time=grant.auth_time,
            acr=grant.acr,
            jkt=jkt,
        )
        body: dict[str, Any] = {
            "access_token": access_token,
            "token_type": token_type(jkt),
            "expires_in": self._issuer.ttl,
            "scope": " ".join(grant.scope),
        }
        if grant.patient is not None and LAUNCH_PATIENT in grant.scope:
            body["patient"] = grant.patient
        if OPENID in grant.scope:
            body["id_token"] = self.id_token(grant, access_token)
        return body

    def fhir_user(self, user: User) -> str | None:
        """The user's own FHIR resource, as an absolute URL (SMART `fhirUser`)."""
        base = f"{self._settings.issuer}/fhir"
        if user.practitioner_id:
            return f"{base}/Practitioner/{user.practitioner_id}"
        if user.patient_id:
            return f"{base}/Patient/{user.patient_id}"
        return None

    def id_token(self, grant: UserGrant, access_token: str) -> str:
        """OpenID Connect Core §2 / §3.1.3.6, signed with the access tokens' current key."""
        key = self._keyring.current
        now = int(self._clock())
        claims: dict[str, Any] = {
            "iss": self._settings.issuer,
            "sub": grant.user.id,
            "aud": grant.client.id,
            "exp": now + ID_TOKEN_TTL_SECONDS,
            "iat": now,
            "auth_time": grant.auth_time,
            "amr": grant.amr,
            "at_hash": create_half_hash(access_token, key.alg).decode(),
        }
        if grant.acr is not None:
            claims["acr"] = grant.acr
        if grant.nonce:
            claims["nonce"] = grant.nonce
        if FHIR_USER in grant.scope:
            fhir_user = self.fhir_user(grant.user)
            if fhir_user is not None:
                claims["fhirUser"] = fhir_user
        header = {"alg": key.alg, "kid": key.kid, "typ": "JWT"}
        return jws.serialize_compact(
            header, json.dumps(claims, separators=(",", ":")), key.key, algorithms=[key.alg]
        )
