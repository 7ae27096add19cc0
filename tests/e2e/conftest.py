"""Real-server fixtures: `carevault init`, `user add` and `serve` run as subprocesses (a
server's `init` and `user add`s share one: see `run_cli_commands`).

`server_factory` starts `carevault serve --workers N` on a free port with its own data directory
(and, for the `postgresql` case of `store`, a fresh schema), waits until every worker answers
/readyz, and stops it with SIGTERM after the test. Which worker answered a request is read from
/proc (the accepted socket's owner), so tests can check that both workers took part instead of
hoping that they did.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import STRONG_PASSWORD

REPO = Path(__file__).resolve().parents[2]
_VENV_CLI = REPO / ".venv" / "bin" / "carevault"
CAREVAULT = str(_VENV_CLI if _VENV_CLI.exists() else Path(sys.executable).parent / "carevault")

# MFA is on for staff roles by default; these tests are about other things. A test of MFA
# passes its own CAREVAULT_MFA_REQUIRED_ROLES.
PASSWORD_ONLY = {"CAREVAULT_MFA_REQUIRED_ROLES": ""}

START_TIMEOUT = 45.0  # a loaded CI box under `pytest -n 2` spawns workers slowly
STOP_TIMEOUT = 20.0
# One shared TLS context (these clients speak plain http anyway): httpx would otherwise load
# the CA bundle for every client, ~25 ms each, and the tests make hundreds of clients.
_SSL = httpx.create_ssl_context()


def clean_env(**values: str | None) -> dict[str, str]:
    """os.environ without any CAREVAULT_* variable, plus `values` (None values are dropped)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAREVAULT_")}
    env.update({k: v for k, v in values.items() if v is not None})
    return env


