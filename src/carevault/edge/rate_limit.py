"""Rate limits: moving windows (the `limits` library) per client address, per verified principal,
and a stricter per-address class for the sign-in endpoints.

Classes (the `limit` label of `carevault_rate_limited_total`, and the policy names in the
headers):

- ``address``: every request, keyed by the client address (edge/client_address.py: the peer,
  or X-Forwarded-For only when the peer is one of `trusted_proxies`, so a client cannot rotate
  that header to escape). IPv6 clients are keyed by their /64, the block one subscriber
  usually holds, so that walking through it does not buy a fresh budget per address.
- ``auth``: requests under /auth/ and /oauth/ that carry no verified access token (password
  and second-factor logins, token, authorize, introspection: the endpoints that take guessable
  secrets) count against this stricter per-address class as well as against ``address``.
  Per-account lockout lives in identity/throttle; this class bounds guessing across accounts
  from one address.
- ``principal``: requests with `Authorization: Bearer|DPoP <access token>` whose token the
  server verifies (services' verifier: signature with our keys, kid, alg, iss, aud, exp; a
  cache hit for a token seen before, one signature check otherwise), keyed by its `sub`. The
  claims of an unverified token are never used: anyone can mint a JWT naming a victim's `sub`,
  and keying on it would let them spend the victim's budget. A token that fails verification
  falls back to the address class alone. Revocation is not consulted here (a Redis round trip
  on every request); a revoked token was issued by us to that principal, so only someone who
  held it can spend that budget, and the authenticate step refuses it right after. Browser
  sessions (cookie, no Authorization header) are bounded by the address class: resolving a
  session costs a database read per request.

Order: ``address`` first, and only a request within that budget has its token verified (then
``principal``, or ``auth`` for a sign-in request without a verified token), so a flood of
forged tokens costs at most one signature check per allowed request. Each class counts a
request it sees even when a later class refuses it.

Not limited: GET /healthz, /readyz and /metrics. Load balancers and orchestrators poll them
from one address, a refused probe takes a healthy instance out of service, they read nothing
a caller could abuse (/metrics has its own address/token rule), and they must keep answering
while the rate-limit store is down. CORS preflights never reach this middleware: the CORS
middleware outside it answers them itself (no handler, no database), so they spend no budget;
a plain OPTIONS that is not a preflight is an ordinary request.

Answers (RFC 6585 §4, RFC 9110 §10.2.3): 429 with `Retry-After` (whole seconds until the
oldest request in the exhausted window leaves it), as problem+json, or as a FHIR
OperationOutcome (code `throttled`) under /fhir. Every limited response, allowed or refused,
carries the IETF RateLimit fields (draft-ietf-httpapi-ratelimit-headers-09, structured-field
Lists, one item per class that applied):

    RateLimit-Policy: "address";q=1200;w=60, "principal";q=1200;w=60
    RateLimit: "address";r=1187;t=41, "principal";r=1190;t=52

`q` is the quota and `w` the window in seconds; `r` what remains of it and `t` the seconds
until the oldest counted request leaves the window (a slot frees). On a 429 the exhausted class
has `r=0` and its `t` equals `Retry-After`.

Storage: `rate_limit_storage_url`, else `redis_url`, else this process's memory. Memory is the
embedded default and is per process: with `carevault serve --workers N` each worker keeps its
own windows, so a client may get up to N times the limit. Use Redis for several workers or
hosts; then every process shares one window per key. Failing closed: when the store cannot be
asked (Redis down or slow: 1 s timeouts), the request is refused with 503 rather than let
through unlimited.

Keys hold no PHI, no address and no token: `HMAC-SHA256(k, class ‖ value)` with `k` derived
from the instance secret (keys/), which also namespaces them: two deployments (or two test
apps) on one Redis never share counters, while every process of one deployment (same keys
directory) does.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
import math
import time
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from limits import RateLimitItem, parse
from limits.aio.storage import Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from carevault.config import Settings
from carevault.edge.client_address import client_address
from carevault.edge.metrics import RATE_LIMITED

log = structlog.get_logger("carevault.edge")

ADDRESS = "address"
PRINCIPAL = "principal"
AUTH = "auth"

EXEMPT_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
AUTH_PREFIXES = ("/auth", "/oauth")
FHIR_PREFIX = "/fhir"
KEY_PREFIX = "carevault-rate"
STORAGE_TIMEOUT_SECONDS = 1.0
IPV6_PREFIX = 64
_KEY_LABEL = b"carevault rate-limit keys v1"
_REDIS_SCHEMES = ("redis", "rediss", "valkey", "valkeys")


class RateLimitUnavailable(Exception):
    """The rate-limit store could not be asked; the request must be refused (fail closed)."""


@dataclass(frozen=True)
class Policy:
    name: str
    item: RateLimitItem

    @property
    def quota(self) -> int:
        return int(self.item.amount)

    @property
    def window(self) -> int:
        return int(self.item.get_expiry())


@dataclass(frozen=True)
class Outcome:
    policy: Policy
    allowed: bool
    remaining: int
    reset_after: int  # seconds until the oldest counted request leaves the window


def storage_uri(settings: Settings) -> str:
    """The `limits` storage URI: `rate_limit_storage_url`, else `redis_url`, else memory.
    Plain `redis://` (and `rediss://`, `redis+cluster://`, ...) URLs get the `async+` scheme."""
    url = settings.rate_limit_storage_url or settings.redis_url
    if not url:
        return "async+memory://"
    return url if url.lower().startswith("async+") else f"async+{url}"


def build_storage(uri: str) -> Storage:
    """A `limits` async storage for `uri` with moving-window support; errors wrapped as
    `limits.errors.StorageError`. Raises at start-up for an unknown or unsuitable scheme."""
    scheme = uri.split("://", 1)[0].lower().removeprefix("async+")
    options: dict[str, Any] = {}
    if scheme.split("+", 1)[0] in _REDIS_SCHEMES:
        options = {
            "implementation": "redispy",
            "key_prefix": KEY_PREFIX,
            "socket_timeout": STORAGE_TIMEOUT_SECONDS,
            "socket_connect_timeout": STORAGE_TIMEOUT_SECONDS,
        }
    storage = storage_from_string(uri, wrap_exceptions=True, **options)
    if not isinstance(storage, Storage):
        raise ValueError("the rate-limit storage must be an async storage (async+...)")
    return storage


def address_bucket(address: str | None) -> str:
    """The value an address is counted under: the IPv4 address, the /64 of an IPv6 one."""
    if address is None:
        return "unknown"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/{IPV6_PREFIX}", strict=False))
    return str(ip)


def _is_under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def _policy(name: str, notation: str) -> Policy:
    try:
        item = parse(notation)
    except ValueError:
        raise ValueError(
            f"rate limit {name!r}: {notation!r} is not in the form N/second|minute|hour|day"
        ) from None
    if item.amount < 1:
        raise ValueError(f"rate limit {name!r}: the quota must be at least 1")
    return Policy(name, item)


def policy_header(outcomes: list[Outcome]) -> str:
    return ", ".join(f'"{o.policy.name}";q={o.policy.quota};w={o.policy.window}' for o in outcomes)


def state_header(outcomes: list[Outcome]) -> str:
    return ", ".join(f'"{o.policy.name}";r={o.remaining};t={o.reset_after}' for o in outcomes)


class RateLimit:
    """Pure ASGI middleware; see the module docstring for what it counts and how it answers."""

    def __init__(self, app: ASGIApp, *, settings: Settings, services: Any) -> None:
        self.app = app
        self.enabled = settings.rate_limit_enabled
        self.trusted_proxies = list(settings.trusted_proxies)
        self.verifier = services.verifier
        # Configuration is checked here, once: a bad limit or storage URL stops the start-up.
        self.address = _policy(ADDRESS, settings.rate_limit_per_address)
        self.principal = _policy(PRINCIPAL, settings.rate_limit_per_principal)
        self.auth = _policy(AUTH, settings.rate_limit_auth_per_address)
        key = hmac.new(services.secrets.subject_hash, _KEY_LABEL, hashlib.sha256).digest()
        self._key = key
        self.namespace = hmac.new(key, b"namespace", hashlib.sha256).hexdigest()[:16]
        self.storage: Storage | None = None
        self.limiter: MovingWindowRateLimiter | None = None
        if self.enabled:
            self.storage = build_storage(storage_uri(settings))
            self.limiter = MovingWindowRateLimiter(self.storage)

    # --- ASGI ----------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._closing_send(send))
            return
        if scope["type"] != "http" or self.limiter is None or scope.get("path", "") in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        try:
            outcomes = await self._check(scope, path)
        except RateLimitUnavailable:
            await self._answer(send, path, 503, [], {"retry-after": "1"})
            return
        refused = outcomes[-1]
        if not refused.allowed:
            RATE_LIMITED.labels(limit=refused.policy.name).inc()
            log.info("rate_limited", limit=refused.policy.name)
            await self._answer(send, path, 429, outcomes, {"retry-after": str(refused.reset_after)})
            return
        extra = [
            (b"ratelimit-policy", policy_header(outcomes).encode()),
            (b"ratelimit", state_header(outcomes).encode()),
        ]

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _closing_send(self, send: Send) -> Send:
        async def closing_send(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                await self.close()
            await send(message)

        return closing_send

    async def close(self) -> None:
        """Close the Redis client's connections (memory storage has nothing to close)."""
        client = getattr(getattr(self.storage, "bridge", None), "storage", None)
        closer = getattr(client, "aclose", None)
        if closer is not None:
            with contextlib.suppress(Exception):
                await closer()

    # --- counting ------------------------------------------------------------------------------

    async def _check(self, scope: Scope, path: str) -> list[Outcome]:
        """Count the request in each class that applies, in order; stop at the first refusal
        (then the last outcome is the refusing one)."""
        request = Request(scope)
        address = address_bucket(client_address(request, self.trusted_proxies))
        outcomes = [await self._hit(self.address, address)]
        if not outcomes[-1].allowed:
            return outcomes
        subject = self._verified_subject(request)
        if subject is not None:
            outcomes.append(await self._hit(self.principal, subject))
        elif any(_is_under(path, prefix) for prefix in AUTH_PREFIXES):
            # Only requests without a verified access token: a signed-in user's /auth/me,
            # refresh or userinfo is bounded by the principal class, and many clinicians
            # behind one NAT address must not share the sign-in budget for those.
            outcomes.append(await self._hit(self.auth, address))
        return outcomes

    def _verified_subject(self, request: Request) -> str | None:
        """The `sub` of a valid access token in the Authorization header (parsed as the
        authenticate step parses it), or None."""
        header = request.headers.get("authorization")
        if not header:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() not in ("bearer", "dpop") or not token or token != token.strip():
            return None
        try:
            return str(self.verifier.verify(token).sub)
        except Exception:  # noqa: BLE001 - any failure: not a principal we verified
            return None

    def _identifiers(self, policy: Policy, value: str) -> tuple[str, str, str]:
        digest = hmac.new(
            self._key, policy.name.encode() + b"\0" + value.encode(), hashlib.sha256
        ).hexdigest()[:32]
        return self.namespace, policy.name, digest

    async def _hit(self, policy: Policy, value: str) -> Outcome:
        assert self.limiter is not None
        identifiers = self._identifiers(policy, value)
        try:
            allowed = await self.limiter.hit(policy.item, *identifiers)
            stats = await self.limiter.get_window_stats(policy.item, *identifiers)
        except Exception as err:
            # Whatever the store raised (connection refused, timeout, a failing script): deny.
            log.error("rate_limit_unavailable", error_type=type(err).__name__)
            raise RateLimitUnavailable from None
        remaining = max(0, int(stats.remaining)) if allowed else 0
        reset_after = max(1, math.ceil(stats.reset_time - time.time()))
        return Outcome(policy, allowed, remaining, reset_after)

    # --- answers -------------------------------------------------------------------------------

    async def _answer(
        self,
        send: Send,
        path: str,
        status: int,
        outcomes: list[Outcome],
        headers: dict[str, str],
    ) -> None:
        if _is_under(path, FHIR_PREFIX):
            code, text = (
                ("throttled", "Too many requests")
                if status == 429
                else ("transient", "Service temporarily unavailable")
            )
            body = orjson.dumps(
                {
                    "resourceType": "OperationOutcome",
                    "issue": [{"severity": "error", "code": code, "diagnostics": text}],
                }
            )
            media_type = b"application/fhir+json"
        else:
            title, detail = (
                ("Too Many Requests", "Too many requests.")
                if status == 429
                else ("Service Unavailable", "Service temporarily unavailable.")
            )
            body = orjson.dumps(
                {"type": "about:blank", "title": title, "status": status, "detail": detail}
            )
            media_type = b"application/problem+json"
        raw_headers = [
            (b"content-type", media_type),
            (b"content-length", str(len(body)).encode()),
            (b"cache-control", b"no-store"),
            *((name.encode(), value.encode()) for name, value in headers.items()),
        ]
        if outcomes:
            raw_headers.append((b"ratelimit-policy", policy_header(outcomes).encode()))
            raw_headers.append((b"ratelimit", state_header(outcomes).encode()))
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": body})
