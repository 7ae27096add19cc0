"""Forging JOSE objects on purpose, with code independent of carevault's (PyJWT + cryptography).

Everything here builds tokens byte by byte: headers and payloads may be dicts (serialized
compactly) or raw JSON text (for duplicate member names), and signatures come from PyJWT's
algorithm objects, never from joserfc, which is what the server uses.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import hmac
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from jwt.algorithms import get_default_algorithms

ALGORITHMS = get_default_algorithms()


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def segment(part: dict[str, Any] | str | bytes) -> str:
    """A base64url segment of a dict (compact JSON), of JSON text as given, or of raw bytes."""
    if isinstance(part, dict):
        part = json.dumps(part, separators=(",", ":"))
    if isinstance(part, str):
        part = part.encode("utf-8")
    return b64url(part)


def sign(header: dict[str, Any] | str, payload: dict[str, Any] | str, alg: str, key: Any) -> str:
    """A compact JWS whose signature is `alg` over exactly these header and payload bytes."""
    signing_input = f"{segment(header)}.{segment(payload)}"
    signature = ALGORITHMS[alg].sign(signing_input.encode("ascii"), key)
    return f"{signing_input}.{b64url(signature)}"


def hmac_sign(
    header: dict[str, Any] | str,
    payload: dict[str, Any] | str,
    secret: bytes,
    digest: Any = hashlib.sha256,
) -> str:
    """HS256 with any bytes as the secret (PyJWT refuses public-key-looking secrets; we don't)."""
    signing_input = f"{segment(header)}.{segment(payload)}"
    mac = hmac.new(secret, signing_input.encode("ascii"), digest).digest()
    return f"{signing_input}.{b64url(mac)}"


def split(token: str) -> tuple[str, str, str]:
    header, payload, signature = token.split(".")
    return header, payload, signature


def decode_part(part: str) -> dict[str, Any]:
    value = json.loads(b64url_decode(part))
    assert isinstance(value, dict)
    return value


@dataclass(frozen=True)
class ServerKey:
    """One key of the server's key set, read from `keys/signing.json` (private JWK inside)."""

    kid: str
    alg: str
    state: str
    private_jwk: dict[str, Any]

    @property
    def private_key(self) -> Any:
        return ALGORITHMS[self.alg].from_jwk(json.dumps(self.private_jwk))

    @property
    def public_key(self) -> Any:
        return self.private_key.public_key()

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def server_keys(keys_dir: Path) -> list[ServerKey]:
    data = json.loads((keys_dir / "signing.json").read_text())
    return [ServerKey(r["kid"], r["alg"], r["state"], r["jwk"]) for r in data["keys"]]


def server_key(keys_dir: Path, state: str = "current") -> ServerKey:
    matching = [k for k in server_keys(keys_dir) if k.state == state]
    assert len(matching) == 1, f"expected one {state} key, found {len(matching)}"
    return matching[0]


@functools.cache
def attacker_ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@functools.cache
def attacker_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_jwk(private_key: Any, alg: str) -> dict[str, Any]:
    data = json.loads(ALGORITHMS[alg].to_jwk(private_key.public_key()))
    data.update({"alg": alg, "use": "sig"})
    return data


@functools.cache
def attacker_certificate_der() -> bytes:
    key = attacker_ec_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "carevault")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)
