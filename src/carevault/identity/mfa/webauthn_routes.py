"""`/auth/webauthn/*`: registration and login ceremonies (placeholder; issue 6)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/auth/webauthn", tags=["mfa"])