def run_cli(
    args: Sequence[str],
    env: dict[str, str],
    cwd: Path,
    *,
    input: str | None = None,
    check: bool = True,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [CAREVAULT, *args],
        env=env,
        cwd=cwd,
        input=input,
        text=True,
        capture_output=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"carevault {' '.join(args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


# `carevault <args>` for each (args, stdin) given, in order, in ONE Python process: the CLI's
# own typer app, as the console script runs it. Each `carevault` start-up costs seconds of
# imports (the FHIR models), and a server's set-up needs init and a user or more.
_CLI_COMMANDS = """
import json, sys
from typer.testing import CliRunner
from carevault.cli import app
for args, stdin in json.loads(sys.argv[1]):
    result = CliRunner().invoke(app, args, input=stdin, env={"COLUMNS": "200"})
    if result.exit_code != 0:
        print(f"carevault {' '.join(args)} exited {result.exit_code}\\n{result.output}")
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            import traceback
            traceback.print_exception(result.exception)
        sys.exit(1)
"""


def run_cli_commands(
    commands: Sequence[tuple[Sequence[str], str | None]],
    env: dict[str, str],
    cwd: Path,
    timeout: float = 120,
) -> None:
    """Run `carevault <args>` (stdin: the string given, if any) for each command, in order, in
    one subprocess (see _CLI_COMMANDS); the first failure fails the test with its output."""
    python = str(Path(CAREVAULT).parent / "python")
    result = subprocess.run(
        [python, "-c", _CLI_COMMANDS, json.dumps([[list(a), i] for a, i in commands])],
        env=env,
        cwd=cwd,
        text=True,
        capture_output=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"carevault commands failed ({result.returncode})\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def jwt_part(token: str, index: int) -> dict[str, Any]:
    """Header (0) or payload (1) of a JWT, unverified: for reading kid/sid/jti in tests only."""
    part = token.split(".")[index]
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


# --- which worker process answered ------------------------------------------------------------


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        # Field 4 (ppid) follows the parenthesised command name, which may contain spaces.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry))
    return found


def _is_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _socket_inode(server_port: int, client_port: int) -> str | None:
    """Inode of the server side of the TCP connection 127.0.0.1:client_port -> server_port."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                lines = handle.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if local_port == server_port and remote_port == client_port and fields[9] != "0":
                return fields[9]
    return None


def _owner_of(pids: Sequence[int], inode: str) -> int | None:
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None


# --- the server -------------------------------------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    workers: int
    env: dict[str, str]
    cwd: Path
    data_dir: Path
    database_url: str | None
    log_path: Path
    worker_pids: set[int] = field(default_factory=set)
    _clients: list[httpx.Client] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def cli(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run the `carevault` CLI against this server's data directory and database."""
        return run_cli(args, self.env, self.cwd, input=input, check=check)

    # HTTP -------------------------------------------------------------------------------------

    def client(self) -> httpx.Client:
        """A client with its own keep-alive connection (closed when the server stops)."""
        client = httpx.Client(base_url=self.base_url, timeout=30, verify=_SSL)
        with self._lock:
            self._clients.append(client)
        return client

    def _find_worker(self, response: httpx.Response, tries: int = 50) -> int | None:
        stream = response.extensions["network_stream"]
        client_port = stream.get_extra_info("client_addr")[1]
        for _ in range(tries):
            inode = _socket_inode(self.port, client_port)
            # With one worker uvicorn serves from the main process itself.
            candidates = [self.process.pid, *_children(self.process.pid)]
            owner = _owner_of(candidates, inode) if inode else None
            if owner is not None:
                return owner
            time.sleep(0.01)
        return None

    def worker_of(self, response: httpx.Response) -> int:
        """The pid of the worker process that answered `response` (its connection is open)."""
        pid = self._find_worker(response)
        assert pid is not None, f"no worker of server {self.process.pid} holds the connection"
        return pid

    def clients_per_worker(
        self, count: int, timeout: float = 20.0
    ) -> dict[int, list[httpx.Client]]:
        """`count` connected clients on each worker: {worker pid: [client, ...]}."""
        pools: dict[int, list[httpx.Client]] = {}
        deadline = time.monotonic() + timeout
        while len(pools) < self.workers or any(len(p) < count for p in pools.values()):
            assert time.monotonic() < deadline, (
                f"could not get {count} connections on each of {self.workers} workers: "
                f"{ {pid: len(p) for pid, p in pools.items()} }"
            )
            client = self.client()
            response = client.get("/healthz")
            assert response.status_code == 200, response.text
            pid = self.worker_of(response)
            self.worker_pids.add(pid)
            pool = pools.setdefault(pid, [])
            if len(pool) < count:
                pool.append(client)
            else:
                client.close()
        return pools

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Until every worker has answered /readyz (a worker accepts only after its startup)."""
        deadline = time.monotonic() + timeout
        while len(self.worker_pids) < self.workers:
            if self.process.poll() is not None:
                raise ServerExited(self.process.returncode, self.log())
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"server not ready after {timeout}s "
                    f"(workers answering: {sorted(self.worker_pids)})\n"
                    f"{self.log()}"
                )
            client = httpx.Client(base_url=self.base_url, timeout=5, verify=_SSL)
            try:
                response = client.get("/readyz")
                pid = self._find_worker(response, tries=5) if response.status_code == 200 else None
                if pid is not None:
                    self.worker_pids.add(pid)
                else:
                    time.sleep(0.05)
            except httpx.TransportError:
                time.sleep(0.05)
            finally:
                client.close()

    # Direct, read-only database checks -----------------------------------------------------------

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read-only query (`?` placeholders) on the server's database."""
        if self.database_url is None:
            db = self.data_dir / "carevault.db"
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
            try:
                return list(conn.execute(sql, tuple(params)))
            finally:
                conn.close()
        import psycopg

        with psycopg.connect(self.database_url) as conn:
            conn.read_only = True
            return list(conn.execute(sql.replace("?", "%s"), tuple(params)).fetchall())

    # Stopping -------------------------------------------------------------------------------------

    def stop(self) -> None:
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()
        if self.process.poll() is None:
            workers = set(self.worker_pids) | set(_children(self.process.pid))
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
                raise AssertionError(
                    f"server ignored SIGTERM for {STOP_TIMEOUT}s; killed\n{self.log()}"
                ) from None
            deadline = time.monotonic() + 10
            while any(_is_alive(pid) for pid in workers) and time.monotonic() < deadline:
                time.sleep(0.05)
            left = [pid for pid in workers if _is_alive(pid)]
            if left:
                os.killpg(self.process.pid, signal.SIGKILL)
                raise AssertionError(f"worker processes {left} outlived the server")
        assert self.process.returncode is not None


class ServerExited(AssertionError):
    def __init__(self, code: int, log: str) -> None:
        self.code = code
        self.output = log
        super().__init__(f"carevault serve exited with {code}\n{log}")


def serve(
    env: dict[str, str],
    cwd: Path,
    data_dir: Path,
    database_url: str | None,
    workers: int,
    log_dir: Path,
) -> Server:
    """Start `carevault serve` on a free port and wait until all its workers are ready."""
    for attempt in range(3):
        port = free_port()
        log_path = log_dir / f"serve-{port}.log"
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [
                    CAREVAULT,
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--workers",
                    str(workers),
                ],
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: a last-resort kill hits only it
            )
        server = Server(process, port, workers, env, cwd, data_dir, database_url, log_path)
        try:
            server.wait_ready()
            return server
        except ServerExited as err:
            # Another process may have taken the port between free_port() and bind: retry.
            if "address already in use" in err.output.lower() and attempt < 2:
                continue
            raise
        except BaseException:
            server.stop()
            raise
    raise AssertionError("unreachable")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.when == "call":
        item.stash[_CALL_FAILED] = report.failed
    return report


_CALL_FAILED = pytest.StashKey[bool]()


@pytest.fixture
def serve_factory(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Server]]:
    """Start `carevault serve` with a given env and cwd; every server is stopped afterwards.

    When the test failed, each server's output is printed (pytest shows it with the failure).
    """
    started: list[Server] = []

    def start(
        env: dict[str, str],
        cwd: Path,
        data_dir: Path,
        database_url: str | None = None,
        workers: int = 1,
    ) -> Server:
        server = serve(env, cwd, data_dir, database_url, workers, tmp_path)
        started.append(server)
        return server

    yield start
    errors = []
    for server in started:
        try:
            server.stop()
        except AssertionError as err:
            errors.append(str(err))
        if request.node.stash.get(_CALL_FAILED, False):
            print(f"--- output of carevault serve on port {server.port} ---\n{server.log()}")
    assert not errors, "\n".join(errors)


