"""A software WebAuthn authenticator and client for the tests, written from WebAuthn Level 2
(§6.1 authenticator data, §6.5.4 attestation object in the "none" format, §6.3.3 assertion
signature over authenticatorData || SHA-256(clientDataJSON)).

soft-webauthn cannot set the user-verified or backup flags and answers raw bytes; this one
takes the options JSON the server sends and answers the JSON a browser's
`PublicKeyCredential.toJSON()` gives. The key is an ES256 key from `cryptography`; COSE and
CBOR come from fido2's encoders, base64url from the `webauthn` helpers. Keyword arguments
let a test lie about the origin, the RP id or the challenge, or drop user verification.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from fido2 import cbor
from fido2.cose import ES256
from fido2.webauthn import AttestedCredentialData, AuthenticatorData
from webauthn.helpers import base64url_to_bytes, bytes_to_base64url

ORIGIN = "https://localhost:8000"

UP = 0x01  # user present
UV = 0x04  # user verified
BE = 0x08  # backup eligible
BS = 0x10  # backed up
AT = 0x40  # attested credential data included


class SoftAuthenticator:
    """One credential on one device; `clone()` copies the key and the counter, as an
    attacker who extracted the key would."""

    def __init__(
        self, *, user_verification: bool = True, synced: bool = False, counter: bool = True
    ) -> None:
        self.user_verification = user_verification
        self.synced = synced  # a passkey synced between devices: BE and BS set
        self.counter = counter  # False: the counter stays 0, as many passkeys do
        self.aaguid = b"\x00" * 16
        self.key: ec.EllipticCurvePrivateKey | None = None
        self.credential_id = b""
        self.rp_id = ""
        self.user_handle = b""
        self.sign_count = 0

    @property
    def id(self) -> str:
        return bytes_to_base64url(self.credential_id)

    def clone(self) -> SoftAuthenticator:
        copy = SoftAuthenticator(
            user_verification=self.user_verification, synced=self.synced, counter=self.counter
        )
        copy.key, copy.credential_id = self.key, self.credential_id
        copy.rp_id, copy.user_handle, copy.sign_count = (
            self.rp_id,
            self.user_handle,
            self.sign_count,
        )
        return copy

    def _flags(self, uv: bool | None) -> int:
        flags = UP
        if self.user_verification if uv is None else uv:
            flags |= UV
        if self.synced:
            flags |= BE | BS
        return flags

    @staticmethod
    def _client_data(kind: str, challenge: str, origin: str) -> bytes:
        return json.dumps(
            {"type": kind, "challenge": challenge, "origin": origin, "crossOrigin": False}
        ).encode()

    def create(
        self,
        options: dict[str, Any],
        *,
        origin: str = ORIGIN,
        rp_id: str | None = None,
        challenge: bytes | None = None,
        uv: bool | None = None,
        again: bool = False,
    ) -> dict[str, Any]:
        """`navigator.credentials.create()`: a new key pair for the RP, or with `again` the
        credential this authenticator holds already, exclusion list ignored (a client that
        misbehaves)."""
        if not again:
            excluded = {d["id"] for d in options.get("excludeCredentials", [])}
            if self.credential_id and self.id in excluded:
                raise ValueError("InvalidStateError: this authenticator is registered already")
            self.key = ec.generate_private_key(ec.SECP256R1())
            self.credential_id = os.urandom(32)
            self.sign_count = 0
        assert self.key is not None
        self.rp_id = options["rp"]["id"]
        self.user_handle = base64url_to_bytes(options["user"]["id"])
        client_data = self._client_data(
            "webauthn.create",
            bytes_to_base64url(challenge) if challenge else options["challenge"],
            origin,
        )
        attested = AttestedCredentialData.create(
            self.aaguid, self.credential_id, ES256.from_cryptography_key(self.key.public_key())
        )
        auth_data = AuthenticatorData.create(
            hashlib.sha256((rp_id or self.rp_id).encode()).digest(),
            self._flags(uv) | AT,
            self.sign_count,
            attested,
        )
        attestation = cbor.encode({"fmt": "none", "attStmt": {}, "authData": bytes(auth_data)})
        return {
            "id": self.id,
            "rawId": self.id,
            "type": "public-key",
            "authenticatorAttachment": "cross-platform",
            "clientExtensionResults": {},
            "response": {
                "clientDataJSON": bytes_to_base64url(client_data),
                "attestationObject": bytes_to_base64url(attestation),
                "transports": ["usb", "nfc"],
            },
        }

    def get(
        self,
        options: dict[str, Any],
        *,
        origin: str = ORIGIN,
        rp_id: str | None = None,
        challenge: bytes | None = None,
        uv: bool | None = None,
    ) -> dict[str, Any]:
        """`navigator.credentials.get()`: an assertion, signed whether or not the options list
        this credential (a test decides what the server should make of it)."""
        assert self.key is not None, "create() first"
        if self.counter:
            self.sign_count += 1
        client_data = self._client_data(
            "webauthn.get",
            bytes_to_base64url(challenge) if challenge else options["challenge"],
            origin,
        )
        auth_data = bytes(
            AuthenticatorData.create(
                hashlib.sha256((rp_id or options["rpId"]).encode()).digest(),
                self._flags(uv),
                self.sign_count,
            )
        )
        signature = self.key.sign(
            auth_data + hashlib.sha256(client_data).digest(), ec.ECDSA(hashes.SHA256())
        )
        return {
            "id": self.id,
            "rawId": self.id,
            "type": "public-key",
            "authenticatorAttachment": "cross-platform",
            "clientExtensionResults": {},
            "response": {
                "clientDataJSON": bytes_to_base64url(client_data),
                "authenticatorData": bytes_to_base64url(auth_data),
                "signature": bytes_to_base64url(signature),
                "userHandle": bytes_to_base64url(self.user_handle),
            },
        }
