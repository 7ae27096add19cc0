"""Security headers on every response.

(Stub: filled in by issue 8.)
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send


class SecurityHeaders:
    def __init__(self, app: ASGIApp, **options: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)