@pytest.fixture
def server_factory(
    store: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Callable[..., Server]:
    """Initialise a data directory (and PostgreSQL schema), add users through the CLI, serve.

    `start(workers=2, env={...}, users=(("alice", "physician"),))`: every user gets
    STRONG_PASSWORD and logs in with it alone (`PASSWORD_ONLY`: no role must have MFA) unless
    `env` sets CAREVAULT_MFA_REQUIRED_ROLES. The store (sqlite or postgresql) comes from the
    `store` parameter; its skip rule and reason are those of tests/conftest.py.
    """
    # pg_schema first: fixtures are torn down in reverse, so servers stop before schemas drop.
    make_schema = request.getfixturevalue("pg_schema") if store == "postgresql" else None
    serve_factory: Callable[..., Server] = request.getfixturevalue("serve_factory")
    counter = iter(range(1000))

    def start(
        workers: int = 2,
        env: dict[str, str] | None = None,
        users: Sequence[tuple[str, str]] = (("alice", "physician"),),
    ) -> Server:
        base = tmp_path / f"server-{next(counter)}"
        data_dir = base / "data"
        base.mkdir()
        database_url = make_schema() if make_schema is not None else None
        full_env = clean_env(
            CAREVAULT_DATA_DIR=str(data_dir),
            CAREVAULT_DATABASE_URL=database_url,
            **{**PASSWORD_ONLY, **(env or {})},
        )
        commands = [(["init"], None)] + [
            (["user", "add", name, "--role", role, "--password-stdin"], STRONG_PASSWORD + "\n")
            for name, role in users
        ]
        run_cli_commands(commands, full_env, base)
        return serve_factory(full_env, base, data_dir, database_url, workers)

    return start


# --- small HTTP helpers shared by the e2e tests -----------------------------------------------


def login(
    client: httpx.Client, username: str = "alice", password: str = STRONG_PASSWORD
) -> dict[str, Any]:
    response = client.post("/auth/login", json={"username": username, "password": password})
    assert response.status_code == 200, response.text
    return response.json()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def fire_together(calls: Sequence[Callable[[], Any]]) -> list[Any]:
    """Run every call in its own thread, released at the same moment; results in order."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(index: int) -> None:
        barrier.wait()
        try:
            results[index] = calls[index]()
        except BaseException as err:  # re-raised below, in the test's thread
            results[index] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results
