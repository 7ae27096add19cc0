"""Load generation in a separate process: `wrk` when available, else `bench.loadgen`.

Both report the same `LoadResult`: requests, duration, errors (connect/read/write/timeout and
non-2xx answers) and latency percentiles in microseconds.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.server import REPO_ROOT

# wrk loads this once per thread. The header comes from the environment so that the token is
# not on the command line; done() prints one JSON line that the harness parses.
WRK_SCRIPT = r"""
local auth = os.getenv("BENCH_AUTHORIZATION")
if auth ~= nil and auth ~= "" then
  wrk.headers["Authorization"] = auth
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%.0f,"duration_us":%.0f,"bytes":%.0f,' ..
    '"errors":{"connect":%.0f,"read":%.0f,"write":%.0f,"status":%.0f,"timeout":%.0f},' ..
    '"latency_us":{"min":%.1f,"max":%.1f,"mean":%.3f,"stdev":%.3f,' ..
    '"p50":%.1f,"p90":%.1f,"p99":%.1f,"p999":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.max, latency.mean, latency.stdev,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9)))
end
"""


@dataclass
class LoadResult:
    tool: str
    url: str
    requests: int
    duration_s: float
    errors: dict[str, int]
    latency_us: dict[str, float]
    connections: int
    threads: int
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def error_count(self) -> int:
        return int(sum(self.errors.values()))

    def as_dict(self) -> dict[str, object]:
        data = asdict(self)
        data["rps"] = round(self.rps, 1)
        data["error_count"] = self.error_count
        return data


class LoadError(RuntimeError):
    pass


class RunningLoad:
    """A load generator process started by `start()`: `wait()` returns its `LoadResult`, so
    that two loads can run at once (the login storm under a read load)."""

    def __init__(
        self,
        process: subprocess.Popen[str],
        seconds: float,
        parse: Callable[[str, str, int], LoadResult],
    ) -> None:
        self.process = process
        self.seconds = seconds
        self._parse = parse

    def wait(self, tick: Callable[[float], None] | None = None) -> LoadResult:
        stdout, stderr = _wait(self.process, self.seconds, tick)
        return self._parse(stdout, stderr, self.process.returncode)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()  # our own child
            self.process.communicate()


def wrk_version(binary: str) -> str:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    match = re.search(r"wrk\s+(\S+)", out.stdout + out.stderr)
    return f"wrk {match.group(1)}" if match else "wrk (unknown version)"


def ensure_wrk(install: bool, log: Callable[[str], None]) -> str | None:
    """Path of `wrk`, installing Debian's package when missing and allowed (root only)."""
    found = shutil.which("wrk")
    if found or not install:
        return found
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        log("wrk not found and cannot be installed here (needs root and apt-get)")
        return None
    log("wrk not found: apt-get install -y wrk")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "wrk"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, check=False)
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if result.returncode != 0:
        log("apt-get install wrk failed: " + result.stderr.strip()[-300:])
        return None
    return shutil.which("wrk")


def _pin(cpu: int | None) -> Callable[[], None] | None:
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return None

    def preexec() -> None:
        os.sched_setaffinity(0, {cpu})

    return preexec


def _wait(
    process: subprocess.Popen[str], seconds: float, tick: Callable[[float], None] | None
) -> tuple[str, str]:
    start = time.monotonic()
    deadline = start + seconds + 60
    while process.poll() is None:
        if tick:
            tick(min(time.monotonic() - start, seconds))
        if time.monotonic() > deadline:
            process.kill()
            raise LoadError("load generator did not finish in time")
        time.sleep(0.1)
    if tick:
        tick(seconds)
    stdout, stderr = process.communicate()
    return stdout, stderr


