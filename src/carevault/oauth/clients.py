"""The OAuth client registry: who may ask this server for tokens, how they prove it, and what
they may ask for.

Three kinds of client (RFC 6749 §2.1, §2.3):

- public (`none`): a browser or native app that can keep no secret; authorization code with
  PKCE only (enforced by the authorization endpoint), never `client_credentials`.
- `private_key_jwt` (RFC 7523 §2.2, OIDC Core §9): signs a client assertion with a key whose
  PUBLIC half is registered here; the default for a confidential client.
- `client_secret_basic` (RFC 6749 §2.3.1): a 256-bit random secret, shown once and kept only
  as a keyed hash (HMAC-SHA256 under an instance secret; a random secret needs no slow hash).

Redirect URIs are registered in full and later compared exactly (RFC 9700 §4.1.3, no
wildcards): https, or http on a loopback host for native apps (RFC 8252 §7.3). Scopes are the
SMART on FHIR ones this server understands; `system/` scopes belong to `client_credentials`,
the others to a user's authorization.

`register_client` and `disable_client` are the operations behind `carevault client ...` and the
admin API (oauth/client_routes.py): they also record the security events, and disabling cuts
off every token the client already holds.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import dataclasses
import hmac
import json
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from joserfc.jwk import KeySet
from sqlalchemy import and_, insert, select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncEngine

from carevault.access.scopes import SCOPE_PATTERN
from carevault.audit.events import SecurityEvent, SecurityEventLog
from carevault.config import MAX_ACCESS_TOKEN_TTL_SECONDS, Settings
from carevault.crypto.instance_secrets import InstanceSecrets
from carevault.db.engine import write_transaction
from carevault.db.tables import oauth_clients, refresh_families
from carevault.identity.admin import CLI, NO_CONTEXT
from carevault.identity.authentication import RequestContext
from carevault.oauth.scopes import CONTEXT_SCOPES
from carevault.tokens.revocation import RevocationList

AUTH_METHODS = ("none", "private_key_jwt", "client_secret_basic")
GRANT_TYPES = ("authorization_code", "refresh_token", "client_credentials")

CLIENT_ID_PREFIX = "cv_"
SECRET_BYTES = 32  # 256 bits: a keyed hash is enough, no password hashing needed
# A label, not a secret: keeps these hashes apart from the instance's other keyed hashes.
_SECRET_DOMAIN = "oauth-client-secret:"  # noqa: S105
MAX_NAME = 128
MAX_REDIRECT_URIS = 10
MAX_REDIRECT_URI_LENGTH = 512
MAX_SCOPE_LENGTH = 2000
MAX_KEYS = 10
MAX_JWKS_BYTES = 64 * 1024
MAX_SECRET_LENGTH = 512
MIN_RSA_BITS = 2048
# RFC 8252 §7.3: http is allowed for the loopback interface only (the port may vary).
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
PLAIN_SCOPES = CONTEXT_SCOPES  # scopes that are not resource scopes (oauth/scopes.py)
# RFC 7517 §9.3 / RFC 7518 §6.2.2, §6.3.2, §6.4: members that only a private or symmetric key has
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_ASYMMETRIC_KTY = frozenset({"RSA", "EC", "OKP"})
_SIGNING_ALGS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
# Any id a lookup may be asked for: printable ASCII, bounded, so no input reaches the
# database as something it refuses (a NUL byte in PostgreSQL text, an over-long value).
_CLIENT_ID = re.compile(r"[\x21-\x7e]{1,64}")
# RFC 6749 §3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_URI_CHARS = re.compile(r"[\x21-\x7e]+")
_NOT_URI_CHARS = frozenset('<>"{}|\\^`')


class ClientError(ValueError):
    """A registration that can't be accepted; message is safe to show."""


