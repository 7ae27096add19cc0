"""How `carevault serve` runs uvicorn: the HTTP protocol, TLS, timeouts and shutdown.

The HTTP/1.1 parser is httptools (llhttp, C) rather than h11 (pure Python, ~2x slower per
request), with two additions uvicorn's httptools protocol lacks:

- a bound on the request head (request line + headers) like h11's
  `max_incomplete_event_size`: `max_header_bytes`, answered 431 (RFC 6585 §5) before the head
  is buffered any further;
- the ASGI TLS extension (`scope["extensions"]["tls"]`), read once per connection from the
  finished handshake, so that authentication can see a verified client certificate
  (`carevault.edge.tls.client_certificate`).

Workers (`--workers N`) are processes that uvicorn spawns with a pickled copy of the
`uvicorn.Config`; each re-runs `Config.load()`. The SSL context is therefore built by a
module-level factory (`_ssl_context`, picklable by name) from the file names on the config,
in every worker, and the protocol is named by import string.

Shutdown (SIGTERM): uvicorn stops accepting, lets in-flight requests finish for at most
`shutdown_timeout_seconds` (idle keep-alive connections are closed at once, busy ones after
their response), then runs the app's lifespan shutdown, which drains the audit writer and
closes the pools (`Services.close`). The process then exits 0.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import sys
from collections.abc import Callable
from types import FrameType
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from carevault.config import Settings
from carevault.edge.tls import server_context, tls_extension
from carevault.logs import uvicorn_log_config

PROTOCOL = "carevault.edge.server:HttpProtocol"
APP = "carevault.app:create_app"
WORKER_HEALTHCHECK_SECONDS = 30


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a request-head bound and the ASGI TLS extension."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        self._max_head = config.h11_max_incomplete_event_size or 16 * 1024
        self._head_bytes = 0  # received in chunks that left the head incomplete
        self._parsed_head = 0  # the head as the parser reported it
        self._in_head = True  # between messages, bytes received belong to the next head
        self._head_too_large = False
        self._completed = False  # a message ended within the chunk being parsed
        self._tls: dict[str, Any] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # asyncio (and uvloop) call connection_made after the TLS handshake has completed.
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            self._tls = tls_extension(ssl_object)

    def data_received(self, data: bytes) -> None:
        self._completed = False
        super().data_received(data)
        if self._in_head and not self._completed and not self.transport.is_closing():
            # The head is still incomplete after this chunk, so all of the chunk was head
            # (a chunk that also ended a message is not counted: at most one chunk under).
            # This bounds a head that never ends, whose header value httptools buffers.
            self._head_bytes += len(data)
            if self._head_bytes > self._max_head:
                self._refuse_head()

    def send_400_response(self, msg: str) -> None:
        # uvicorn answers any parser error, ours included (_count_head), with a 400.
        if self._head_too_large:
            self._refuse_head()
        else:
            super().send_400_response(msg)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._parsed_head = 0
        if self._tls is not None:
            tls = dict(self._tls, client_cert_chain=list(self._tls["client_cert_chain"]))
            self.scope["extensions"] = {"tls": tls}  # type: ignore[typeddict-unknown-key]

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)  # "name: value\r\n"
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_head = True
        self._completed = True
        self._head_bytes = self._parsed_head = 0
        super().on_message_complete()

    def _count_head(self, size: int) -> None:
        # Exact count from the parser's callbacks: a head that arrives whole in one read is
        # measured here (data_received sees that read as one chunk that may hold a body too).
        self._parsed_head += size
        if self._parsed_head > self._max_head:
            self._head_too_large = True
            raise _HeadTooLarge

    def _refuse_head(self) -> None:
        body = b"Request header fields too large."
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: text/plain; charset=utf-8\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n"
            b"connection: close\r\n\r\n" + body
        )
        self.transport.close()


class _HeadTooLarge(Exception):
    pass


def _ssl_context(config: uvicorn.Config, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    """uvicorn's `ssl_context_factory`: our context (edge/tls.py), not uvicorn's default one,
    which sets no minimum version and no cipher policy. Runs in every worker."""
    assert config.ssl_certfile is not None and config.ssl_keyfile is not None
    return server_context(config.ssl_certfile, config.ssl_keyfile, config.ssl_ca_certs)


def uvicorn_config(
    settings: Settings, workers: int = 1, app: str | Callable[[], Any] = APP
) -> uvicorn.Config:
    """The uvicorn configuration `carevault serve` runs. `app` is the factory (an import
    string, which `workers` > 1 needs); tests pass their own to serve a diagnostic route."""
    tls = settings.tls_cert is not None and settings.tls_key is not None
    return uvicorn.Config(
        app,
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=workers,
        http=PROTOCOL,
        ws="none",  # no WebSocket endpoint exists
        lifespan="on",
        access_log=False,  # URLs can carry search values; carevault.logs logs requests
        # JSON logs (carevault.logs), applied by uvicorn in each worker before the app loads;
        # the levels are that configuration's (no log_level override here).
        log_config=uvicorn_log_config(settings.log_level),
        log_level=None,
        server_header=False,
        # Forwarded headers are believed only from `trusted_proxies`, by the app
        # (edge/client_address.py); uvicorn's own handling would trust them by default.
        proxy_headers=False,
        timeout_keep_alive=settings.keep_alive_timeout_seconds,
        h11_max_incomplete_event_size=settings.max_header_bytes,
        timeout_graceful_shutdown=settings.shutdown_timeout_seconds,  # type: ignore[arg-type]
        # The supervisor pings each worker from the moment it is spawned and kills one that
        # does not answer within this; uvicorn's 5 s is shorter than a worker's start-up
        # (a fresh interpreter importing uvicorn) on a busy host, which then never comes up.
        timeout_worker_healthcheck=WORKER_HEALTHCHECK_SECONDS,
        ssl_certfile=str(settings.tls_cert) if tls else None,
        ssl_keyfile=str(settings.tls_key) if tls else None,
        ssl_ca_certs=str(settings.tls_client_ca) if tls and settings.tls_client_ca else None,
        ssl_context_factory=_ssl_context if tls else None,
    )


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def run(config: uvicorn.Config) -> None:
    """Serve until SIGTERM/SIGINT; exit 0 after a graceful shutdown.

    uvicorn restores the previous signal handlers after its shutdown and re-raises the signal
    it caught; with the default handler that would end the process as "killed by SIGTERM".
    Ours turns it into a normal exit, so supervisors see a clean stop."""
    signal.signal(signal.SIGTERM, _exit_cleanly)
    server = uvicorn.Server(config)
    if config.workers > 1:
        from uvicorn.supervisors import Multiprocess

        sock = config.bind_socket()
        Multiprocess(config, sockets=[sock]).run()
        return
    server.run()
    if not server.started:
        sys.exit(3)
