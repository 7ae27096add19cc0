"""`GET /.well-known/jwks.json`: the public halves of the signing keys (current, next, previous)."""

from __future__ import annotations

import time

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

router = APIRouter()


@router.get("/.well-known/jwks.json", tags=["tokens"])
async def jwks(request: Request) -> Response:
    keyring = request.app.state.services.keyring
    # Short enough that a relying party sees a newly published next key well before rotation.
    return Response(
        orjson.dumps(keyring.jwks(time.time())),
        media_type="application/json",
        headers={"Cache-Control": "public, max-age=300"},
    )