@dataclass(frozen=True)
class Client:
    id: str
    name: str
    auth_method: str
    secret_hash: str | None
    jwks: dict[str, Any] | None
    redirect_uris: tuple[str, ...]
    grant_types: tuple[str, ...]
    scope: str
    require_dpop: bool
    enabled: bool
    created_at: float

    @property
    def public(self) -> bool:
        return self.auth_method == "none"

    def allows_grant(self, grant_type: str) -> bool:
        return grant_type in self.grant_types

    def allowed_scopes(self) -> frozenset[str]:
        return frozenset(self.scope.split())

    def describe(self) -> dict[str, Any]:
        """What the CLI and the admin API show: never the secret hash, never the keys."""
        return {
            "client_id": self.id,
            "name": self.name,
            "auth_method": self.auth_method,
            "redirect_uris": list(self.redirect_uris),
            "grant_types": list(self.grant_types),
            "scope": self.scope,
            "require_dpop": self.require_dpop,
            "enabled": self.enabled,
            "created_at": self.created_at,
            "jwks_kids": [k.get("kid") for k in (self.jwks or {}).get("keys", [])],
        }


def validate_redirect_uri(uri: str) -> str:
    """The URI, unchanged, if it may be registered (RFC 6749 §3.1.2, RFC 8252 §7.3, RFC 9700
    §2.1: absolute, no fragment, no wildcard, no userinfo; https or loopback http)."""
    if not isinstance(uri, str) or not uri:
        raise ClientError("A redirect URI must be a non-empty string.")
    if len(uri) > MAX_REDIRECT_URI_LENGTH:
        raise ClientError(f"A redirect URI may have at most {MAX_REDIRECT_URI_LENGTH} characters.")
    if not _URI_CHARS.fullmatch(uri):
        raise ClientError("A redirect URI may hold only printable ASCII characters, no spaces.")
    # RFC 3986 §2: never in a URI; a browser reads a backslash as "/", so the host could differ.
    if _NOT_URI_CHARS.intersection(uri):
        raise ClientError('A redirect URI may not contain any of <>"{}|\\^` characters.')
    if "*" in uri:
        raise ClientError("A redirect URI may not contain wildcards ('*').")
    if "#" in uri:
        raise ClientError("A redirect URI may not contain a fragment (RFC 6749 §3.1.2).")
    try:
        parts = urlsplit(uri)
        host = parts.hostname
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise ClientError("A redirect URI must be an absolute URI.") from None
    # The scheme as written (urlsplit lowers it): URIs are compared exactly, so one spelling.
    if not uri.startswith(("https://", "http://")) or not parts.netloc or not host:
        raise ClientError("A redirect URI must be an absolute https (or loopback http) URI.")
    if "@" in parts.netloc:
        raise ClientError("A redirect URI may not contain user information.")
    if parts.scheme == "http" and host not in LOOPBACK_HOSTS:
        raise ClientError(
            "http redirect URIs are allowed only on a loopback host "
            "(127.0.0.1, [::1], localhost; RFC 8252 §7.3); use https."
        )
    return uri


def _validate_name(name: str) -> str:
    if not isinstance(name, str):
        raise ClientError("The client name must be a string.")
    name = name.strip()
    if not name or len(name) > MAX_NAME:
        raise ClientError(f"The client name must have 1 to {MAX_NAME} characters.")
    if not name.isprintable():
        raise ClientError("The client name may not contain control characters.")
    return name


def _validate_grant_types(
    grant_types: list[str] | None, auth_method: str, redirect_uris: list[str]
) -> tuple[str, ...]:
    if grant_types is None:
        if auth_method == "none" or redirect_uris:
            return ("authorization_code", "refresh_token")
        return ("client_credentials",)
    if not isinstance(grant_types, list) or not grant_types:
        raise ClientError("At least one grant type is required.")
    for grant in grant_types:
        if grant not in GRANT_TYPES:
            raise ClientError(f"Unknown grant type; allowed: {', '.join(GRANT_TYPES)}.")
    chosen = tuple(g for g in GRANT_TYPES if g in grant_types)  # canonical order, no repeats
    if auth_method == "none" and "client_credentials" in chosen:
        raise ClientError("A public client cannot use the client_credentials grant.")
    if "refresh_token" in chosen and "authorization_code" not in chosen:
        # RFC 6749 §4.4.3: client_credentials issues no refresh token.
        raise ClientError("The refresh_token grant needs the authorization_code grant.")
    return chosen


