"""`victim`: a running carevault (FakeClock) with one logged-in user, for forging tokens against.

The fixture checks, before any attack runs, that the real token and a token re-signed by the
test's own signing code are both accepted: a forgery refused by a server that refuses
everything would prove nothing.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from carevault.identity.roles import Role
from tests.attacks.jose_forge import ServerKey, decode_part, server_key, sign, split
from tests.conftest import FakeClock, Harness

DROP = object()  # a claim_with()/header value meaning "leave this member out"
USERNAME = "dr.target"


@dataclass
class Victim:
    harness: Harness
    clock: FakeClock
    username: str
    user_id: str
    token: str  # from a real POST /auth/login
    key: ServerKey  # the signing key that issued `token`, private half included

    @property
    def settings(self) -> Any:
        return self.harness.services.settings

    @property
    def claims(self) -> dict[str, Any]:
        return decode_part(split(self.token)[1])

    @property
    def header(self) -> dict[str, Any]:
        return decode_part(split(self.token)[0])

    def claims_with(self, **changes: Any) -> dict[str, Any]:
        """The real token's claims with some changed (DROP removes one)."""
        claims = self.claims
        for name, value in changes.items():
            if value is DROP:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def fresh_claims(self, **changes: Any) -> dict[str, Any]:
        """The real token's claims re-dated to the server's clock now (a new, valid lifetime)."""
        now = int(self.clock.now)
        dates = {"iat": now, "nbf": now, "exp": now + self.settings.access_token_ttl_seconds}
        return self.claims_with(**{**dates, **changes})

    def server_token(
        self,
        payload: dict[str, Any] | str | None = None,
        *,
        key: ServerKey | None = None,
        **header_changes: Any,
    ) -> str:
        """Sign `payload` (default: the real claims) with a server key, as the server would.

        The header is {alg, kid, typ: at+jwt} of that key; keyword arguments change members of it
        (DROP removes one). Only what a case changes differs from a genuine token.
        """
        key = key or self.key
        header: dict[str, Any] = {"alg": key.alg, "kid": key.kid, "typ": "at+jwt"}
        for name, value in header_changes.items():
            if value is DROP:
                header.pop(name, None)
            else:
                header[name] = value
        return sign(header, self.claims if payload is None else payload, key.alg, key.private_key)

    async def me(self, token: str) -> httpx.Response:
        return await self.harness.client.get(
            "/auth/me", headers={"Authorization": f"Bearer {token}"}
        )


async def start_victim(settings_factory: Any, harness_factory: Any, **overrides: Any) -> Victim:
    clock = FakeClock()
    harness = await harness_factory(settings_factory(**overrides), clock)
    user = await harness.add_user(USERNAME, Role.physician)
    token = (await harness.login(USERNAME))["access_token"]
    key = server_key(harness.services.settings.keys_dir)
    victim = Victim(harness, clock, USERNAME, user.id, token, key)
    assert victim.header["kid"] == key.kid
    assert victim.claims["sub"] == user.id

    real = await victim.me(token)
    assert real.status_code == 200, real.text
    assert real.json()["id"] == user.id

    control = await victim.me(victim.server_token())
    assert control.status_code == 200, control.text
    assert control.json()["username"] == USERNAME
    return victim


@pytest.fixture
async def victim(settings_factory: Any, harness_factory: Any) -> Victim:
    return await start_victim(settings_factory, harness_factory)


def new_id() -> str:
    return uuid.uuid4().hex
