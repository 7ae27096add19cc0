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

import functools
import json
import time
import uuid
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

from joserfc import jws
from joserfc.errors import JoseError, SecurityWarning
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
with warnings.catch_warnings():
    # joserfc warns that RFC 9864 deprecates the name "EdDSA" (in favour of "Ed25519"); the
    # algorithm itself is sound and "EdDSA" is what relying parties still expect.
    warnings.simplefilter("ignore", SecurityWarning)
    _ALGORITHM_MODELS = {alg: reg.get_alg(alg) for alg, reg in _SIGNATURE_REGISTRIES.items()}
warnings.filterwarnings("ignore", message="EdDSA is deprecated", category=SecurityWarning)
# Tokens already verified, by their exact text: repeated requests with one token skip the
# signature (the dominant cost) but never the time, key-retirement and revocation checks.
VERIFIED_CACHE_ENTRIES = 20_000


class InvalidTokenError(Exception):
    """The token is not acceptable. `reason` is for logs and tests, never for the client."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class AccessClaims(NamedTuple):
    """The verified claims a request needs (a NamedTuple: immutable and cheap to build)."""

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
    acr: str | None = None  # how strong the login was (identity/mfa/policy.py)
    jkt: str | None = None  # DPoP (RFC 9449): the thumbprint of the key the token is bound to


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise InvalidTokenError("duplicate member name")
        obj[key] = value
    return obj


_STRICT_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates)


def _strict_json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = _STRICT_DECODER.decode(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidTokenError("malformed JSON") from err
    if not isinstance(value, dict):
        raise InvalidTokenError("not a JSON object")
    return value


@functools.lru_cache(maxsize=256)
def _decode_header(segment: bytes) -> dict[str, Any]:
    """The strictly parsed JOSE header. Every token one key signs has the same header segment,
    so the parse is memoised (parsing is deterministic; callers never mutate the result)."""
    try:
        return _strict_json_object(urlsafe_b64decode(segment))
    except (ValueError, TypeError) as err:
        raise InvalidTokenError("malformed header") from err


def verify_jws_signature(
    raw: bytes, key: Any, alg: str, *, header_allowlisted: bool = False
) -> bytes:
    """Check the JWS compact serialization `raw` with `key` under `alg` only; return the payload.

    `alg` is the algorithm bound to the key (`SigningKey.alg`), never one read from the token.
    Raises `InvalidTokenError` for an algorithm outside the allowlist, a header naming another
    algorithm, a malformed JWS or a bad signature. joserfc does the parsing (`extract_compact`),
    the header rules (`check_header`) and the signature check (its algorithm model's `verify`);
    the model is resolved once per algorithm instead of on every call. `header_allowlisted`
    says the caller has already limited the header to `ALLOWED_HEADER_PARAMS` (stricter than
    joserfc's header rules), so they are not checked a second time.
    """
    registry = _SIGNATURE_REGISTRIES.get(alg)
    if registry is None:
        raise InvalidTokenError("algorithm not allowed")
    model = _ALGORITHM_MODELS[alg]
    try:
        obj = jws.extract_compact(raw, registry=registry)
        header = obj.headers()
        if not header_allowlisted:
            registry.check_header(header)
        if header.get("alg") != alg:
            raise InvalidTokenError("algorithm not allowed for this key")
        model.check_key(key)
        segments = obj.segments
        signature = urlsafe_b64decode(segments["signature"])
        if not model.verify(segments["header"] + b"." + segments["payload"], signature, key):
            raise InvalidTokenError("bad signature")
    except JoseError as err:
        raise InvalidTokenError(f"JWS rejected: {err.error}") from err
    except (ValueError, TypeError) as err:
        raise InvalidTokenError("malformed JWS") from err
    return obj.payload


class AccessTokenIssuer:
    def __init__(
        self, settings: Settings, keyring: KeyRing, clock: Callable[[], float] = time.time
    ):
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
        acr: str | None = None,
        ttl: int | None = None,
        jkt: str | None = None,
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
            exp=now + min(ttl or self.ttl, self.ttl),
            acr=acr,
            jkt=jkt,
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
        if acr is not None:
            payload["acr"] = acr
        if jkt is not None:
            payload["cnf"] = {"jkt": jkt}
        key = self._keyring.current
        header = {"alg": key.alg, "kid": key.kid, "typ": "at+jwt"}
        token = jws.serialize_compact(
            header, json.dumps(payload, separators=(",", ":")), key.key, algorithms=[key.alg]
        )
        return token, claims


class AccessTokenVerifier:
    def __init__(
        self,
        settings: Settings,
        keyring: KeyRing,
        clock: Callable[[], float] = time.time,
        cache_entries: int = VERIFIED_CACHE_ENTRIES,
    ):
        self._settings = settings
        self._keyring = keyring
        self._clock = clock
        self._max_bytes = settings.max_token_bytes
        self._leeway = settings.clock_leeway_seconds
        self._issuer = settings.issuer
        self._audience = settings.audience
        self._cache_entries = cache_entries
        self._verified: dict[str, tuple[AccessClaims, str, int]] = {}  # token -> claims, kid, nbf
        self._cache_generation = keyring.generation

    def verify(self, token: str) -> AccessClaims:
        """Return the claims of a valid access token or raise `InvalidTokenError`."""
        hit = self._verified.get(token)
        if hit is not None:
            claims, kid, nbf = hit
            now = self._clock()
            # Everything that can change for the same bytes is checked again: time, and whether
            # the signing key is still trusted (rotation retires keys). A new key file empties
            # the cache (see _remember).
            if (
                claims.exp > now - self._leeway
                and nbf <= now + self._leeway
                and self._keyring.generation == self._cache_generation
                and self._keyring.verification_key(kid, now) is not None
            ):
                return claims
            self._verified.pop(token, None)
        claims, kid, nbf = self._verify_uncached(token)
        self._remember(token, claims, kid, nbf)
        return claims

    def _remember(self, token: str, claims: AccessClaims, kid: str, nbf: int) -> None:
        if self._cache_entries <= 0:  # caching off (the benchmark's first-use measurement)
            return
        generation = self._keyring.generation
        # Only valid tokens get here, so the bound is about memory, not an attacker's flood:
        # starting over when full is simpler than LRU and costs one signature per live token.
        if generation != self._cache_generation or len(self._verified) >= self._cache_entries:
            self._verified.clear()
            self._cache_generation = generation
        self._verified[token] = (claims, kid, nbf)

    def _verify_uncached(self, token: str) -> tuple[AccessClaims, str, int]:
        if len(token) > self._max_bytes:
            raise InvalidTokenError("token too large")
        try:
            raw = token.encode("ascii")
        except UnicodeEncodeError as err:
            raise InvalidTokenError("non-ASCII token") from err
        if raw.count(b".") != 2:
            raise InvalidTokenError("not a three-part JWS compact serialization")
        header = _decode_header(raw.split(b".", 1)[0])

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

        payload = verify_jws_signature(raw, key.key, key.alg, header_allowlisted=True)
        claims = _strict_json_object(payload)
        self._check_claims(claims)
        return (
            AccessClaims(
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
                acr=claims.get("acr"),
                jkt=claims["cnf"]["jkt"] if "cnf" in claims else None,
            ),
            kid,
            claims["nbf"],
        )

    def _check_claims(self, claims: dict[str, Any]) -> None:
        """RFC 7519 §4.1 and RFC 9068 §2.2 claims, all required, NumericDates as integers."""
        now = int(self._clock())
        leeway = self._leeway
        for name in ("exp", "iat", "nbf", "auth_time"):
            if type(claims.get(name)) is not int:
                raise InvalidTokenError(f"claim {name} must be an integer NumericDate")
        if claims["exp"] <= now - leeway:
            raise InvalidTokenError("expired")
        if claims["nbf"] > now + leeway:
            raise InvalidTokenError("not yet valid")
        if claims["iat"] > now + leeway:
            raise InvalidTokenError("issued in the future")
        if claims["exp"] - claims["iat"] > 3600:
            raise InvalidTokenError("lifetime longer than allowed")
        for name in REQUIRED_STRING_CLAIMS:
            value = claims.get(name)
            if type(value) is not str or not value:
                raise InvalidTokenError(f"claim {name} missing or not a string")
        if claims["iss"] != self._issuer:
            raise InvalidTokenError("wrong issuer")
        audience = claims.get("aud")
        if not (
            audience == self._audience
            or (
                type(audience) is list
                and self._audience in audience
                and all(type(a) is str for a in audience)
            )
        ):
            raise InvalidTokenError("wrong audience")
        if "acr" in claims and (type(claims["acr"]) is not str or not claims["acr"]):
            raise InvalidTokenError("claim acr must be a string")
        if "cnf" in claims:
            cnf = claims["cnf"]
            # RFC 9449 §6.1: a confirmation this server does not understand must not be ignored.
            if type(cnf) is not dict or cnf.keys() != {"jkt"} or type(cnf["jkt"]) is not str:
                raise InvalidTokenError("claim cnf must be {jkt: thumbprint}")
        for name in ("roles", "amr"):
            value = claims.get(name)
            if type(value) is not list or not all(type(v) is str for v in value):
                raise InvalidTokenError(f"claim {name} must be a list of strings")
