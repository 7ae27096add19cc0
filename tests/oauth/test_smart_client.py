"""A SMART client library written by others, fhirclient (PyPI), against a real HTTP server:
it discovers the server from /fhir/metadata (the oauth-uris extension), agrees with
/.well-known/smart-configuration, completes a standalone launch with PKCE (we play the user in
the browser) and reads the launch patient."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import requests
import uvicorn
from fhirclient import client as fhir_client

from carevault.app import create_app
from carevault.identity.roles import Role
from carevault.runtime import build_services
from tests.conftest import STRONG_PASSWORD
from tests.oauth.support import REDIRECT, hidden, query_of


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _seed(settings: Any) -> tuple[str, str]:
    services = build_services(settings)
    await services.start()
    try:
        stored = await services.store.create(
            {"resourceType": "Patient", "name": [{"family": "Smart", "given": ["Sam"]}]}
        )
        patient_id = str(stored.body["id"])
        await services.accounts.add_user(
            "sam", STRONG_PASSWORD, Role.patient, patient_id=patient_id
        )
        client, _ = await services.clients.add(
            "fhirclient-app",
            auth_method="none",
            redirect_uris=[REDIRECT],
            scope="launch/patient patient/*.rs openid fhirUser",
        )
        return client.id, patient_id
    finally:
        await services.close()


class _Server(threading.Thread):
    def __init__(self, app: Any, port: int) -> None:
        super().__init__(daemon=True)
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
        )

    def run(self) -> None:
        asyncio.run(self.server.serve())

    def __enter__(self) -> _Server:
        self.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.join(timeout=20)


def test_fhirclient_discovers_and_completes_a_standalone_launch(settings_factory: Any) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    settings = settings_factory(issuer_url=base)
    client_id, patient_id = asyncio.run(_seed(settings))
    with _Server(create_app(settings), port):
        smart = fhir_client.FHIRClient(
            settings={
                "app_id": client_id,
                "api_base": f"{base}/fhir/",
                "redirect_uri": REDIRECT,
                "scope": "launch/patient patient/*.rs openid fhirUser",
            }
        )
        authorize_url = smart.authorize_url  # reads /fhir/metadata
        well_known = requests.get(f"{base}/.well-known/smart-configuration", timeout=10).json()
        assert authorize_url.startswith(well_known["authorization_endpoint"] + "?")
        assert smart.server.auth._token_uri == well_known["token_endpoint"]
        assert "S256" in well_known["code_challenge_methods_supported"]
        assert {"launch-standalone", "client-public", "permission-v2"} <= set(
            well_known["capabilities"]
        )

        # the user's part, in a "browser" (the session cookie is Secure: carried by hand over
        # this plain-http loopback server, as browsers treat localhost as a secure context)
        with httpx.Client(base_url=base, follow_redirects=False) as browser:
            page = browser.get(authorize_url)
            assert page.status_code == 200, page.text
            signed_in = browser.post(
                "/oauth/authorize/login",
                data={
                    "request": hidden(page.text, "request"),
                    "username": "sam",
                    "password": STRONG_PASSWORD,
                },
            )
            assert signed_in.status_code == 303, signed_in.text
            cookie = signed_in.headers["set-cookie"].split(";", 1)[0]
            consent = browser.get(signed_in.headers["location"], headers={"Cookie": cookie})
            back = browser.post(
                "/oauth/authorize/consent",
                data={
                    "request": hidden(consent.text, "request"),
                    "csrf_token": hidden(consent.text, "csrf_token"),
                    "decision": "approve",
                },
                headers={"Cookie": cookie},
            )
        assert back.status_code == 302, back.text
        location = back.headers["location"]
        assert query_of(location)["iss"] == base
        assert urlsplit(location).netloc == "app.example"

        smart.handle_callback(location)  # the token request, with fhirclient's PKCE verifier
        assert smart.ready and smart.patient_id == patient_id
        patient = smart.patient  # a FHIR read with the token fhirclient got
        assert patient.id == patient_id and patient.name[0].family == "Smart"
