"""What an authentication proves and what an action demands of it.

`amr` values (RFC 8176): `pwd` password, `otp` a one-time code (TOTP or recovery code), `hwk` a
hardware-bound WebAuthn key, `swk` a synced passkey. `acr` says how strong the whole login was.
An enrollment-scoped token is what an account that must have MFA but has none gets after its
password: it can enroll a factor and nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable

from carevault.config import Settings

AMR_PASSWORD = "pwd"  # noqa: S105 - an RFC 8176 method name
AMR_OTP = "otp"
AMR_HARDWARE_KEY = "hwk"
AMR_SOFTWARE_KEY = "swk"
MFA_AMR = frozenset({AMR_OTP, AMR_HARDWARE_KEY, AMR_SOFTWARE_KEY, "mfa"})

ACR_PASSWORD = "urn:carevault:pwd"  # noqa: S105 - an acr value
ACR_MFA = "urn:carevault:mfa"
ACR_PHISHING_RESISTANT = "urn:carevault:mfa:phr"  # WebAuthn with user verification

ENROLL_SCOPE = "carevault:mfa-enroll"

METHOD_TOTP = "totp"
METHOD_WEBAUTHN = "webauthn"
METHOD_RECOVERY = "recovery_code"


def mfa_required(settings: Settings, roles: Iterable[str]) -> bool:
    required = set(settings.mfa_required_roles)
    return any(str(role) in required for role in roles)


def acr_of(amr: Iterable[str], *, user_verified: bool = False) -> str:
    methods = set(amr)
    if methods & {AMR_HARDWARE_KEY, AMR_SOFTWARE_KEY} and user_verified:
        return ACR_PHISHING_RESISTANT
    if methods & MFA_AMR:
        return ACR_MFA
    return ACR_PASSWORD


def is_fresh_mfa(amr: Iterable[str], auth_time: int, now: float, max_age: int) -> bool:
    """An MFA authentication at most `max_age` seconds old (a minute of clock skew allowed
    ahead)."""
    age = now - auth_time
    return bool(MFA_AMR & set(amr)) and -60 <= age <= max_age
