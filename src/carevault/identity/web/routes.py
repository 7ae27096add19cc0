"""`/auth/session/*` and `/auth/sessions`: browser login, logout, the session list (placeholder;
issue 6)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/auth", tags=["sessions"])
