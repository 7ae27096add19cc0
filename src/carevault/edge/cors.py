"""CORS (Fetch standard, "CORS protocol") for the listed browser origins only.

Starlette's `CORSMiddleware` does the matching; this subclass closes what it leaves open for a
credentialed API:

- it sends `Access-Control-Allow-Credentials` and `-Expose-Headers` on simple responses to any
  origin, listed or not, and its refused preflights still carry the allowed methods, headers
  and credentials: here an unlisted origin gets no `Access-Control-*` header at all;
- a refused preflight is a generic 403 (problem+json, or an OperationOutcome under /fhir)
  instead of a plain-text list of what failed;
- "*" and origin patterns are refused at start-up (settings refuse them earlier still): with
  credentials, a wildcard would hand every site the user's session.

A listed origin gets itself echoed (never "*"), credentials allowed, and every response varies
on Origin so that a shared cache never serves one origin's answer to another.
"""

from __future__ import annotations

from collections.abc import Collection

from starlette.datastructures import Headers, MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from carevault.edge.limits import refusal_response


class ListedOriginsCORS(CORSMiddleware):
    def __init__(
        self,
        app: ASGIApp,
        allow_origins: Collection[str] = (),
        allow_methods: Collection[str] = ("GET",),
        allow_headers: Collection[str] = (),
        allow_credentials: bool = False,
        expose_headers: Collection[str] = (),
        max_age: int = 600,
    ) -> None:
        if any("*" in origin for origin in allow_origins):
            raise ValueError("CORS origins must be listed one by one, never '*'")
        super().__init__(
            app,
            allow_origins=tuple(allow_origins),
            allow_methods=allow_methods,
            allow_headers=allow_headers,
            allow_credentials=allow_credentials,
            allow_origin_regex=None,
            allow_private_network=False,
            expose_headers=expose_headers,
            max_age=max_age,
        )

    def is_allowed_origin(self, origin: str) -> bool:
        return origin in self.allow_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if (
            scope["method"] == "OPTIONS"
            and "origin" in headers
            and "access-control-request-method" in headers
        ):
            await self.preflight(scope, headers)(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def preflight(self, scope: Scope, request_headers: Headers) -> Response:
        response = self.preflight_response(request_headers)
        if response.status_code == 200:
            return response
        # Refused (origin, method, headers or private network): say nothing about what would
        # have been allowed.
        refused = refusal_response(scope, 403, "forbidden", "Cross-origin request refused.")
        refused.headers["Vary"] = response.headers["Vary"]
        return refused

    async def send(self, message: Message, send: Send, request_headers: Headers) -> None:
        if message["type"] != "http.response.start":
            await send(message)
            return
        message.setdefault("headers", [])
        headers = MutableHeaders(scope=message)
        origin = request_headers.get("origin")
        if origin is not None and self.is_allowed_origin(origin):
            headers.update(self.simple_headers)
            self.allow_explicit_origin(headers, origin)
        else:
            headers.add_vary_header("Origin")
        await send(message)
