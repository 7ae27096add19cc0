"""A token issued to an OAuth app reaches the FHIR API and nothing else of carevault: not the
account, factors, sessions, admin, break-glass or audit APIs (an app the user approved for
`openid` alone must not plant a TOTP factor and receive the recovery codes)."""

from __future__ import annotations

import re

from tests.oauth.support import OAuthWorld
from tests.oauth.test_grants import bearer, code_for, exchange

# Routes an app's token is meant for, or that take no bearer token at all.
OPEN_TO_APPS = re.compile(
    r"^/(fhir(/|$)|oauth/(userinfo|token|revoke|introspect|authorize)|\.well-known/|healthz|"
    r"readyz|openapi\.json|audit/public-key|auth/(login|refresh|mfa/verify|session(/|$)|webauthn/login))"
)


async def test_app_token_is_refused_outside_fhir(world: OAuthWorld) -> None:
    code, verifier = await code_for(world, "patient-app", "patA", "openid")
    token = (await exchange(world, "patient-app", code, verifier)).json()["access_token"]
    headers = bearer(token)
    # the attack of the review: enrolling the app's own TOTP factor
    enroll = await world.http.post("/auth/mfa/totp/enroll", headers=headers, json={})
    assert enroll.status_code == 403
    assert 'error="insufficient_scope"' in enroll.headers["www-authenticate"]
    for path in ("/auth/me", "/auth/sessions", "/oauth/consents", "/audit", "/admin/clients"):
        assert (await world.http.get(path, headers=headers)).status_code == 403, path
    tried = 0
    for path, operations in world.app.openapi()["paths"].items():
        if OPEN_TO_APPS.match(path):
            continue
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        for method in operations:
            response = await world.http.request(method.upper(), concrete, headers=headers, json={})
            assert response.status_code in (403, 404, 405), (method, path, response.status_code)
            tried += 1
    assert tried >= 25
    # and the same token still reads FHIR (userinfo answers for openid)
    assert (await world.http.get("/oauth/userinfo", headers=headers)).status_code == 200
