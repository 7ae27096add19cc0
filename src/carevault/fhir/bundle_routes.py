"""``POST /fhir``: transaction and batch Bundles (processing in fhir/bundles.py).

Registered before the main FHIR router. Same caller rule as every FHIR route (`Caller`);
the body size is bounded by the RequestLimits middleware, the entry count by
`bundles.MAX_ENTRIES`.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from carevault.fhir import outcome
from carevault.fhir.bundles import BundleError, process
from carevault.fhir.routes import Caller, FhirError, _integrity_failure, fhir_response

router = APIRouter(prefix="/fhir", tags=["fhir"])


@router.post("")
async def transaction_or_batch(request: Request, principal: Caller) -> Response:
    raw = await request.body()
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise FhirError(400, outcome.invalid_request()) from None

    async def on_integrity_failure() -> tuple[int, dict[str, Any]]:
        err = await _integrity_failure(request, principal)
        return err.status, err.body

    try:
        services = request.app.state.services
        body = await process(
            services.store,
            parsed,
            on_integrity_failure,
            max_attachment_bytes=services.settings.fhir_max_attachment_bytes,
        )
    except BundleError as err:
        raise FhirError(err.status, err.body) from None
    return fhir_response(body)
