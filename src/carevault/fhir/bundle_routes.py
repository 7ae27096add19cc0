"""``POST /fhir``: transaction and batch Bundles (processing in fhir/bundles.py).

Registered before the main FHIR router. Same caller rule as every FHIR route (`Caller`);
the body size is bounded by the RequestLimits middleware, the entry count by
`bundles.MAX_ENTRIES`, inline binary content by `fhir_max_attachment_bytes`.

Write entries of the response carry their response element only, unless the request says
``Prefer: return=representation`` (then the written resources too).

``Idempotency-Key`` (fhir/idempotency.py): the key is claimed before the Bundle is processed,
so that two requests with one key never both write (the second waits for the first and
replays it); the same key with the same body within 24 h replays the first response without
writing (the written versions are read again for GET entries and representations), another
body is a 422. A Bundle refused as a whole releases the key, so a corrected retry can use it.
The key and the replay do not depend on ``Prefer``: a replay is rendered as its request asks.
The recorded response holds no resource body and is sealed under the envelope cipher's
``type:Bundle`` key (associated data: the key's hash), see `idempotency`.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from carevault.crypto.envelope import DecryptionFailed
from carevault.fhir import idempotency, outcome
from carevault.fhir.authorization import EntryAccess
from carevault.fhir.bundles import BundleError, BundleResponse, process
from carevault.fhir.routes import (
    Caller,
    FhirError,
    _integrity_failure,
    fhir_response,
    idempotency_claim_error,
    idempotency_key,
)

router = APIRouter(prefix="/fhir", tags=["fhir"])

RESPONSE_SCOPE = "type:Bundle"
_RESPONSE_AD = b"carevault fhir idempotency response:"


def prefers_representation(request: Request) -> bool:
    """``Prefer: return=representation`` (RFC 7240; other preferences are ignored)."""
    for value in request.headers.getlist("prefer"):
        for preference in value.split(","):
            name, _, token = preference.split(";", 1)[0].partition("=")
            if name.strip().lower() == "return":
                return token.strip().strip('"').lower() == "representation"
    return False


@router.post("")
async def transaction_or_batch(request: Request, principal: Caller) -> Response:
    services = request.app.state.services
    key = idempotency_key(request, principal)
    raw = await request.body()
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise FhirError(400, outcome.invalid_request()) from None
    representation = prefers_representation(request)

    async def on_integrity_failure() -> tuple[int, dict[str, Any]]:
        err = await _integrity_failure(request, principal)
        return err.status, err.body

    async def run() -> BundleResponse:
        try:
            return await process(
                services.store,
                parsed,
                on_integrity_failure,
                EntryAccess(request, principal),
                max_attachment_bytes=services.settings.fhir_max_attachment_bytes,
            )
        except BundleError as err:
            raise FhirError(err.status, err.body) from None

    def respond(response: BundleResponse) -> Response:
        headers = {"Preference-Applied": "return=representation"} if representation else None
        return fhir_response(response.render(representation), 200, headers)

    if key is None:
        return respond(await run())

    keys = idempotency.IdempotencyKeys(services.engine, getattr(services, "clock", time.time))
    try:
        recorded = await keys.claim(key, idempotency.bundle_request_hash(raw))
    except (idempotency.KeyReused, idempotency.StillPending) as err:
        raise idempotency_claim_error(err) from None
    associated = _RESPONSE_AD + key.encode()
    if recorded is not None:  # replay the first response, write nothing
        try:
            sealed = await keys.response(key)
            if sealed is None:
                raise DecryptionFailed("no recorded response")
            plain = await services.envelope.decrypt(RESPONSE_SCOPE, sealed, associated)
            replay = BundleResponse.from_record(orjson.loads(plain))
        except (DecryptionFailed, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise await _integrity_failure(request, principal) from None
        try:
            await replay.load_bodies(
                services.store,
                representation,
                on_integrity_failure,
                EntryAccess(request, principal),
            )
        except BundleError as err:
            raise FhirError(err.status, err.body) from None
        return respond(replay)
    try:
        response = await run()
        sealed = await services.envelope.encrypt(
            RESPONSE_SCOPE, orjson.dumps(response.record()), associated
        )
    except FhirError:
        await keys.release(key)  # refused as a whole: nothing was written, a retry may go
        raise
    # Any other failure (a 500) keeps the claim pending: some batch entries may be written,
    # so a retry with the key gets 409 until the lease (PENDING_LEASE_SECONDS) runs out
    # rather than writing them twice at once.
    await keys.complete_response(key, 200, sealed)
    return respond(response)
