"""MFA tests run with the shipped default: staff roles must have a second factor."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlparse

import pyotp
import pytest

from carevault.config import Settings
from tests.conftest import STRONG_PASSWORD, FakeClock

STAFF_ROLES = ["admin", "physician", "nurse", "auditor"]


@pytest.fixture
def mfa_settings(settings_factory: Any) -> Settings:
    return settings_factory(mfa_required_roles=list(Settings().mfa_required_roles))


@pytest.fixture
def mfa_clock() -> FakeClock:
    return FakeClock(1_800_000_000.0)  # the start of a 30-second step: windows are exact


@pytest.fixture
async def mfa(harness_factory: Any, mfa_settings: Settings, mfa_clock: FakeClock) -> Any:
    return await harness_factory(mfa_settings, mfa_clock)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def secret_of(otpauth_uri: str) -> str:
    return parse_qs(urlparse(otpauth_uri).query)["secret"][0]


def code_at(secret: str, when: float) -> str:
    return pyotp.TOTP(secret).at(when)


async def enroll_totp(harness: Any, username: str, clock: FakeClock) -> dict[str, Any]:
    """Password login of an account without a factor, TOTP enrollment and confirmation.
    Returns the secret, the recovery codes and the tokens the confirmation gave."""
    login = await harness.login(username)
    assert login["mfa_enrollment_required"] is True, login
    enroll = await harness.client.post(
        "/auth/mfa/totp/enroll", headers=bearer(login["access_token"])
    )
    assert enroll.status_code == 200, enroll.text
    secret = secret_of(enroll.json()["otpauth_uri"])
    confirm = await harness.client.post(
        "/auth/mfa/totp/confirm",
        json={"code": code_at(secret, clock())},
        headers=bearer(login["access_token"]),
    )
    assert confirm.status_code == 200, confirm.text
    return {"secret": secret, "enrollment_token": login["access_token"], **confirm.json()}


async def mfa_login(
    harness: Any, username: str, code: str, method: str = "totp", expect: int = 200
) -> Any:
    first = await harness.login(username, STRONG_PASSWORD)
    assert first["mfa_required"] is True, first
    response = await harness.client.post(
        "/auth/mfa/verify",
        json={"mfa_token": first["mfa_token"], "method": method, "code": code},
    )
    assert response.status_code == expect, response.text
    return response
