"""Security headers on every response: pure ASGI middleware near the outside of the stack.

Whatever answers (a route, a problem handler, the body limits' 413, the rate limit's 429, a
CORS preflight, a 404 of an unknown path, or a crash), the response leaves with:

- `Content-Security-Policy: default-src 'none'; frame-ancestors 'none'` for the API, unless the
  route set its own (the OAuth sign-in and consent pages do: they need inline style);
- `Cache-Control: no-store` unless the route set its own (records and tokens must not sit in a
  browser or proxy cache, RFC 6749 §5.1; the public metadata and key sets say `public,
  max-age=300` themselves and hold nothing private);
- `X-Content-Type-Options: nosniff`, `Referrer-Policy: no-referrer`, `X-Frame-Options: DENY`,
  `Cross-Origin-Opener-Policy: same-origin`, `Cross-Origin-Resource-Policy: same-origin` (it
  binds only no-cors loads: CORS calls from listed origins are unaffected) and a
  `Permissions-Policy` denying the powerful features no page of ours uses (WebAuthn's
  `publickey-credentials-*` keep their default, 'self': the portal signs in with them);
- `Strict-Transport-Security` (RFC 6797) when the server speaks TLS itself or its public URL
  (the issuer) is https, i.e. behind a TLS-terminating proxy. Browsers ignore it over plain
  HTTP (RFC 6797 §8.1), so it is never sent to a plain-HTTP deployment, where it would pin a
  host name to a scheme it cannot serve.

No `Server` banner: uvicorn's own is turned off in the CLI and any the app adds is dropped.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from carevault.config import Settings
from carevault.edge.problems import problem_response

HSTS = b"max-age=63072000; includeSubDomains"  # two years, the preload list's minimum
API_CSP = b"default-src 'none'; frame-ancestors 'none'"
NO_STORE = b"no-store"
PERMISSIONS_POLICY = (
    b"accelerometer=(), ambient-light-sensor=(), autoplay=(), battery=(), camera=(), "
    b"display-capture=(), geolocation=(), gyroscope=(), magnetometer=(), microphone=(), "
    b"midi=(), payment=(), usb=(), serial=(), bluetooth=(), hid=(), screen-wake-lock=(), "
    b"xr-spatial-tracking=(), browsing-topics=(), interest-cohort=()"
)

# Always ours: a route's own value is replaced, so no route can weaken them by accident.
_FIXED: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", PERMISSIONS_POLICY),
)
# Ours unless the route chose its own.
_DEFAULTS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", API_CSP),
    (b"cache-control", NO_STORE),
)
_DROPPED = frozenset({b"server", b"x-powered-by"})


def secure_headers(headers: list[tuple[bytes, bytes]], *, hsts: bool) -> list[tuple[bytes, bytes]]:
    """The response's headers with ours added (see the module docstring for which win)."""
    fixed = {name for name, _ in _FIXED}
    if hsts:
        fixed.add(b"strict-transport-security")
    out: list[tuple[bytes, bytes]] = []
    present: set[bytes] = set()
    for name, value in headers:
        lowered = name.lower()
        if lowered in fixed or lowered in _DROPPED:
            continue
        present.add(lowered)
        out.append((lowered, value))
    out.extend(_FIXED)
    if hsts:
        out.append((b"strict-transport-security", HSTS))
    out.extend((name, value) for name, value in _DEFAULTS if name not in present)
    return out


class SecurityHeaders:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.hsts = settings.tls_enabled or settings.issuer.startswith("https://")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def secured_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                message["headers"] = secure_headers(headers, hsts=self.hsts)
            await send(message)

        try:
            await self.app(scope, receive, secured_send)
        except Exception:
            # Starlette's outermost error middleware renders the 500 outside this one, so it
            # would leave without these headers: answer it here (the same generic problem the
            # app's handler gives) and let the error travel on to be logged as before.
            if not started:
                await problem_response(500, "Internal error.")(scope, receive, secured_send)
            raise