def _validate_redirect_uris(
    redirect_uris: list[str], grant_types: tuple[str, ...]
) -> tuple[str, ...]:
    if not isinstance(redirect_uris, list):
        raise ClientError("redirect_uris must be a list.")
    too_many = ClientError(f"At most {MAX_REDIRECT_URIS} redirect URIs may be registered.")
    if len(redirect_uris) > 4 * MAX_REDIRECT_URIS:
        raise too_many  # before any work on them
    uris = tuple(dict.fromkeys(validate_redirect_uri(u) for u in redirect_uris))
    if len(uris) > MAX_REDIRECT_URIS:
        raise too_many
    if "authorization_code" in grant_types and not uris:
        raise ClientError("The authorization_code grant needs at least one redirect URI.")
    if uris and "authorization_code" not in grant_types:
        raise ClientError("Redirect URIs are only for the authorization_code grant.")
    return uris


def _validate_scope(scope: str, grant_types: tuple[str, ...]) -> str:
    if not isinstance(scope, str):
        raise ClientError("scope must be a space-separated string.")
    if len(scope) > MAX_SCOPE_LENGTH:
        raise ClientError(f"scope may have at most {MAX_SCOPE_LENGTH} characters.")
    tokens = [t for t in scope.split(" ") if t]
    if not tokens:
        raise ClientError("At least one scope is required.")
    for token in tokens:
        if not _SCOPE_TOKEN.fullmatch(token):
            raise ClientError("scope must be scope tokens separated by single spaces.")
        match = SCOPE_PATTERN.fullmatch(token)
        if match is None:
            if token not in PLAIN_SCOPES:
                raise ClientError(
                    "Unknown scope; allowed: "
                    + ", ".join(sorted(PLAIN_SCOPES))
                    + ", and SMART resource scopes such as patient/Observation.rs."
                )
            context = "user"  # every plain scope is about a user's authorization
        elif not match["actions"]:
            raise ClientError("A resource scope needs at least one action letter (cruds).")
        else:
            context = match["context"]
        if context == "system" and "client_credentials" not in grant_types:
            raise ClientError("system/ scopes need the client_credentials grant.")
        if context != "system" and "authorization_code" not in grant_types:
            raise ClientError(
                "patient/, user/, openid and launch scopes need the authorization_code grant."
            )
    return " ".join(dict.fromkeys(tokens))


