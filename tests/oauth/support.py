"""An OAuth world for the tests: an app whose issuer is https://testserver, a few users and
records, registered clients, a browser (an httpx client keeping the session cookie) that signs
in and approves on the HTML pages, and DPoP proofs and client assertions made with joserfc
(written from RFC 9449 and RFC 7523, not from the server's code)."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
from joserfc import jwt
from joserfc.jwk import ECKey

from carevault.app import create_app
from carevault.identity.roles import Role
from carevault.runtime import build_services
from tests.conftest import STRONG_PASSWORD

BASE = "https://testserver"
FHIR_BASE = f"{BASE}/fhir"
TOKEN_URL = f"{BASE}/oauth/token"
AUTHORIZE_URL = f"{BASE}/oauth/authorize"
REDIRECT = "https://app.example/callback"
FHIR = "application/fhir+json"


def hidden(page: str, name: str) -> str:
    match = re.search(rf'name="{name}" value="([^"]*)"', page)
    assert match, f"no {name} field in page: {page[:400]}"
    return html.unescape(match.group(1))


def query_of(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _full_size(jwk: dict[str, Any]) -> dict[str, Any]:
    """RFC 7518 §6.2.1.2: P-256 coordinates are exactly 32 octets (joserfc drops leading
    zero octets, about one key in a hundred)."""
    padded = dict(jwk)
    for name in ("x", "y"):
        raw = base64.urlsafe_b64decode(jwk[name] + "=" * (-len(jwk[name]) % 4))
        padded[name] = base64.urlsafe_b64encode(raw.rjust(32, b"\0")).rstrip(b"=").decode()
    return padded


class DpopKey:
    """A client's DPoP key and proofs (RFC 9449 §4.2), built with joserfc."""

    def __init__(self) -> None:
        self.key = ECKey.generate_key("P-256")
        self.public = _full_size(self.key.as_dict(private=False))

    def proof(
        self,
        method: str,
        url: str,
        *,
        access_token: str | None = None,
        nonce: str | None = None,
        iat: int | None = None,
        jti: str | None = None,
    ) -> str:
        claims: dict[str, Any] = {
            "jti": jti or uuid.uuid4().hex,
            "htm": method,
            "htu": url,
            "iat": int(time.time()) if iat is None else iat,
        }
        if access_token is not None:
            digest = hashlib.sha256(access_token.encode()).digest()
            claims["ath"] = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
        if nonce is not None:
            claims["nonce"] = nonce
        header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": self.public}
        return jwt.encode(header, claims, self.key, algorithms=["ES256"])


class ServiceKey:
    """A back-end service's key pair and its client assertions (RFC 7523 §2.2)."""

    def __init__(self) -> None:
        self.key = ECKey.generate_key("P-256", parameters={"kid": "svc-1"})

    @property
    def jwks(self) -> dict[str, Any]:
        return {"keys": [self.key.as_dict(private=False)]}

    def assertion(self, client_id: str, **overrides: Any) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": client_id,
            "sub": client_id,
            "aud": TOKEN_URL,
            "exp": now + 240,
            "iat": now,
            "jti": uuid.uuid4().hex,
        }
        claims.update(overrides)
        claims = {k: v for k, v in claims.items() if v is not None}
        header = {"alg": "ES256", "kid": "svc-1", "typ": "JWT"}
        return jwt.encode(header, claims, self.key, algorithms=["ES256"])


@dataclass
class OAuthWorld:
    app: Any
    services: Any
    http: httpx.AsyncClient  # an API client, no cookies kept between tests' roles
    ids: dict[str, str] = field(default_factory=dict)
    clients: dict[str, Any] = field(default_factory=dict)

    def transport(self) -> httpx.ASGITransport:
        return httpx.ASGITransport(app=self.app)

    def browser(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=self.transport(), base_url=BASE)

    async def register(self, name: str, **kwargs: Any) -> tuple[Any, str | None]:
        client, secret = await self.services.clients.add(name, **kwargs)
        self.clients[name] = client
        return client, secret

    async def authorize(
        self,
        browser: httpx.AsyncClient,
        url: str,
        username: str,
        *,
        approve: bool = True,
        patient: str | None = None,
        password: str = STRONG_PASSWORD,
    ) -> httpx.Response:
        """Drive the pages from the authorization URL to the redirect back to the client:
        sign in (if the browser is not signed in yet), then consent (if asked)."""
        page = await browser.get(url)
        if 'action="/oauth/authorize/login"' in page.text:
            form = {
                "request": hidden(page.text, "request"),
                "username": username,
                "password": password,
            }
            page = await browser.post("/oauth/authorize/login", data=form)
            assert page.status_code == 303, page.text
            page = await browser.get(page.headers["location"])
        if page.status_code == 302:
            return page  # consent remembered: straight back to the client
        assert page.status_code == 200 and "consent" in page.text, page.text
        form = {
            "request": hidden(page.text, "request"),
            "csrf_token": hidden(page.text, "csrf_token"),
            "decision": "approve" if approve else "deny",
        }
        if patient is not None:
            form["patient"] = patient
        return await browser.post("/oauth/authorize/consent", data=form)

    async def fhir_create(self, token: str, body: dict[str, Any]) -> str:
        response = await self.http.post(
            f"/fhir/{body['resourceType']}",
            json=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": FHIR},
        )
        assert response.status_code == 201, response.text
        return str(response.json()["id"])


async def build_oauth_world(stack: Any, settings: Any) -> OAuthWorld:
    services = build_services(settings)
    app = create_app(settings, services)
    await stack.enter_async_context(app.router.lifespan_context(app))
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=BASE)
    await stack.enter_async_context(http)
    world = OAuthWorld(app, services, http)
    accounts = services.accounts
    await accounts.add_user("svc", STRONG_PASSWORD, Role.service)
    login = await http.post("/auth/login", json={"username": "svc", "password": STRONG_PASSWORD})
    svc = login.json()["access_token"]
    prac = await world.fhir_create(svc, {"resourceType": "Practitioner", "name": [{"family": "A"}]})
    for name in ("A", "B"):
        world.ids[name] = await world.fhir_create(
            svc,
            {
                "resourceType": "Patient",
                "name": [{"family": f"Patient{name}", "given": ["Pat"]}],
                "birthDate": "1980-01-01",
            },
        )
        world.ids[f"obs{name}"] = await world.fhir_create(
            svc,
            {
                "resourceType": "Observation",
                "status": "final",
                "code": {"text": "weight"},
                "subject": {"reference": f"Patient/{world.ids[name]}"},
            },
        )
    await world.fhir_create(
        svc,
        {
            "resourceType": "CareTeam",
            "status": "active",
            "subject": {"reference": f"Patient/{world.ids['A']}"},
            "participant": [{"member": {"reference": f"Practitioner/{prac}"}}],
        },
    )
    world.ids["prac"] = prac
    await accounts.add_user("patA", STRONG_PASSWORD, Role.patient, patient_id=world.ids["A"])
    await accounts.add_user("drA", STRONG_PASSWORD, Role.physician, practitioner_id=prac)
    await world.register(
        "patient-app",
        auth_method="none",
        redirect_uris=[REDIRECT],
        scope="openid fhirUser launch/patient offline_access patient/*.rs patient/*.cruds",
    )
    await world.register(
        "clinic-app",
        auth_method="none",
        redirect_uris=[REDIRECT],
        scope="openid fhirUser launch/patient online_access user/*.rs patient/*.rs",
    )
    return world


def decode_json_segment(token: str, index: int = 1) -> dict[str, Any]:
    segment = token.split(".")[index]
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