class WrkRunner:
    def __init__(self, binary: str, threads: int, connections: int, cpu: int | None) -> None:
        self.binary = binary
        self.threads = threads
        self.connections = connections
        self.cpu = cpu
        self.version = wrk_version(binary)
        self._dir = Path(tempfile.mkdtemp(prefix="carevault-bench-wrk-"))
        self._script = self._dir / "report.lua"
        self._script.write_text(WRK_SCRIPT)

    @property
    def name(self) -> str:
        return self.version

    def run(
        self,
        url: str,
        seconds: float,
        authorization: str | None = None,
        tick: Callable[[float], None] | None = None,
        script: str | None = None,
        script_env: dict[str, str] | None = None,
    ) -> LoadResult:
        """Load `url` for `seconds`. `script` (Lua, e.g. a `request()` that rotates paths) runs
        after the reporting script; `script_env` is added to wrk's environment for it."""
        return self.start(url, seconds, authorization, script, script_env).wait(tick)

    def start(
        self,
        url: str,
        seconds: float,
        authorization: str | None = None,
        script: str | None = None,
        script_env: dict[str, str] | None = None,
    ) -> RunningLoad:
        """`run` without waiting: the wrk process is running when this returns."""
        env = {**os.environ, "BENCH_AUTHORIZATION": authorization or "", **(script_env or {})}
        script_path = self._script
        if script is not None:
            script_path = self._dir / f"scenario-{abs(hash(script)):x}.lua"
            script_path.write_text(WRK_SCRIPT + "\n" + script)
        cmd = [
            self.binary,
            "-t",
            str(self.threads),
            "-c",
            str(self.connections),
            "-d",
            f"{max(1, round(seconds))}s",
            "--timeout",
            "5s",
            "-s",
            str(script_path),
            url,
        ]
        process = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=_pin(self.cpu),
        )
        return RunningLoad(process, seconds, lambda out, err, rc: self._parse(url, out, err, rc))

    def _parse(self, url: str, stdout: str, stderr: str, returncode: int) -> LoadResult:
        line = next((ln for ln in stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
        if returncode != 0 or line is None:
            raise LoadError(
                f"wrk failed ({returncode}): {stderr.strip()[-500:]} {stdout.strip()[-500:]}"
            )
        data = json.loads(line.removeprefix("BENCH_JSON "))
        return LoadResult(
            tool=self.version,
            url=url,
            requests=int(data["requests"]),
            duration_s=data["duration_us"] / 1e6,
            errors={k: int(v) for k, v in data["errors"].items()},
            latency_us={k: float(v) for k, v in data["latency_us"].items()},
            connections=self.connections,
            threads=self.threads,
            extra={"bytes": int(data["bytes"])},
        )

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)


class PythonLoadRunner:
    """`python -m bench.loadgen` in its own process (its CPU use competes with the server).

    Lua scripts do not apply; `script_env` does: the load generator reads the same variables as
    `bench.suite.SUITE_SCRIPT` (BENCH_PATHS_FILE, BENCH_BODIES_FILE, BENCH_METHOD,
    BENCH_CONTENT_TYPE)."""

    name = "python-loadgen"

    def __init__(self, connections: int, cpu: int | None) -> None:
        self.connections = connections
        self.threads = 1
        self.cpu = cpu
        self.version = "python-loadgen"

    def run(
        self,
        url: str,
        seconds: float,
        authorization: str | None = None,
        tick: Callable[[float], None] | None = None,
        script: str | None = None,
        script_env: dict[str, str] | None = None,
    ) -> LoadResult:
        return self.start(url, seconds, authorization, script, script_env).wait(tick)

    def start(
        self,
        url: str,
        seconds: float,
        authorization: str | None = None,
        script: str | None = None,
        script_env: dict[str, str] | None = None,
    ) -> RunningLoad:
        env = {
            **os.environ,
            **(script_env or {}),
            "BENCH_AUTHORIZATION": authorization or "",
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
            ),
        }
        cmd = [
            sys.executable,
            "-m",
            "bench.loadgen",
            "--url",
            url,
            "--connections",
            str(self.connections),
            "--duration",
            str(seconds),
        ]
        process = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=_pin(self.cpu),
        )
        return RunningLoad(process, seconds, lambda out, err, rc: self._parse(url, out, err, rc))

    def _parse(self, url: str, stdout: str, stderr: str, returncode: int) -> LoadResult:
        if returncode != 0 or not stdout.strip():
            raise LoadError(f"bench.loadgen failed ({returncode}): {stderr.strip()[-500:]}")
        data = json.loads(stdout.strip().splitlines()[-1])
        return LoadResult(
            tool=self.name,
            url=url,
            requests=int(data["requests"]),
            duration_s=float(data["duration_s"]),
            errors=data["errors"],
            latency_us=data["latency_us"],
            connections=self.connections,
            threads=1,
        )

    def close(self) -> None:
        return None