def _b64_length(value: object) -> int:
    if not isinstance(value, str):
        return 0
    try:
        return len(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    except (binascii.Error, ValueError):
        return 0


def validate_jwks(jwks: object) -> dict[str, Any]:
    """A JWK set of public signing keys (RFC 7517 §5), for `private_key_jwt`."""
    if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
        raise ClientError('jwks must be a JWK set: {"keys": [...]}.')
    keys = jwks["keys"]
    if not 1 <= len(keys) <= MAX_KEYS:
        raise ClientError(f"jwks must hold 1 to {MAX_KEYS} keys.")
    try:
        size = len(json.dumps(jwks))
    except (TypeError, ValueError):
        raise ClientError("jwks is not a valid JWK set.") from None
    if size > MAX_JWKS_BYTES:
        raise ClientError("jwks is too large.")
    for key in keys:
        if not isinstance(key, dict):
            raise ClientError("jwks is not a valid JWK set.")
        if key.get("kty") not in _ASYMMETRIC_KTY:
            raise ClientError("jwks may hold only public RSA, EC or OKP keys (no 'oct' keys).")
        if _PRIVATE_MEMBERS & key.keys():
            raise ClientError("jwks may hold only public keys: a private key was given.")
        if "alg" in key and key["alg"] not in _SIGNING_ALGS:
            raise ClientError("A key's alg must be an asymmetric signing algorithm.")
        if key.get("use", "sig") != "sig":
            raise ClientError("A key's use must be 'sig'.")
        if key["kty"] == "RSA" and _b64_length(key.get("n")) * 8 < MIN_RSA_BITS:
            raise ClientError(f"RSA keys must have at least {MIN_RSA_BITS} bits.")
    if len(keys) > 1:
        kids = [key.get("kid") for key in keys]
        if not all(isinstance(k, str) and k for k in kids) or len(set(kids)) != len(kids):
            raise ClientError("With more than one key, each key needs a unique kid.")
    try:
        imported = KeySet.import_key_set({"keys": keys})
    except Exception:  # joserfc raises a variety of types for a malformed key
        raise ClientError("jwks is not a valid JWK set.") from None
    if any(key.is_private for key in imported.keys):
        raise ClientError("jwks may hold only public keys: a private key was given.")
    return {"keys": keys}


def _client(row: RowMapping) -> Client:
    return Client(
        id=row["id"],
        name=row["name"],
        auth_method=row["auth_method"],
        secret_hash=row["secret_hash"],
        jwks=row["jwks"],
        redirect_uris=tuple(row["redirect_uris"]),
        grant_types=tuple(row["grant_types"]),
        scope=row["scope"],
        require_dpop=bool(row["require_dpop"]),
        enabled=bool(row["enabled"]),
        created_at=row["created_at"],
    )


class ClientRegistry:
    """Registered clients in `oauth_clients`; a disabled client stays (its id is never reused)."""

    def __init__(
        self,
        engine: AsyncEngine,
        instance_secrets: InstanceSecrets,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._secrets = instance_secrets
        self.clock = clock

    def _secret_hash(self, secret: str) -> str:
        return self._secrets.keyed_hash(_SECRET_DOMAIN + secret)

    async def add(
        self,
        name: str,
        *,
        auth_method: str,
        redirect_uris: builtins.list[str],
        scope: str,
        grant_types: builtins.list[str] | None = None,
        jwks: dict[str, Any] | None = None,
        require_dpop: bool = False,
    ) -> tuple[Client, str | None]:
        """Register a client; return it and its secret (shown once; `client_secret_basic` only).
        Raises `ClientError` and stores nothing when any value can't be accepted."""
        name = _validate_name(name)
        if auth_method not in AUTH_METHODS:
            raise ClientError(f"Unknown auth method; allowed: {', '.join(AUTH_METHODS)}.")
        if not isinstance(redirect_uris, list):
            raise ClientError("redirect_uris must be a list.")
        grants = _validate_grant_types(grant_types, auth_method, redirect_uris)
        uris = _validate_redirect_uris(redirect_uris, grants)
        scope = _validate_scope(scope, grants)
        if auth_method == "private_key_jwt":
            if jwks is None:
                raise ClientError("private_key_jwt needs the client's public keys (jwks).")
            jwks = validate_jwks(jwks)
        elif jwks is not None:
            raise ClientError("jwks is only for private_key_jwt clients.")
        if not isinstance(require_dpop, bool):
            raise ClientError("require_dpop must be true or false.")
        secret = (
            secrets.token_urlsafe(SECRET_BYTES) if auth_method == "client_secret_basic" else None
        )
        client = Client(
            id=CLIENT_ID_PREFIX + secrets.token_urlsafe(18),
            name=name,
            auth_method=auth_method,
            secret_hash=self._secret_hash(secret) if secret is not None else None,
            jwks=jwks,
            redirect_uris=uris,
            grant_types=grants,
            scope=scope,
            require_dpop=require_dpop,
            enabled=True,
            created_at=self.clock(),
        )
        async with write_transaction(self._engine) as conn:
            await conn.execute(
                insert(oauth_clients).values(
                    id=client.id,
                    name=client.name,
                    auth_method=client.auth_method,
                    secret_hash=client.secret_hash,
                    jwks=client.jwks,
                    redirect_uris=list(client.redirect_uris),
                    grant_types=list(client.grant_types),
                    scope=client.scope,
                    require_dpop=client.require_dpop,
                    enabled=True,
                    created_at=client.created_at,
                )
            )
        return client, secret

    async def get(self, client_id: str) -> Client | None:
        """The client (a disabled one with `enabled=False`), or None for an unknown id and for
        a string no client id could be (never looked up)."""
        if not isinstance(client_id, str) or not _CLIENT_ID.fullmatch(client_id):
            return None
        async with self._engine.connect() as conn:
            row = (
                (await conn.execute(select(oauth_clients).where(oauth_clients.c.id == client_id)))
                .mappings()
                .first()
            )
        return _client(row) if row is not None else None

    async def list(self) -> builtins.list[Client]:
        async with self._engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(oauth_clients).order_by(oauth_clients.c.created_at, oauth_clients.c.id)
                )
            ).mappings()
            return [_client(row) for row in rows]

    async def disable(self, client_id: str) -> bool:
        """Mark the client disabled; False if it is unknown or already disabled. The tokens it
        holds live on: `disable_client` is the whole operation."""
        if not isinstance(client_id, str) or not _CLIENT_ID.fullmatch(client_id):
            return False
        async with write_transaction(self._engine) as conn:
            result = await conn.execute(
                update(oauth_clients)
                .where(and_(oauth_clients.c.id == client_id, oauth_clients.c.enabled.is_(True)))
                .values(enabled=False, disabled_at=self.clock())
            )
        return result.rowcount == 1

    async def live_families(self, client_id: str) -> builtins.list[str]:
        """The ids of the client's unrevoked refresh families (its access tokens' `sid`s)."""
        async with self._engine.connect() as conn:
            return list(
                (
                    await conn.execute(
                        select(refresh_families.c.id).where(
                            and_(
                                refresh_families.c.client_id == client_id,
                                refresh_families.c.revoked_at.is_(None),
                            )
                        )
                    )
                ).scalars()
            )

    async def revoke_families(self, family_ids: builtins.list[str], reason: str) -> None:
        if not family_ids:
            return
        async with write_transaction(self._engine) as conn:
            await conn.execute(
                update(refresh_families)
                .where(
                    and_(
                        refresh_families.c.id.in_(family_ids),
                        refresh_families.c.revoked_at.is_(None),
                    )
                )
                .values(revoked_at=self.clock(), revoked_reason=reason)
            )

    def check_secret(self, client: Client, secret: str) -> bool:
        """Whether `secret` is the client's secret (constant time over the keyed hashes)."""
        if client.secret_hash is None or not isinstance(secret, str):
            return False
        if not secret or len(secret) > MAX_SECRET_LENGTH:
            return False
        return hmac.compare_digest(self._secret_hash(secret), client.secret_hash)


