"""TLS at the edge through real sockets: the version floor and cipher policy, optional client
certificates (mTLS) that reach the app verified, `carevault dev-cert`, and the request-head
bound of the HTTP protocol.

Two servers per module: `carevault serve --workers 2` with the dev-cert files (the product as
shipped: every worker must apply the policy), and the same uvicorn configuration in-process
with one diagnostic route added to the real app, which shows what the app sees of the
connection (`client_certificate`, the ASGI TLS extension).
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from fastapi import FastAPI, Request
from typer.testing import CliRunner

from carevault.app import create_app
from carevault.cli import app as cli_app
from carevault.edge.server import uvicorn_config
from carevault.edge.tls import (
    DevFiles,
    certificate_thumbprint,
    client_certificate,
    server_context,
    write_dev_certificates,
)
from tests.conftest import make_settings
from tests.e2e.conftest import (
    CAREVAULT,
    START_TIMEOUT,
    STOP_TIMEOUT,
    _children,
    _owner_of,
    _socket_inode,
    clean_env,
    free_port,
    run_cli_commands,
)

# --- the certificates -----------------------------------------------------------------------


@dataclass
class Pki:
    files: DevFiles  # our CA, the server, and the client "svc"
    intruder: DevFiles  # another CA, and a client certificate "intruder" it signed


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    out = tmp_path_factory.mktemp("pki") / "tls"
    result = CliRunner().invoke(cli_app, ["dev-cert", "--out", str(out), "--client", "svc"])
    assert result.exit_code == 0, result.output
    assert f"--tls-cert {out / 'server.pem'}" in result.output
    assert f"curl --cacert {out / 'ca.pem'}" in result.output
    intruder = DevFiles(tmp_path_factory.mktemp("intruder"), "intruder")
    write_dev_certificates(intruder)
    return Pki(DevFiles(out, "svc"), intruder)


def client_context(
    pki: Pki,
    *,
    cert: tuple[Path | None, Path | None] = (None, None),
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.files.ca_cert))
    if minimum is not None:
        context.minimum_version = minimum
    if maximum is not None:
        context.maximum_version = maximum
    if ciphers is not None:
        context.set_ciphers(ciphers)
    if cert[0] is not None:
        context.load_cert_chain(cert[0], cert[1])
    return context


def connect(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=15)
    try:
        return context.wrap_socket(sock, server_hostname="localhost")
    except BaseException:
        sock.close()
        raise


def http_get(tls: ssl.SSLSocket, path: str, extra: bytes = b"") -> bytes:
    """One HTTP/1.1 request on the socket; the whole response (the server closes after it)."""
    tls.sendall(
        f"GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n".encode()
        + extra
        + b"\r\n"
    )
    chunks = []
    while chunk := tls.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


# --- `carevault serve` with TLS and two workers ----------------------------------------------


@dataclass
class TlsServer:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path
    workers: set[int]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def _worker_of(server_pid: int, port: int, tls: ssl.SSLSocket) -> int | None:
    client_port = tls.getsockname()[1]
    for _ in range(50):
        inode = _socket_inode(port, client_port)
        owner = _owner_of([server_pid, *_children(server_pid)], inode) if inode else None
        if owner is not None:
            return owner
        time.sleep(0.01)
    return None


@pytest.fixture(scope="module")
def tls_server(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsServer]:
    base = tmp_path_factory.mktemp("tls-server")
    env = clean_env(CAREVAULT_DATA_DIR=str(base / "data"))
    run_cli_commands([(["init"], None)], env, base)
    port = free_port()
    log_path = base / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                CAREVAULT,
                "serve",
                "--port",
                str(port),
                "--workers",
                "2",
                "--tls-cert",
                str(pki.files.server_cert),
                "--tls-key",
                str(pki.files.server_key),
                "--tls-client-ca",
                str(pki.files.ca_cert),
            ],
            env=env,
            cwd=base,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = TlsServer(process, port, log_path, set())
    try:
        # Ready when both workers have answered over TLS (each spawned worker built its own
        # SSL context from the pickled configuration: a worker without it would fail here).
        deadline = time.monotonic() + START_TIMEOUT * 2
        context = client_context(pki)
        while len(server.workers) < 2:
            assert process.poll() is None, f"serve exited {process.returncode}\n{server.log()}"
            assert time.monotonic() < deadline, f"not ready\n{server.log()}"
            try:
                with connect(port, context) as tls:
                    worker = _worker_of(process.pid, port, tls)
                    response = http_get(tls, "/readyz")
                if response.startswith(b"HTTP/1.1 200") and worker is not None:
                    server.workers.add(worker)
            except OSError:
                time.sleep(0.2)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
    assert process.returncode == 0, server.log()


def test_tls13_client_connects_with_the_dev_ca_as_trust_root(
    tls_server: TlsServer, pki: Pki
) -> None:
    context = client_context(pki, minimum=ssl.TLSVersion.TLSv1_3)
    with connect(tls_server.port, context) as tls:
        assert tls.version() == "TLSv1.3"
        assert tls.selected_alpn_protocol() in (None, "http/1.1")
        response = http_get(tls, "/healthz")
    assert response.startswith(b"HTTP/1.1 200"), response[:200]
    # httpx (what a Python client would use) with the CA file as its only trust root.
    with httpx.Client(verify=client_context(pki)) as client:
        assert client.get(f"https://localhost:{tls_server.port}/healthz").status_code == 200


def test_a_default_client_gets_tls13(tls_server: TlsServer, pki: Pki) -> None:
    with connect(tls_server.port, client_context(pki)) as tls:
        assert tls.version() == "TLSv1.3"


def test_both_workers_serve_tls(tls_server: TlsServer) -> None:
    assert len(tls_server.workers) == 2


def test_tls11_client_is_refused(tls_server: TlsServer, pki: Pki) -> None:
    # A client that would speak TLS 1.0/1.1 (OpenSSL's security level 0 lets it offer them).
    context = client_context(
        pki,
        minimum=ssl.TLSVersion.TLSv1,
        maximum=ssl.TLSVersion.TLSv1_1,
        ciphers="ALL:@SECLEVEL=0",
    )
    with pytest.raises((ssl.SSLError, ConnectionError)):
        connect(tls_server.port, context).close()


@pytest.mark.parametrize(
    "ciphers",
    [
        # CBC with ECDHE: Python's default server ciphers (ECDH+AES) would accept these.
        "ECDHE-ECDSA-AES128-SHA256",
        "ECDHE-ECDSA-AES256-SHA384",
        "ECDHE-ECDSA-AES128-SHA",
        # No ECDHE: RSA key transport, finite-field DHE.
        "AES128-SHA256",
        "AES128-GCM-SHA256",
        "DHE-RSA-AES128-GCM-SHA256",
    ],
)
def test_tls12_client_without_ecdhe_aead_ciphers_is_refused(
    tls_server: TlsServer, pki: Pki, ciphers: str
) -> None:
    context = client_context(pki, maximum=ssl.TLSVersion.TLSv1_2, ciphers=ciphers + ":@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        connect(tls_server.port, context).close()


def test_tls12_negotiates_ecdhe_with_aead(tls_server: TlsServer, pki: Pki) -> None:
    context = client_context(pki, maximum=ssl.TLSVersion.TLSv1_2, ciphers="ALL:@SECLEVEL=0")
    with connect(tls_server.port, context) as tls:
        name, version, _ = tls.cipher()
        assert version == "TLSv1.2"
        assert name.startswith("ECDHE-"), name
        assert "GCM" in name or "CHACHA20-POLY1305" in name, name
        assert http_get(tls, "/healthz").startswith(b"HTTP/1.1 200")


def test_client_certificate_from_another_ca_is_refused(tls_server: TlsServer, pki: Pki) -> None:
    context = client_context(
        pki,
        cert=(pki.intruder.client_cert, pki.intruder.client_key),
        maximum=ssl.TLSVersion.TLSv1_2,
    )
    # TLS 1.2: the server verifies the certificate before its Finished, so the handshake fails.
    with pytest.raises((ssl.SSLError, ConnectionError)):
        connect(tls_server.port, context).close()
    # TLS 1.3: the client's handshake completes first; the server's alert ends the connection
    # before any response.
    context = client_context(pki, cert=(pki.intruder.client_cert, pki.intruder.client_key))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with connect(tls_server.port, context) as tls:
            response = http_get(tls, "/healthz")
            assert response == b"", response[:200]
            raise ConnectionError("closed without a response")


def test_clients_with_and_without_our_client_certificate_connect(
    tls_server: TlsServer, pki: Pki
) -> None:
    for cert in ((None, None), (pki.files.client_cert, pki.files.client_key)):
        with connect(tls_server.port, client_context(pki, cert=cert)) as tls:
            assert http_get(tls, "/healthz").startswith(b"HTTP/1.1 200")


def test_serve_refuses_a_client_ca_without_tls(tmp_path: Path, pki: Pki) -> None:
    env = clean_env(CAREVAULT_DATA_DIR=str(tmp_path / "data"))
    result = subprocess.run(
        [CAREVAULT, "serve", "--port", str(free_port()), "--tls-client-ca", str(pki.files.ca_cert)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "tls_client_ca needs TLS" in result.stderr


# --- what the app sees: the real app plus one diagnostic route, served in-process -------------


@dataclass
class InProcess:
    port: int
    server: uvicorn.Server


def _diagnostic_app(settings: Any) -> FastAPI:
    app = create_app(settings)

    @app.get("/_test/tls")
    async def tls_view(request: Request) -> dict[str, Any]:
        cert = client_certificate(request)
        tls = request.scope.get("extensions", {}).get("tls", {})
        return {
            "thumbprint": certificate_thumbprint(cert) if cert is not None else None,
            "subject": cert.subject.rfc4514_string() if cert is not None else None,
            "tls_version": tls.get("tls_version"),
            "cipher_suite": tls.get("cipher_suite"),
            "client_cert_name": tls.get("client_cert_name"),
            "client_cert_error": tls.get("client_cert_error"),
        }

    return app


@pytest.fixture(scope="module")
def in_process(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcess]:
    port = free_port()
    settings = make_settings(
        tmp_path_factory.mktemp("in-process"),
        port=port,
        tls_cert=pki.files.server_cert,
        tls_key=pki.files.server_key,
        tls_client_ca=pki.files.ca_cert,
        max_header_bytes=4096,
    )
    server = uvicorn.Server(uvicorn_config(settings, 1, app=lambda: _diagnostic_app(settings)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "in-process server failed"
        time.sleep(0.05)
    yield InProcess(port, server)
    server.should_exit = True
    thread.join(STOP_TIMEOUT)


def _view(in_process: InProcess, context: ssl.SSLContext) -> dict[str, Any]:
    with httpx.Client(verify=context) as client:
        response = client.get(f"https://localhost:{in_process.port}/_test/tls")
    assert response.status_code == 200, response.text
    return response.json()


def test_without_a_client_certificate_the_app_sees_none(in_process: InProcess, pki: Pki) -> None:
    seen = _view(in_process, client_context(pki))
    assert seen["thumbprint"] is None and seen["client_cert_name"] is None
    assert seen["tls_version"] == 0x0304
    assert seen["cipher_suite"] in (0x1301, 0x1302, 0x1303)  # RFC 8446 §B.4


def test_a_verified_client_certificate_reaches_the_app(in_process: InProcess, pki: Pki) -> None:
    assert pki.files.client_cert is not None
    seen = _view(
        in_process, client_context(pki, cert=(pki.files.client_cert, pki.files.client_key))
    )
    cert = x509.load_pem_x509_certificate(pki.files.client_cert.read_bytes())
    assert seen["thumbprint"] == certificate_thumbprint(cert)
    assert seen["subject"] == seen["client_cert_name"] == cert.subject.rfc4514_string()
    assert "CN=svc" in seen["subject"]
    assert seen["client_cert_error"] is None


def test_tls12_connection_reports_its_ecdhe_aead_suite(in_process: InProcess, pki: Pki) -> None:
    seen = _view(in_process, client_context(pki, maximum=ssl.TLSVersion.TLSv1_2))
    assert seen["tls_version"] == 0x0303
    # ECDHE-ECDSA with AES-GCM or ChaCha20-Poly1305 (RFC 5289, RFC 7905)
    assert seen["cipher_suite"] in (0xC02B, 0xC02C, 0xCCA9)


def test_thumbprint_is_base64url_sha256_of_der(pki: Pki) -> None:
    import base64
    import hashlib

    pem = pki.files.server_cert.read_text()
    der = ssl.PEM_cert_to_DER_cert(pem)
    expected = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).decode().rstrip("=")
    value = certificate_thumbprint(x509.load_pem_x509_certificate(pem.encode()))
    assert value == expected and len(value) == 43 and "=" not in value


# --- the request head bound (edge/server.py's protocol) ------------------------------------------


def test_a_head_over_max_header_bytes_gets_431(in_process: InProcess, pki: Pki) -> None:
    context = client_context(pki)
    with connect(in_process.port, context) as tls:
        ok = http_get(tls, "/healthz", b"X-Pad: " + b"a" * 3000 + b"\r\n")
    assert ok.startswith(b"HTTP/1.1 200"), ok[:200]
    with connect(in_process.port, context) as tls:
        big = http_get(tls, "/healthz", b"X-Pad: " + b"a" * 5000 + b"\r\n")
    assert big.startswith(b"HTTP/1.1 431"), big[:200]


def test_a_body_in_the_same_read_as_the_head_is_not_counted(
    in_process: InProcess, pki: Pki
) -> None:
    # One write: a small head and a 64 KiB body, read by the server in chunks far larger than
    # the 4 KiB bound. Only the head counts.
    body = b'{"username": "' + b"a" * 65536 + b'", "password": "x"}'
    with connect(in_process.port, client_context(pki)) as tls:
        tls.sendall(
            b"POST /auth/login HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        answer = b""
        while chunk := tls.recv(65536):
            answer += chunk
    status = answer.split(b"\r\n", 1)[0]
    assert status.startswith(b"HTTP/1.1 4") and b"431" not in status, answer[:300]


def test_a_head_that_never_ends_is_cut_at_the_bound(in_process: InProcess, pki: Pki) -> None:
    # A header value that never ends, sent in pieces until just past the bound: without the
    # bound the server would wait for the rest (and buffer whatever came), and recv times out.
    with connect(in_process.port, client_context(pki)) as tls:
        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Pad: ")
        for _ in range(5):
            tls.sendall(b"a" * 1000)
            time.sleep(0.02)
        answer = tls.recv(65536)
    assert answer.startswith(b"HTTP/1.1 431"), answer[:200]


# --- `carevault dev-cert` -----------------------------------------------------------------


def _ext(cert: x509.Certificate, kind: type[Any]) -> Any:
    return cert.extensions.get_extension_for_class(kind)


def test_dev_cert_files(pki: Pki) -> None:
    files = pki.files
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    assert files.client_cert is not None
    client = x509.load_pem_x509_certificate(files.client_cert.read_bytes())

    constraints = _ext(ca, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    assert _ext(ca, x509.KeyUsage).value.key_cert_sign
    assert ca.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]

    san = _ext(server, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert {str(a) for a in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}
    assert list(_ext(server, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not _ext(server, x509.BasicConstraints).value.ca
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert datetime.timedelta(days=360) < lifetime < datetime.timedelta(days=370)
    assert list(_ext(client, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    for cert in (server, client):
        cert.verify_directly_issued_by(ca)

    for key in (files.ca_key, files.server_key, files.client_key):
        assert key is not None and stat.S_IMODE(key.stat().st_mode) == 0o600
    # The server's own files make a context that our policy accepts.
    server_context(files.server_cert, files.server_key, files.ca_cert)


def test_dev_cert_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    runner = CliRunner()
    assert runner.invoke(cli_app, ["dev-cert", "--out", str(out)]).exit_code == 0
    before = (out / "ca.pem").read_bytes()
    again = runner.invoke(cli_app, ["dev-cert", "--out", str(out)])
    assert again.exit_code == 1 and "--force" in again.output
    assert (out / "ca.pem").read_bytes() == before
    forced = runner.invoke(
        cli_app, ["dev-cert", "--out", str(out), "--force", "--hosts", "api.test,10.1.2.3"]
    )
    assert forced.exit_code == 0, forced.output
    assert (out / "ca.pem").read_bytes() != before
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    san = _ext(server, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["api.test"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
    assert stat.S_IMODE((out / "server-key.pem").stat().st_mode) == 0o600
