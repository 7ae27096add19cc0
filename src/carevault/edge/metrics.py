"""Prometheus metrics and the /metrics route.

(Stub: filled in by issue 8.)
"""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
