"""RFC 9068 JWT access tokens: issue and verify.

`AccessTokenVerifier.verify` is the one function every protected route goes through. It trusts
only this server's keys: the header may name `alg`, `kid` and `typ` and nothing else, so `jku`,
`x5u`, `jwk`, `x5c`, `crit` and `b64` are refused rather than followed; the algorithm must be the
one bound to that `kid`'s key (no `none`, no HMAC, no key confusion); duplicate JSON member names
are refused (RFC 7515 §5.2 lets a parser pick either value, so two parsers may disagree).
JOSE parsing and signature checks are joserfc's; this module only decides what to accept.
`verify_jws_signature` is the signature step on its own (exactly one algorithm: the one bound to
the key), so conformance vectors can be run through the same code `verify` runs.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwt import JWTClaimsRegistry
from joserfc.util import urlsafe_b64decode

from carevault.config import Settings
from carevault.tokens.keys import KeyRing

# RFC 9068 §2.1: typ "at+jwt"; "application/at+jwt" is the same media type written in full.
ACCESS_TOKEN_TYPES = frozenset({"at+jwt", "application/at+jwt"})
ALLOWED_HEADER_PARAMS = frozenset({"alg", "kid", "typ"})
REQUIRED_STRING_CLAIMS = ("iss", "sub", "jti", "client_id", "scope", "sid")
# One registry per algorithm a signing key may be bound to (keys.KEY_TYPES): each allows exactly
# that algorithm, so the token's own `alg` can never pick another one.
_SIGNATURE_REGISTRIES = {
    alg: jws.JWSRegistry(algorithms=[alg]) for alg in ("ES256", "EdDSA", "PS256", "RS256")
}


class InvalidTokenError(Exception):
    """The token is not acceptable. `reason` is for logs and tests, never for the client."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True, slots=True)
class AccessClaims:
    sub: str
    jti: str
    sid: str
    client_id: str
    scope: str
    roles: tuple[str, ...]
    amr: tuple[str, ...]
    auth_time: int
    iat: int
    exp: int


def _strict_json_object(raw: bytes) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                raise InvalidTokenError("duplicate member name")
            obj[key] = value
        return obj

    try:
        value = json.loads(raw, object_pairs_hook=no_duplicates)
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidTokenError("malformed JSON") from err
    if not isinstance(value, dict):
        raise InvalidTokenError("not a JSON object")
    return value


def verify_jws_signature(raw: bytes, key: Any, alg: str) -> bytes:
    """Check the JWS compact serialization `raw` with `key` under `alg` only; return the payload.

    `alg` is the algorithm bound to the key (`SigningKey.alg`), never one read from the token.
    Raises `InvalidTokenError` for an algorithm outside the allowlist, a header naming another
    algorithm, a malformed JWS or a bad signature.
    """
    registry = _SIGNATURE_REGISTRIES.get(alg)
    if registry is None:
        raise InvalidTokenError("algorithm not allowed")
    try:
        obj = jws.extract_compact(raw, registry=registry)
        if not jws.validate_compact(obj, key, registry=registry):
            raise InvalidTokenError("bad signature")
    except JoseError as err:
        raise InvalidTokenError(f"JWS rejected: {err.error}") from err
    except (ValueError, TypeError) as err:
        raise InvalidTokenError("malformed JWS") from err
    return obj.payload


class AccessTokenIssuer:
    def __init__(self, settings: Settings, keyring: KeyRing, clock: Callable[[], float] = time.time):
        self._settings = settings
        self._keyring = keyring
        self._clock = clock

    @property
    def ttl(self) -> int:
        return self._settings.access_token_ttl_seconds

    def issue(
        self,
        *,
        subject: str,
        session_id: str,
        client_id: str,
        scope: str,
        roles: list[str],
        amr: list[str],
        auth_time: int,
    ) -> tuple[str, AccessClaims]:
        now = int(self._clock())
        claims = AccessClaims(
            sub=subject,
            jti=uuid.uuid4().hex,
            sid=session_id,
            client_id=client_id,
            scope=scope,
            roles=tuple(roles),
            amr=tuple(amr),
            auth_time=auth_time,
            iat=now,
            exp=now + self.ttl,
        )
        payload = {
            "iss": self._settings.issuer,
            "sub": claims.sub,
            "aud": self._settings.audience,
            "exp": claims.exp,
            "iat": claims.iat,
            "nbf": claims.iat,
            "jti": claims.jti,
            "sid": claims.sid,
            "client_id": claims.client_id,
            "scope": claims.scope,
            "roles": list(claims.roles),
            "auth_time": claims.auth_time,
            "amr": list(claims.amr),
        }
        key = self._keyring.current
        header = {"alg": key.alg, "kid": key.kid, "typ": "at+jwt"}
        token = jws.serialize_compact(
            header, json.dumps(payload, separators=(",", ":")), key.key, algorithms=[key.alg]
        )
        return token, claims


