"""Print shell `export` lines for the test services that answer, and say which do not.

`make test` evaluates the output: PostgreSQL at 127.0.0.1:5432 (database `test`, trust auth)
sets CAREVAULT_TEST_DATABASE_URL, Redis at 127.0.0.1:6379 sets CAREVAULT_TEST_REDIS_URL.
A variable already set in the environment is kept as it is.
"""

from __future__ import annotations

import os
import socket
import sys

POSTGRES_CANDIDATES = (
    "postgresql://postgres@127.0.0.1:5432/test",
    "postgresql://root@127.0.0.1:5432/test",
    f"postgresql://{os.environ.get('USER', 'postgres')}@127.0.0.1:5432/test",
)


def _say(message: str) -> None:
    print(f"echo {message!r} >&2")


def probe_postgres() -> str | None:
    try:
        import psycopg
    except ImportError:
        return None
    for url in POSTGRES_CANDIDATES:
        try:
            with psycopg.connect(url, connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return url
        except Exception:  # noqa: S112 - any failure means "try the next role"
            continue
    return None


def probe_redis() -> str | None:
    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            if sock.recv(16).startswith(b"+PONG"):
                return "redis://127.0.0.1:6379/15"
    except OSError:
        return None
    return None


def main() -> int:
    for var, probe, name in (
        ("CAREVAULT_TEST_DATABASE_URL", probe_postgres, "PostgreSQL on 127.0.0.1:5432"),
        ("CAREVAULT_TEST_REDIS_URL", probe_redis, "Redis on 127.0.0.1:6379"),
    ):
        if os.environ.get(var):
            _say(f"tests: {var} already set; using it")
            continue
        url = probe()
        if url:
            print(f"export {var}={url}")
            _say(f"tests: {name} answers; its cases run ({var}={url})")
        else:
            _say(f"tests: {name} does not answer; its cases will be SKIPPED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