async def register_client(
    clients: ClientRegistry,
    events: SecurityEventLog,
    name: str,
    *,
    by: str = CLI,
    ctx: RequestContext = NO_CONTEXT,
    **fields: Any,
) -> tuple[Client, str | None]:
    """`ClientRegistry.add` (same keyword fields) plus the `client_registered` event (which
    never holds the secret)."""
    client, secret = await clients.add(name, **fields)
    await events.record(
        SecurityEvent(
            "client_registered",
            "success",
            client_id=client.id,
            source_address=ctx.address,
            request_id=ctx.request_id,
            details={
                "by": by,
                "auth_method": client.auth_method,
                "grant_types": list(client.grant_types),
                "scope": client.scope,
                "redirect_uris": len(client.redirect_uris),
                "require_dpop": client.require_dpop,
            },
        )
    )
    return client, secret


async def disable_client(
    client_id: str,
    *,
    clients: ClientRegistry,
    revocations: RevocationList,
    events: SecurityEventLog,
    settings: Settings,
    by: str = CLI,
    ctx: RequestContext = NO_CONTEXT,
) -> Client | None:
    """Disable the client and cut off what it already holds; None for an unknown id.

    Its refresh families are revoked, and so are their access tokens (by `sid`) and its own
    client-credentials tokens (`sub` = the client id, issued up to now). The denials are
    written before the families are marked, so a call that failed half way can be repeated:
    on an already disabled client it writes them again and finishes the job.
    """
    client = await clients.get(client_id)
    if client is None:
        return None
    changed = await clients.disable(client.id)
    now = clients.clock()
    # A denial must outlive every access token it can match, whatever ttl issued it.
    until = now + MAX_ACCESS_TOKEN_TTL_SECONDS + settings.clock_leeway_seconds
    sids = await clients.live_families(client.id)
    if sids:
        await revocations.revoke_sessions(sids, until)
    # `iat` is whole seconds: deny the current second too (the client gets no new token now).
    await revocations.revoke_user(client.id, math.floor(now) + 1, until)
    await clients.revoke_families(sids, "client_disabled")
    await events.record(
        SecurityEvent(
            "client_disabled",
            "success",
            client_id=client.id,
            source_address=ctx.address,
            request_id=ctx.request_id,
            details={"by": by, "sessions": len(sids), "already_disabled": not changed},
        )
    )
    return dataclasses.replace(client, enabled=False)