class AccessTokenVerifier:
    def __init__(self, settings: Settings, keyring: KeyRing, clock: Callable[[], float] = time.time):
        self._settings = settings
        self._keyring = keyring
        self._clock = clock
        self._max_bytes = settings.max_token_bytes

    def verify(self, token: str) -> AccessClaims:
        """Return the claims of a valid access token or raise `InvalidTokenError`."""
        if len(token) > self._max_bytes:
            raise InvalidTokenError("token too large")
        try:
            raw = token.encode("ascii")
        except UnicodeEncodeError as err:
            raise InvalidTokenError("non-ASCII token") from err
        if raw.count(b".") != 2:
            raise InvalidTokenError("not a three-part JWS compact serialization")
        header_segment = raw.split(b".", 1)[0]
        try:
            header = _strict_json_object(urlsafe_b64decode(header_segment))
        except (ValueError, TypeError) as err:
            raise InvalidTokenError("malformed header") from err

        if not header.keys() <= ALLOWED_HEADER_PARAMS:
            raise InvalidTokenError("header parameter not allowed")
        if header.get("typ") not in ACCESS_TOKEN_TYPES:
            raise InvalidTokenError("wrong typ")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise InvalidTokenError("no kid")
        now = self._clock()
        key = self._keyring.verification_key(kid, now)
        if key is None:
            self._keyring.refresh(force=True)  # a rotation in another process, just now?
            key = self._keyring.verification_key(kid, now)
            if key is None:
                raise InvalidTokenError("unknown kid")
        if header.get("alg") != key.alg:
            raise InvalidTokenError("algorithm not allowed for this key")

        payload = verify_jws_signature(raw, key.key, key.alg)
        claims = _strict_json_object(payload)
        self._check_claims(claims, now)
        return AccessClaims(
            sub=claims["sub"],
            jti=claims["jti"],
            sid=claims["sid"],
            client_id=claims["client_id"],
            scope=claims["scope"],
            roles=tuple(claims["roles"]),
            amr=tuple(claims["amr"]),
            auth_time=claims["auth_time"],
            iat=claims["iat"],
            exp=claims["exp"],
        )

    def _check_claims(self, claims: dict[str, Any], now: float) -> None:
        leeway = self._settings.clock_leeway_seconds
        registry = JWTClaimsRegistry(
            now=int(now),
            leeway=leeway,
            iss={"essential": True, "value": self._settings.issuer},
            aud={"essential": True, "value": self._settings.audience},
            exp={"essential": True},
            nbf={"essential": True},
            iat={"essential": True},
            sub={"essential": True},
            jti={"essential": True},
        )
        try:
            registry.validate(claims)
        except JoseError as err:
            raise InvalidTokenError(f"claims rejected: {err.error}") from err
        for name in REQUIRED_STRING_CLAIMS:
            if not isinstance(claims.get(name), str) or not claims[name]:
                raise InvalidTokenError(f"claim {name} missing or not a string")
        for name in ("exp", "iat", "nbf", "auth_time"):
            if type(claims.get(name)) is not int:
                raise InvalidTokenError(f"claim {name} must be an integer NumericDate")
        for name in ("roles", "amr"):
            value = claims.get(name)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise InvalidTokenError(f"claim {name} must be a list of strings")
        if claims["exp"] - claims["iat"] > 3600:
            raise InvalidTokenError("lifetime longer than allowed")
