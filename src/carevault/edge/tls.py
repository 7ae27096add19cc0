"""TLS for the server: the SSL context, client certificates (mTLS), and the dev CA.

The context follows Mozilla's "intermediate" server configuration (version 5.7): TLS 1.2 as
the floor, TLS 1.3 preferred (OpenSSL picks the highest version both sides offer), and for
TLS 1.2 only ECDHE key exchange with AEAD ciphers (AES-GCM, ChaCha20-Poly1305); every TLS 1.3
suite is ECDHE/AEAD already. No CBC, no RSA key transport, no finite-field DHE, no
renegotiation, no compression.

Client certificates (RFC 8705 mutual TLS): when a client CA is configured the server asks for a
certificate without requiring one (browsers and public clients connect as before), and a
presented certificate that does not chain to that CA ends the handshake. The verified
certificate reaches the app through the ASGI TLS extension (`scope["extensions"]["tls"]`,
filled by `carevault.edge.server`); `client_certificate(request)` reads it and
`certificate_thumbprint` gives its RFC 8705 §3.1 `x5t#S256` value for certificate-bound tokens.
"""

from __future__ import annotations

import base64
import datetime
import functools
import hashlib
import ipaddress
import os
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from starlette.requests import HTTPConnection

# Mozilla intermediate, TLS 1.2 part (https://ssl-config.mozilla.org/guidelines/5.7.json).
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
ALPN_PROTOCOLS = ["http/1.1"]  # uvicorn speaks HTTP/1.1 only

# The ASGI TLS extension reports versions by their wire value (RFC 8446 §B.1).
TLS_VERSION_CODES = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}


class TlsConfigurationError(Exception):
    """A certificate, key or CA file that cannot be used; the message says which and why."""


def server_context(
    certfile: str | os.PathLike[str],
    keyfile: str | os.PathLike[str],
    client_ca: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """The server's SSL context: our policy (module docstring), the certificate chain, and,
    with `client_ca`, optional client certificates verified against that CA bundle."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(ALPN_PROTOCOLS)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as err:
        raise TlsConfigurationError(
            f"cannot load the TLS certificate {certfile} with key {keyfile}: {err}"
        ) from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as err:
            raise TlsConfigurationError(f"cannot load the client CA {client_ca}: {err}") from None
        # Asked for, verified when given, not required (RFC 8705 §2: the server decides per
        # client whether a certificate is needed; the handshake cannot know the client yet).
        context.verify_mode = ssl.CERT_OPTIONAL
    return context


@functools.cache
def _cipher_codes() -> dict[str, int]:
    """OpenSSL cipher name -> IANA code point (the low 16 bits of OpenSSL's id)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.set_ciphers("ALL")
    return {c["name"]: c["id"] & 0xFFFF for c in context.get_ciphers()}


def tls_extension(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> dict[str, Any]:
    """The ASGI TLS extension for one connection (asgiref's "TLS Extension" spec). A client
    certificate is listed only when the handshake verified it; otherwise none was sent."""
    cipher = ssl_object.cipher()
    version = ssl_object.version()
    der = ssl_object.getpeercert(binary_form=True)
    chain: list[str] = []
    name = None
    if der:
        chain.append(ssl.DER_cert_to_PEM_cert(der))
        name = x509.load_der_x509_certificate(der).subject.rfc4514_string()
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": name,
        "client_cert_error": None,
        "tls_version": TLS_VERSION_CODES.get(version or ""),
        "cipher_suite": _cipher_codes().get(cipher[0]) if cipher else None,
    }


@functools.lru_cache(maxsize=1024)
def _load_pem(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode("ascii"))


def client_certificate(connection: HTTPConnection) -> x509.Certificate | None:
    """The client certificate verified during this connection's handshake, or None (plain
    HTTP, no client CA configured, or the client sent none)."""
    extensions: Mapping[str, Any] = connection.scope.get("extensions") or {}
    tls = extensions.get("tls")
    if not tls or tls.get("client_cert_error") is not None:
        return None
    chain = tls.get("client_cert_chain") or []
    return _load_pem(chain[0]) if chain else None


def certificate_thumbprint(certificate: x509.Certificate) -> str:
    """RFC 8705 §3.1 `x5t#S256`: base64url (no padding) of the SHA-256 of the DER encoding."""
    der = certificate.public_bytes(serialization.Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


# --- the development CA (`carevault dev-cert`) ---------------------------------------------------

DEV_VALIDITY = datetime.timedelta(days=365)
DEFAULT_DEV_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class DevFiles:
    """Where `write_dev_certificates` puts each file (names relative to the output dir)."""

    out: Path
    client: str | None = None

    @property
    def ca_cert(self) -> Path:
        return self.out / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.out / "ca-key.pem"

    @property
    def server_cert(self) -> Path:
        return self.out / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.out / "server-key.pem"

    @property
    def client_cert(self) -> Path | None:
        return self.out / f"client-{self.client}.pem" if self.client else None

    @property
    def client_key(self) -> Path | None:
        return self.out / f"client-{self.client}-key.pem" if self.client else None

    def all(self) -> list[Path]:
        paths = [self.ca_cert, self.ca_key, self.server_cert, self.server_key]
        if self.client_cert is not None and self.client_key is not None:
            paths += [self.client_cert, self.client_key]
        return paths


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "carevault development"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    key: ec.EllipticCurvePrivateKey,
    common_name: str,
    usage: x509.ObjectIdentifier,
    now: datetime.datetime,
    hosts: Sequence[str] = (),
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + DEV_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if hosts:
        builder = builder.add_extension(_san(hosts), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _ca(key: ec.EllipticCurvePrivateKey, now: datetime.datetime) -> x509.Certificate:
    name = _name(f"carevault development CA {now:%Y-%m-%d %H:%M}")
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + DEV_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    fd = os.open(path, flags, mode)
    try:
        os.fchmod(fd, mode)  # an existing file overwritten with --force gets the mode too
        os.write(fd, data)
    finally:
        os.close(fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def write_dev_certificates(
    files: DevFiles,
    hosts: Sequence[str] = DEFAULT_DEV_HOSTS,
    *,
    force: bool = False,
    now: datetime.datetime | None = None,
) -> None:
    """A local CA (EC P-256, CA:TRUE, pathlen 0, keyCertSign) and a server certificate for
    `hosts` signed by it (serverAuth), plus a client certificate (clientAuth) when
    `files.client` is set. Keys are written 0600, certificates 0644. Refuses to replace an
    existing file unless `force` (FileExistsError names it), before writing anything."""
    if not force:
        existing = [p for p in files.all() if p.exists()]
        if existing:
            raise FileExistsError(existing[0])
    now = now or datetime.datetime.now(datetime.UTC)
    files.out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _ca(ca_key, now)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _leaf(
        ca_cert, ca_key, server_key, hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, now, hosts
    )
    pem = serialization.Encoding.PEM
    _write(files.ca_key, _key_pem(ca_key), 0o600, force)
    _write(files.ca_cert, ca_cert.public_bytes(pem), 0o644, force)
    _write(files.server_key, _key_pem(server_key), 0o600, force)
    _write(files.server_cert, server_cert.public_bytes(pem), 0o644, force)
    if files.client is not None and files.client_cert and files.client_key:
        client_key = ec.generate_private_key(ec.SECP256R1())
        client_cert = _leaf(
            ca_cert, ca_key, client_key, files.client, ExtendedKeyUsageOID.CLIENT_AUTH, now
        )
        _write(files.client_key, _key_pem(client_key), 0o600, force)
        _write(files.client_cert, client_cert.public_bytes(pem), 0o644, force)
