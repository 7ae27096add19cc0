"""`private_key_jwt` client authentication (RFC 7523 §2.2, SMART Backend Services): the client
signs a short-lived JWT with a key whose public half it registered.

joserfc parses and verifies the JWS; this module decides what to accept: only the algorithms
listed, only a registered key (a `jku`, `x5u`, `jwk` or `x5c` in the header is refused, never
followed), `iss` and `sub` both the client, `aud` this server's token endpoint, an `exp` at most
five minutes ahead, and a `jti` never seen before (the shared replay cache remembers it until
the assertion expires, so a captured assertion cannot be presented again, to any worker).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from carevault.oauth.clients import Client
from carevault.oauth.replay import ReplayCache

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ALGORITHMS = ["ES256", "ES384", "RS256", "RS384", "PS256", "EdDSA"]
MAX_LIFETIME_SECONDS = 300  # SMART Backend Services: exp no more than five minutes ahead
MAX_ASSERTION_CHARS = 8192
MAX_JTI_CHARS = 256
_HEADER_PARAMS = frozenset({"alg", "kid", "typ"})


class AssertionRejected(Exception):
    """The assertion does not authenticate the client. `reason` is for logs only."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class ClientAssertions:
    def __init__(
        self,
        replay: ReplayCache,
        audiences: frozenset[str],
        *,
        clock: Callable[[], float] = time.time,
        leeway: int = 5,
    ) -> None:
        self._replay = replay
        self._audiences = audiences
        self._clock = clock
        self._leeway = leeway

    async def verify(self, assertion: str, client: Client) -> None:
        """Accept the assertion as `client`'s authentication, or raise `AssertionRejected`."""
        if client.auth_method != "private_key_jwt" or not client.jwks:
            raise AssertionRejected("client does not authenticate with private_key_jwt")
        if len(assertion) > MAX_ASSERTION_CHARS:
            raise AssertionRejected("assertion too large")
        try:
            keys = KeySet.import_key_set(client.jwks)
            token = jwt.decode(assertion, keys, algorithms=ALGORITHMS)
        except (JoseError, ValueError, TypeError, KeyError) as err:
            raise AssertionRejected(f"signature: {type(err).__name__}") from None
        if not token.header.keys() <= _HEADER_PARAMS:
            raise AssertionRejected("header parameter not allowed")
        claims: dict[str, Any] = token.claims
        now = int(self._clock())
        for name in ("iss", "sub", "jti"):
            if type(claims.get(name)) is not str or not claims[name]:
                raise AssertionRejected(f"claim {name} missing")
        if claims["iss"] != client.id or claims["sub"] != client.id:
            raise AssertionRejected("iss and sub must be the client")
        audience = claims.get("aud")
        audiences = audience if type(audience) is list else [audience]
        if not any(type(a) is str and a in self._audiences for a in audiences):
            raise AssertionRejected("wrong audience")
        exp = claims.get("exp")
        if type(exp) is not int:
            raise AssertionRejected("exp missing")
        if exp <= now - self._leeway:
            raise AssertionRejected("expired")
        if exp > now + MAX_LIFETIME_SECONDS + self._leeway:
            raise AssertionRejected("exp too far ahead")
        for name in ("iat", "nbf"):
            value = claims.get(name)
            if value is not None and (type(value) is not int or value > now + self._leeway):
                raise AssertionRejected(f"{name} in the future")
        jti = claims["jti"]
        if len(jti) > MAX_JTI_CHARS:
            raise AssertionRejected("jti too long")
        if not await self._replay.first_use(
            f"assertion:{client.id}:{jti}", expires_at=exp + self._leeway
        ):
            raise AssertionRejected("jti replayed")
