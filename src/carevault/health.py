"""`GET /healthz` (the process is up) and `GET /readyz` (database and signing keys usable)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from carevault.edge.problems import problem_response

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> JSONResponse:
    return JSONResponse({"status": "ok"}, headers={"Cache-Control": "no-store"})


@router.get("/readyz", responses={503: {"description": "Not ready"}})
async def readyz(request: Request) -> JSONResponse:
    services = request.app.state.services
    try:
        async with services.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        services.keyring.current  # noqa: B018 - raises if the key set is unusable
    except Exception:
        return problem_response(503, "Not ready.")
    return JSONResponse({"status": "ready"}, headers={"Cache-Control": "no-store"})
