"""Run the real server in a subprocess for the HTTP benchmark.

`python -m bench.server --workers N` is what the harness starts: it runs uvicorn exactly as
`carevault serve` does (`carevault.edge.server.uvicorn_config` and `run`: the httptools protocol
with its head bound, no access log, no Server header, no proxy headers, keep-alive and graceful
shutdown from the settings, structlog configured the same way) but with the app factory
`bench.app:create_bench_app`. Host, port and data directory come from `CAREVAULT_*` variables,
as for `carevault serve`.

`BenchServer` is the harness side: a temporary data directory prepared with `carevault init`
and `carevault user add`, the server process, a login over HTTP and the `/auth/me` body that
the baseline route then serves.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.app import STATIC_BODY_ENV, STATIC_PATH

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_USER = "bench.user"
ME_PATH = "/auth/me"
DEFAULT_FACTORY = "bench.app:create_bench_app"


def serve_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.server")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--factory",
        default=DEFAULT_FACTORY,
        help="app factory import string (for profiling experiments)",
    )
    args = parser.parse_args(argv)

    import uvicorn

    from carevault.config import Settings
    from carevault.logs import configure

    settings = Settings()
    configure()
    try:
        from carevault.edge.server import run, uvicorn_config
    except ImportError:
        pass
    else:
        # Exactly what `carevault serve` runs (its protocol, timeouts, shutdown), with the
        # bench factory (the product app plus the baseline route) instead of create_app.
        run(uvicorn_config(settings, args.workers, app=args.factory))
        return
    # Before carevault.edge.server existed: the options `carevault serve` passed then.
    uvicorn.run(
        args.factory,
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=args.workers,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        ssl_certfile=None,
        ssl_keyfile=None,
        log_level="warning",
        timeout_graceful_shutdown=10,
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _http(
    method: str,
    url: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (loopback)
            return (
                response.status,
                {k.lower(): v for k, v in response.headers.items()},
                response.read(),
            )
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


class ServerError(RuntimeError):
    pass


@dataclass
class BenchServer:
    """One benchmark server: data directory, process, token and the bytes of `/auth/me`."""

    workers: int = 1
    algorithm: str = "ES256"
    cpu: int | None = None  # pin the server to this CPU (workers == 1 only)
    keep: bool = False
    factory: str = DEFAULT_FACTORY
    extra_pythonpath: tuple[str, ...] = ()
    database_url: str | None = None  # PostgreSQL (sync URL); None = SQLite in the data dir
    role: str = "physician"  # of the benchmark user (the fhir set needs every patient: service)
    # Added to the server's environment last (e.g. rate limits kept on with high limits).
    extra_env: dict[str, str] = field(default_factory=dict)
    data_dir: Path = field(init=False)
    port: int = field(init=False)
    token: str = field(init=False, default="")
    me_body: bytes = field(init=False, default=b"")
    me_headers: dict[str, str] = field(init=False, default_factory=dict)
    _root: Path = field(init=False)
    _process: subprocess.Popen[bytes] | None = field(init=False, default=None)
    _log: Path = field(init=False)

    def __post_init__(self) -> None:
        self._root = Path(tempfile.mkdtemp(prefix="carevault-bench-"))
        self.data_dir = self._root / "var"
        self._log = self._root / "server.log"
        self.port = free_port()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def static_body_file(self) -> Path:
        return self._root / "static-body.json"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CAREVAULT_")}
        env.update(
            {
                "CAREVAULT_DATA_DIR": str(self.data_dir),
                "CAREVAULT_HOST": "127.0.0.1",
                "CAREVAULT_PORT": str(self.port),
                "CAREVAULT_SIGNING_ALGORITHM": self.algorithm,
                # The longest lifetime allowed, so that one token outlives a long run.
                "CAREVAULT_ACCESS_TOKEN_TTL_SECONDS": "3600",
                # Benchmark accounts log in with a password alone: the runs measure requests,
                # not the second factor (MFA is on for staff roles by default).
                "CAREVAULT_MFA_REQUIRED_ROLES": "",
                # Every request of a run comes from 127.0.0.1: the per-address limits
                # (1200/minute, 60/minute on /auth/*) would cut the load to a trickle and
                # measure the limiter's 429s. Off unless a set asks otherwise (`extra_env`).
                "CAREVAULT_RATE_LIMIT_ENABLED": "false",
                STATIC_BODY_ENV: str(self.static_body_file),
                "PYTHONPATH": os.pathsep.join(
                    p
                    for p in (
                        str(REPO_ROOT),
                        *self.extra_pythonpath,
                        os.environ.get("PYTHONPATH", ""),
                    )
                    if p
                ),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.database_url:
            env["CAREVAULT_DATABASE_URL"] = self.database_url
        env.update(self.extra_env)
        return env

    def _cli(self, *args: str, stdin: bytes | None = None) -> bytes:
        result = subprocess.run(
            [sys.executable, "-m", "carevault.cli", *args],
            input=stdin,
            capture_output=True,
            env=self.env(),
            cwd=self._root,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise ServerError(
                f"carevault {' '.join(args)} failed ({result.returncode}):\n"
                + result.stderr.decode(errors="replace")[-2000:]
            )
        return result.stdout

    def prepare(self) -> str:
        """`carevault init` and `carevault user add`; returns the user's password."""
        self._cli("init")
        password = secrets.token_urlsafe(24) + "-Bench-9"
        self._cli(
            "user",
            "add",
            BENCH_USER,
            "--role",
            self.role,
            "--password-stdin",
            stdin=(password + "\n").encode(),
        )
        return password

    def start(self, on_wait: Callable[[], None] | None = None, timeout: float = 60.0) -> None:
        log = self._log.open("ab")
        pin = self.cpu if self.workers == 1 else None

        def preexec() -> None:
            if pin is not None and hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(0, {pin})

        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.server",
                "--workers",
                str(self.workers),
                "--factory",
                self.factory,
            ],
            env=self.env(),
            cwd=self._root,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=preexec,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise ServerError(
                    f"server exited with {self._process.returncode}:\n{self.log_tail()}"
                )
            try:
                status, _, _ = _http("GET", self.base_url + "/healthz", timeout=1.0)
                if status == 200:
                    # With several workers, wait until every one of them has started too.
                    if self.workers == 1 or self._workers_up() >= self.workers:
                        return
            except OSError:
                pass
            if on_wait:
                on_wait()
            time.sleep(0.1)
        raise ServerError(
            f"server did not answer /healthz within {timeout:.0f}s:\n{self.log_tail()}"
        )

    def _workers_up(self) -> int:
        assert self._process is not None
        try:
            out = subprocess.run(
                ["ps", "-o", "pid=", "--ppid", str(self._process.pid)],
                capture_output=True,
                text=True,
                check=False,
            ).stdout
        except OSError:
            return self.workers
        return len(out.split())

    def login(self, password: str) -> None:
        body = json.dumps({"username": BENCH_USER, "password": password}).encode()
        status, _, data = _http(
            "POST",
            self.base_url + "/auth/login",
            body,
            {"Content-Type": "application/json"},
            timeout=30.0,
        )
        if status != 200:
            raise ServerError(f"login failed: HTTP {status} {data[:300]!r}")
        self.token = json.loads(data)["access_token"]

    @property
    def auth_header(self) -> str:
        return f"Bearer {self.token}"

    def capture_baseline(self) -> None:
        """Fetch `/auth/me`, hand its bytes to the baseline route and check they match."""
        status, headers, body = _http(
            "GET", self.base_url + ME_PATH, headers={"Authorization": self.auth_header}
        )
        if status != 200:
            raise ServerError(f"GET {ME_PATH} failed: HTTP {status} {body[:300]!r}")
        self.me_body, self.me_headers = body, headers
        tmp = self.static_body_file.with_suffix(".tmp")
        tmp.write_bytes(body)
        tmp.replace(self.static_body_file)
        self.check_baseline()

    def check_baseline(self) -> None:
        # Every worker must serve the same bytes: ask more times than there are workers.
        for _ in range(4 * self.workers):
            status, headers, body = _http("GET", self.base_url + STATIC_PATH)
            if status != 200 or body != self.me_body:
                raise ServerError(f"GET {STATIC_PATH} differs from {ME_PATH}: HTTP {status}")
            for name in ("content-type", "content-length", "cache-control"):
                if headers.get(name) != self.me_headers.get(name):
                    raise ServerError(
                        f"GET {STATIC_PATH} header {name} differs: "
                        f"{headers.get(name)!r} != {self.me_headers.get(name)!r}"
                    )

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self._log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def problem_lines(self, limit: int = 100) -> list[str]:
        """The server log's lines at warning level or above, answers with a 5xx status, and
        any line that is not JSON (a traceback printed around the logging): what explains a
        scenario's errors. The first `limit` of them."""
        found: list[str] = []
        try:
            with self._log.open(errors="replace") as lines:
                for line in lines:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        entry = None
                    if (
                        not isinstance(entry, dict)
                        or entry.get("level") in ("warning", "error", "critical")
                        or (isinstance(entry.get("status"), int) and entry["status"] >= 500)
                    ):
                        found.append(line.rstrip()[:2000])
                        if len(found) >= limit:
                            break
        except OSError:
            pass
        return found

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        # SIGTERM, as a supervisor stops it (`edge.server.run` exits cleanly on it); SIGINT would
        # end with a KeyboardInterrupt traceback in the log, read as a problem.
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # our own session, started above
            process.wait(timeout=10)

    def cleanup(self) -> None:
        self.stop()
        if not self.keep:
            shutil.rmtree(self._root, ignore_errors=True)

    def __enter__(self) -> BenchServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


if __name__ == "__main__":
    serve_main()
