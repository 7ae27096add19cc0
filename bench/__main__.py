"""`python -m bench`: run a scenario set, print a table, write bench/results/<UTC>.json.

Scenario set "suite" (the default, issue 8, `bench/suite.py`) measures the real server on SQLite
and PostgreSQL with 1 and 2 workers on a seeded data set: baseline, auth, FHIR read / searches /
create, login and reads during a login storm, each as a ratio to the baseline of the same run,
and writes a PNG chart next to the JSON. The other sets are run by name: "auth" (the HTTP
benchmark of `GET /auth/me` against `GET /bench/static` plus the JWT micro benchmark), "http",
"micro", "fhir", "access" and "audit".
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from bench.app import STATIC_PATH
from bench.jwt_verify import ALGORITHMS, run_micro_sync, variant_count
from bench.load import LoadResult, PythonLoadRunner, WrkRunner, ensure_wrk
from bench.server import ME_PATH, REPO_ROOT, BenchServer

RESULTS_DIR = Path(__file__).resolve().parent / "results"
HTTP_RPS_TARGET = 0.7  # auth req/s >= 0.7 x baseline req/s
MICRO_TARGET = 1.5  # full verification <= 1.5 x raw signature check
SCENARIO_SETS = {
    "suite": ("suite",),
    "auth": ("http", "micro"),
    "http": ("http",),
    "micro": ("micro",),
    "fhir": ("fhir",),
    "access": ("access",),
    "audit": ("audit",),
}
FHIR_ENCRYPTION_SHARE_MAX = 0.15  # encryption < 15% of store.read() latency
FHIR_READ_P99_MAX_MS = 10.0  # single-resource read p99 < 10 ms (target stated at 100k)

# Piped output (make, CI logs) gets a width that fits the tables instead of rich's default 80.
console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 140)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="carevault benchmarks. Every figure is a ratio to a baseline measured in "
        "the same run. Results go to bench/results/<UTC timestamp>.json.",
    )
    parser.add_argument(
        "scenarios",
        nargs="?",
        default="suite",
        choices=sorted(SCENARIO_SETS),
        help="scenario set: suite (default) = the whole server on SQLite and PostgreSQL with 1 "
        "and 2 workers (baseline, auth, FHIR read/search/create, login, login storm); "
        "auth = http + micro; fhir = FHIR REST on a seeded data set; "
        "access = cost of the access decision point (physician vs service account); "
        "audit = audit cost per read (vs a no-op writer), append throughput, verify speed",
    )
    parser.add_argument(
        "--sizes",
        default="10000",
        help="fhir: comma-separated data set sizes in resources (default 10000)",
    )
    parser.add_argument(
        "--stores",
        default=None,
        help="fhir, suite: comma-separated stores, sqlite and/or postgresql (suite: default "
        "both; fhir: default sqlite, plus postgresql when --pg or $CAREVAULT_TEST_DATABASE_URL "
        "is set); a PostgreSQL that does not answer is skipped with the reason shown",
    )
    parser.add_argument(
        "--pg",
        default=None,
        metavar="URL",
        help="fhir: PostgreSQL server for the postgresql store (default "
        "$CAREVAULT_TEST_DATABASE_URL, else postgresql://postgres@127.0.0.1:5432/test); "
        "a fresh schema per run, dropped afterwards",
    )
    parser.add_argument(
        "--no-sqlite",
        action="store_true",
        help="fhir: PostgreSQL only (same as --stores postgresql)",
    )
    parser.add_argument(
        "--patients",
        type=int,
        default=None,
        help="suite: patients seeded, each with 5 Observations (default 10000, quick 1000)",
    )
    parser.add_argument(
        "--server-workers",
        default="1,2",
        help="suite: comma-separated uvicorn worker counts, measured in turn (default 1,2)",
    )
    parser.add_argument(
        "--storm-connections",
        type=int,
        default=32,
        help="suite: connections of the login load during read-during-login-storm (default 32)",
    )
    parser.add_argument(
        "--pin-server",
        action="store_true",
        help="suite: pin the 1-worker server to CPU 0 (default: only the load generators are "
        "pinned, to CPU 1; a pinned server shares one core with its database and hash threads "
        "and with whatever else runs there)",
    )
    parser.add_argument(
        "--login-accounts",
        type=int,
        default=64,
        help="suite: accounts that login and the login storm rotate over (default 64; the "
        "login throttle allows 5 attempts in flight per account)",
    )
    parser.add_argument(
        "--rate-limit",
        choices=("off", "high"),
        default="off",
        help="suite: the server's rate limits: off (default; every request comes from "
        "127.0.0.1) or on with limits of 10,000,000/minute (measures the limiter's cost)",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=None,
        help="access, audit: data set size in resources (default access 100000, audit 10000)",
    )
    parser.add_argument(
        "--care-patients",
        type=int,
        default=50,
        help="access: patients whose CareTeam lists the physician (default 50)",
    )
    parser.add_argument(
        "--verify-entries",
        type=int,
        default=1_000_000,
        help="audit: entries of the bulk-seeded trail that `audit verify` is timed on "
        "(default 1000000)",
    )
    parser.add_argument(
        "--append-concurrency",
        default="1,8,64",
        help="audit: comma-separated numbers of concurrent appending tasks (default 1,8,64)",
    )
    parser.add_argument(
        "--append-seconds",
        type=float,
        default=None,
        help="audit: seconds of appending per writer and concurrency (default 5, quick 1)",
    )
    parser.add_argument(
        "--audit-parts",
        default="http,append,verify",
        help="audit: which parts to run, comma-separated (default http,append,verify)",
    )
    parser.add_argument(
        "--seed-workers",
        type=int,
        default=2,
        help="fhir: processes that seed the data set in parallel (default 2)",
    )
    parser.add_argument(
        "--seed-method",
        choices=("bulk", "write_many"),
        default="bulk",
        help="fhir: bulk = the store's row builders + executemany (default); write_many = "
        "ResourceStore.write_many (the HTTP path, ~4x slower)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 3 s load, 1 s warm-up, 500 iterations x 3"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds of load per HTTP measurement (default 10, fhir 8, quick 3)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds of discarded load before each measurement (default 2, quick 1)",
    )
    parser.add_argument(
        "--warm-reads",
        type=int,
        default=None,
        help="suite: before the rounds, read every seeded patient about this many times, so "
        "that the rounds measure a server in its steady state (data keys and access facts "
        "cached); the first piece's rate is reported as the cold-cache read; 0 = no warm pass "
        "(default 3, quick 1)",
    )
    parser.add_argument(
        "--connections", type=int, default=32, help="concurrent connections (default 32)"
    )
    parser.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="baseline/auth pairs per server, order alternating; the median round "
        "by ratio is reported (default 3, fhir 2, quick 1)",
    )
    parser.add_argument(
        "--workers2", action="store_true", help="also measure the server with 2 uvicorn workers"
    )
    parser.add_argument(
        "--loadgen",
        choices=("auto", "wrk", "python"),
        default="auto",
        help="load generator: wrk (installed with apt-get if missing and root), "
        "or the Python fallback (default auto)",
    )
    parser.add_argument("--no-install", action="store_true", help="never apt-get install wrk")
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin server (CPU 0) and load generator (CPU 1)"
    )
    parser.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="micro: calls per measurement (default 3000, quick 500)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help="micro: measurements per variant, best kept (default 5, quick 3)",
    )
    parser.add_argument(
        "--algorithms",
        default="ES256",
        help=f"comma-separated signing algorithms for the micro benchmark "
        f"({', '.join(ALGORITHMS)}); the HTTP server uses the first "
        f"(default ES256)",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=RESULTS_DIR,
        help="where the JSON goes (default bench/results)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary data directories")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)
    # fhir: 4 store/size pairs x 7 scenarios, access: 8 scenarios per store: shorter by default
    fhir = args.scenarios in ("fhir", "access", "audit")
    suite = args.scenarios == "suite"
    args.duration = args.duration or (3.0 if args.quick else 8.0 if fhir else 10.0)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    args.iterations = args.iterations or (500 if args.quick else 3000)
    if args.warm_reads is None:
        args.warm_reads = 1 if args.quick else 3
    if args.warm_reads < 0:
        parser.error("--warm-reads must be 0 or more")
    args.repeat = args.repeat or (3 if args.quick else 5)
    args.rounds = args.rounds or (1 if args.quick else 2 if fhir or suite else 3)
    args.patients = args.patients or (1000 if args.quick else 10_000)
    try:
        args.server_workers = [int(x) for x in args.server_workers.split(",") if x.strip()]
    except ValueError:
        parser.error("--server-workers takes comma-separated integers, e.g. 1,2")
    if not args.server_workers or min(args.server_workers) < 1 or args.patients < 1:
        parser.error("--server-workers and --patients must be at least 1")
    if args.patients < 20 or args.storm_connections < 1 or args.login_accounts < 1:
        parser.error(
            "--patients must be at least 20, --storm-connections and --login-accounts at least 1"
        )
    args.algorithms = [a.strip() for a in args.algorithms.split(",") if a.strip()]
    try:
        args.sizes = [int(x.replace("_", "")) for x in args.sizes.split(",") if x.strip()]
    except ValueError:
        parser.error("--sizes takes comma-separated integers, e.g. 10000,100000")
    if not args.sizes or min(args.sizes) < 15:
        parser.error("--sizes must be at least 15")
    env_pg = os.environ.get("CAREVAULT_TEST_DATABASE_URL") or None
    if args.stores is None and suite:
        args.stores = ["sqlite", "postgresql"]  # PostgreSQL skipped, reason shown, if absent
    elif args.stores is None:
        args.stores = ["sqlite"] + (["postgresql"] if (args.pg or env_pg) else [])
    else:
        args.stores = [x.strip().lower() for x in args.stores.split(",") if x.strip()]
    if args.no_sqlite:
        args.stores = [s for s in args.stores if s != "sqlite"] or ["postgresql"]
    for store in args.stores:
        if store not in ("sqlite", "postgresql"):
            parser.error(f"unknown store {store}; choose from sqlite, postgresql")
    args.stores = list(dict.fromkeys(args.stores))
    args.pg = args.pg or env_pg or "postgresql://postgres@127.0.0.1:5432/test"
    args.append_seconds = args.append_seconds or (1.0 if args.quick else 5.0)
    try:
        args.append_concurrency = [int(x) for x in args.append_concurrency.split(",") if x]
    except ValueError:
        parser.error("--append-concurrency takes comma-separated integers, e.g. 1,8,64")
    args.audit_parts = [x.strip() for x in args.audit_parts.split(",") if x.strip()]
    if not set(args.audit_parts) <= {"http", "append", "verify"} or not args.audit_parts:
        parser.error("--audit-parts takes http, append and/or verify")
    if args.verify_entries < 1 or not args.append_concurrency or min(args.append_concurrency) < 1:
        parser.error("--verify-entries and --append-concurrency must be at least 1")
    if args.seed_workers < 1:
        parser.error("--seed-workers must be at least 1")
    for alg in args.algorithms:
        if alg not in ALGORITHMS:
            parser.error(f"unknown algorithm {alg}; choose from {', '.join(ALGORITHMS)}")
    if args.rounds < 1 or args.connections < 1 or args.threads < 1:
        parser.error("--rounds, --connections and --threads must be at least 1")
    return args


# ---------------------------------------------------------------------------------- machine


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def machine_info(load_tool: str | None) -> dict[str, Any]:
    from cryptography.hazmat.backends.openssl.backend import backend

    status = _git("status", "--porcelain")
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "load_generator": load_tool,
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "openssl": backend.openssl_version_text(),
        "packages": {
            p: _version(p)
            for p in (
                "carevault",
                "fastapi",
                "starlette",
                "uvicorn",
                "uvloop",
                "httptools",
                "pydantic",
                "joserfc",
                "cryptography",
                "sqlalchemy",
                "aiosqlite",
                "orjson",
            )
        },
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
    }


# ---------------------------------------------------------------------------------- progress


class Steps:
    """An overall step counter plus a bar for the step under way."""

    def __init__(self, progress: Progress, total_steps: int) -> None:
        self.progress = progress
        self.overall: TaskID = progress.add_task("[bold]benchmark", total=total_steps)
        self.current: TaskID | None = None

    def begin(self, description: str, total: float | None) -> None:
        if self.current is not None:
            self.progress.remove_task(self.current)
        if not self.progress.console.is_terminal:  # piped: no live bar, so one line per step
            done = int(self.progress.tasks[self._index(self.overall)].completed)
            self.progress.console.log(f"[{done}/{self.progress.tasks[0].total:.0f}] {description}")
        self.current = self.progress.add_task(description, total=total)

    def tick_to(self, completed: float) -> None:
        if self.current is not None:
            self.progress.update(self.current, completed=completed)

    def advance(self, amount: float) -> None:
        if self.current is not None:
            self.progress.advance(self.current, amount)

    def done(self) -> None:
        if self.current is not None:
            task = self.progress.tasks[self._index(self.current)]
            if task.total is not None:
                self.progress.update(self.current, completed=task.total)
        self.progress.advance(self.overall, 1)

    def _index(self, task_id: TaskID) -> int:
        return next(i for i, t in enumerate(self.progress.tasks) if t.id == task_id)

    def finish(self) -> None:
        if self.current is not None:
            self.progress.remove_task(self.current)
            self.current = None


# ---------------------------------------------------------------------------------- HTTP


@dataclass
class HttpPair:
    workers: int
    baseline: LoadResult
    auth: LoadResult
    rounds: list[dict[str, Any]]

    @property
    def rps_ratio(self) -> float:
        return self.auth.rps / self.baseline.rps if self.baseline.rps else 0.0

    @property
    def p99_ratio(self) -> float:
        base = self.baseline.latency_us["p99"]
        return self.auth.latency_us["p99"] / base if base else 0.0

    @property
    def round_ratios(self) -> list[float]:
        return [
            r["auth"]["rps"] / r["baseline"]["rps"] if r["baseline"]["rps"] else 0.0
            for r in self.rounds
        ]

    @property
    def passed(self) -> bool:
        return (
            self.rps_ratio >= HTTP_RPS_TARGET
            and self.baseline.error_count == 0
            and self.auth.error_count == 0
        )


def run_http(
    args: argparse.Namespace, runner: Any, steps: Steps, workers: int, pin: bool
) -> tuple[HttpPair, dict[str, Any]]:
    server = BenchServer(
        workers=workers, algorithm=args.algorithms[0], cpu=0 if pin else None, keep=args.keep
    )
    try:
        steps.begin(f"HTTP w{workers}: carevault init + user add", None)
        password = server.prepare()
        steps.done()
        steps.begin(f"HTTP w{workers}: start server, log in", None)
        server.start()
        server.login(password)
        server.capture_baseline()
        steps.done()
        static_url, me_url = server.base_url + STATIC_PATH, server.base_url + ME_PATH
        scenarios = [("baseline", static_url, None), ("auth", me_url, server.auth_header)]
        rounds: list[dict[str, Any]] = []
        for round_no in range(args.rounds):
            measured: dict[str, LoadResult] = {}
            order = scenarios if round_no % 2 == 0 else scenarios[::-1]
            for name, url, auth in order:
                path = url.removeprefix(server.base_url)
                total = args.warmup + args.duration
                steps.begin(f"HTTP w{workers}: {name} GET {path} (round {round_no + 1})", total)
                if args.warmup > 0:
                    runner.run(url, args.warmup, auth, tick=steps.tick_to)
                result = runner.run(
                    url, args.duration, auth, tick=lambda t: steps.tick_to(args.warmup + t)
                )
                measured[name] = result
                steps.done()
            rounds.append(measured)
        server.check_baseline()  # still the same bytes after the load
        info = {
            "port": server.port,
            "body_bytes": len(server.me_body),
            "content_type": server.me_headers.get("content-type"),
            "log_tail": server.log_tail(1000),
        }
    finally:
        server.cleanup()
    # Median round by ratio (with one round: that round).
    ratios = sorted(
        range(len(rounds)),
        key=lambda i: rounds[i]["auth"].rps / max(rounds[i]["baseline"].rps, 1e-9),
    )
    chosen = rounds[ratios[len(ratios) // 2]]
    pair = HttpPair(
        workers,
        chosen["baseline"],
        chosen["auth"],
        [{k: v.as_dict() for k, v in r.items()} for r in rounds],
    )
    return pair, info


# ---------------------------------------------------------------------------------- report


def _fmt_ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def http_table(pairs: list[HttpPair]) -> Table:
    table = Table(title="HTTP: GET /auth/me (bearer) vs GET /bench/static (same bytes, no auth)")
    for col, justify in (
        ("scenario", "left"),
        ("req/s", "right"),
        ("p50 ms", "right"),
        ("p99 ms", "right"),
        ("errors", "right"),
        ("ratio to baseline", "right"),
        ("p99 ratio", "right"),
        ("target", "right"),
        ("result", "center"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for pair in pairs:
        b, a = pair.baseline, pair.auth
        table.add_row(
            f"w{pair.workers} baseline GET {STATIC_PATH}",
            f"{b.rps:,.0f}",
            _fmt_ms(b.latency_us["p50"]),
            _fmt_ms(b.latency_us["p99"]),
            str(b.error_count),
            "1.00",
            "1.00",
            "",
            "baseline",
        )
        verdict = "[green]PASS[/green]" if pair.passed else "[red]FAIL[/red]"
        table.add_row(
            f"w{pair.workers} auth GET {ME_PATH}",
            f"{a.rps:,.0f}",
            _fmt_ms(a.latency_us["p50"]),
            _fmt_ms(a.latency_us["p99"]),
            str(a.error_count),
            f"{pair.rps_ratio:.2f}",
            f"{pair.p99_ratio:.2f}",
            f">= {HTTP_RPS_TARGET:.2f}",
            verdict,
        )
    return table


def micro_table(micro: list[dict[str, Any]]) -> Table:
    table = Table(title="Micro: JWT verification, µs per token (best of repeats)")
    for col, justify in (
        ("scenario", "left"),
        ("µs/op best", "right"),
        ("µs/op median", "right"),
        ("ops/s", "right"),
        ("ratio to raw", "right"),
        ("target", "right"),
        ("result", "center"),
    ):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for result in micro:
        alg = result["algorithm"]
        for name, v in result["variants"].items():
            if name == "raw":
                target, verdict = "", "baseline"
            elif name == "full":
                target = f"<= {MICRO_TARGET:.2f}"
                ok = v["ratio_to_raw"] <= MICRO_TARGET
                verdict = "[green]PASS[/green]" if ok else "[red]FAIL[/red]"
            else:
                target, verdict = "", "info"
            table.add_row(
                f"{alg} {name}",
                f"{v['best_us']:.1f}",
                f"{v['median_us']:.1f}",
                f"{1e6 / v['best_us']:,.0f}",
                f"{v['ratio_to_raw']:.2f}",
                target,
                verdict,
            )
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    parts = SCENARIO_SETS[args.scenarios]
    started = dt.datetime.now(dt.UTC)
    cpus = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    )
    pin = not args.no_pin and cpus >= 2

    runner: Any = None
    if "suite" in parts:
        from bench.suite import suite_main

        return suite_main(args, started, cpus, pin, console, machine_info, Steps)
    if "fhir" in parts:
        return fhir_main(args, started, cpus, pin)
    if "access" in parts:
        from bench.access import access_main

        return access_main(args, started, cpus, pin, console, machine_info, Steps)
    if "audit" in parts:
        from bench.audit import audit_main

        return audit_main(args, started, cpus, pin, console, machine_info, Steps)
    if "http" in parts:
        wrk = None
        if args.loadgen in ("auto", "wrk"):
            wrk = ensure_wrk(not args.no_install, lambda m: console.print(f"[yellow]{m}[/yellow]"))
            if wrk is None and args.loadgen == "wrk":
                console.print("[red]wrk is not available[/red]")
                return 2
        load_cpu = 1 if pin else None
        runner = (
            WrkRunner(wrk, args.threads, args.connections, load_cpu)
            if wrk
            else PythonLoadRunner(args.connections, load_cpu)
        )
        if not wrk:
            console.print(
                "[yellow]using the Python load generator: on a 2-core machine its own "
                "CPU use lowers every req/s figure; ratios stay comparable[/yellow]"
            )

    worker_counts = [1, 2] if args.workers2 else [1]
    http_steps = len(worker_counts) * (2 + 2 * args.rounds) if "http" in parts else 0
    micro_steps = len(args.algorithms) if "micro" in parts else 0
    machine = machine_info(runner.name if runner else None)
    console.print(
        f"[bold]carevault bench[/bold] {args.scenarios}: {machine['cpu_count']} CPUs "
        f"({machine['cpu_model']}), Python {machine['python']}, load generator "
        f"{machine['load_generator'] or '-'}, server/loadgen pinned: {pin}"
    )

    pairs: list[HttpPair] = []
    http_info: dict[str, Any] = {}
    micro: list[dict[str, Any]] = []
    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        ) as progress:
            steps = Steps(progress, http_steps + micro_steps)
            if "http" in parts:
                for workers in worker_counts:
                    pair, info = run_http(args, runner, steps, workers, pin)
                    pairs.append(pair)
                    http_info[f"workers_{workers}"] = info
            if "micro" in parts:
                for alg in args.algorithms:
                    steps.begin(
                        f"micro {alg}: {variant_count()} variants x {args.repeat} x "
                        f"{args.iterations} calls",
                        variant_count() * args.repeat * args.iterations,
                    )
                    micro.append(
                        run_micro_sync(alg, args.iterations, args.repeat, advance=steps.advance)
                    )
                    steps.done()
            steps.finish()
    finally:
        if runner is not None:
            runner.close()

    machine["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if pairs:
        console.print(http_table(pairs))
        for pair in pairs:
            ratios = pair.round_ratios
            if len(ratios) > 1:
                console.print(
                    f"w{pair.workers} ratio per round: " + ", ".join(f"{x:.2f}" for x in ratios),
                    highlight=False,
                )
    if micro:
        console.print(micro_table(micro))

    verdicts = [p.passed for p in pairs] + [
        m["variants"]["full"]["ratio_to_raw"] <= MICRO_TARGET for m in micro
    ]
    report = {
        "started_at": started.isoformat(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        "command": [sys.executable, "-m", "bench", *(sys.argv[1:] if argv is None else argv)],
        "scenario_set": args.scenarios,
        "machine": machine,
        "parameters": {
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "threads": args.threads,
            "rounds": args.rounds,
            "workers": worker_counts,
            "pinned": pin,
            "quick": args.quick,
            "micro_iterations": args.iterations,
            "micro_repeat": args.repeat,
            "algorithms": args.algorithms,
            "server": {
                "factory": "bench.app:create_bench_app",
                "access_log": False,
                "server_header": False,
                "proxy_headers": False,
                "log_level": "warning",
            },
        },
        "targets": {
            "http_auth_rps_ratio_min": HTTP_RPS_TARGET,
            "micro_full_to_raw_ratio_max": MICRO_TARGET,
        },
        "results": {
            "http": [
                {
                    "workers": p.workers,
                    "baseline": p.baseline.as_dict(),
                    "auth": p.auth.as_dict(),
                    "rps_ratio": round(p.rps_ratio, 4),
                    "p99_ratio": round(p.p99_ratio, 4),
                    "round_ratios": [round(x, 4) for x in p.round_ratios],
                    "passed": p.passed,
                    "rounds": p.rounds,
                }
                for p in pairs
            ],
            "http_server": http_info,
            "micro": [
                {
                    **m,
                    "target_ratio_max": MICRO_TARGET,
                    "passed": m["variants"]["full"]["ratio_to_raw"] <= MICRO_TARGET,
                }
                for m in micro
            ],
        },
        "passed": all(verdicts),
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    load = machine["loadavg_at_start"]
    if load and load[0] > 0.5 * cpus:
        console.print(
            f"[yellow]note: load average was {load[0]:.2f} on {cpus} CPUs at the start: "
            "other work was running; compare ratios, not absolute figures[/yellow]"
        )
    console.print(
        f"results written to [bold]{_display(path)}[/bold]; "
        f"targets {'all met' if all(verdicts) else 'NOT all met'}"
    )
    return 1 if args.strict and not all(verdicts) else 0


# ---------------------------------------------------------------------------------- fhir


def fhir_tables(runs: list[Any]) -> list[Table]:
    from bench.fhir import SCENARIOS

    http = Table(
        title="FHIR over HTTP (wrk; baseline = static bytes of one Patient, no auth, same round)"
    )
    for col, justify in (
        ("store / N", "left"),
        ("scenario", "left"),
        ("conns", "right"),
        ("req/s", "right"),
        ("p50 ms", "right"),
        ("p99 ms", "right"),
        ("errors", "right"),
        ("ratio to baseline", "right"),
        ("p99 ratio", "right"),
        ("target", "right"),
        ("result", "center"),
    ):
        http.add_column(col, justify=justify)  # type: ignore[arg-type]
    for run in runs:
        for name in SCENARIOS:
            r = run.chosen[name]
            target, verdict = "", "info"
            if name.startswith("baseline"):
                verdict = "baseline"
            elif name == "fhir-read-c1":
                target = f"p99 < {FHIR_READ_P99_MAX_MS:.0f} ms"
                ok = r.latency_us["p99"] / 1000 < FHIR_READ_P99_MAX_MS and r.error_count == 0
                verdict = "[green]PASS[/green]" if ok else "[red]FAIL[/red]"
            if not name.startswith("baseline") and r.error_count:
                verdict = "[red]ERRORS[/red]"
            http.add_row(
                f"{run.store} {run.size:,}",
                name.removesuffix("-c1"),
                str(r.connections),
                f"{r.rps:,.0f}",
                _fmt_ms(r.latency_us["p50"]),
                _fmt_ms(r.latency_us["p99"]),
                str(r.error_count),
                f"{run.ratios[name]:.2f}",
                f"{run.p99_ratios[name]:.2f}",
                target,
                verdict,
            )
        http.add_section()
    micro = Table(title="Read path in-process: store.read('Patient', id), µs per call (median)")
    for col in (
        "store / N",
        "full read",
        "SELECT+parse (no AEAD)",
        "DEK cache+AEAD",
        "AEAD only",
        "DEK cold (SELECT+unwrap)",
        "unwrap only",
        "encryption share",
        "target",
        "result",
    ):
        micro.add_column(col, justify="left" if col == "store / N" else "right")
    for run in runs:
        v = {k: x["median_us"] for k, x in run.read_path["variants"].items()}
        share = run.read_path["encryption_share_direct"]
        ok = share < FHIR_ENCRYPTION_SHARE_MAX
        micro.add_row(
            f"{run.store} {run.size:,}",
            f"{v['full']:.1f}",
            f"{v['sql+parse']:.1f}",
            f"{v['dek+aead']:.1f}",
            f"{v['aead']:.1f}",
            f"{v['dek-cold']:.1f}",
            f"{v['unwrap']:.1f}",
            f"{100 * share:.1f}% (diff {100 * run.read_path['encryption_share']:.1f}%)",
            f"< {100 * FHIR_ENCRYPTION_SHARE_MAX:.0f}%",
            "[green]PASS[/green]" if ok else "[red]FAIL[/red]",
        )
    return [http, micro]


def _plan_summary(plan: list[str]) -> str:
    """PostgreSQL: the execution time line; SQLite: the plan's steps."""
    times = [line.strip() for line in plan if line.strip().startswith("Execution Time")]
    if times:
        return times[0].removeprefix("Execution Time: ")
    return "; ".join(line.split(" ", 3)[-1] for line in plan)[:110]


def fhir_plans_table(runs: list[Any]) -> Table:
    table = Table(title="Query plans of one read / search (in-process, before the HTTP load)")
    for col in ("store / N", "query", "statements", "plan (PostgreSQL: EXPLAIN ANALYZE time)"):
        table.add_column(col)
    for run in runs:
        for query, statements in run.plans.items():
            table.add_row(
                f"{run.store} {run.size:,}",
                query,
                str(len(statements)),
                " | ".join(_plan_summary(s["plan"]) for s in statements),
            )
    return table


def fhir_verdict(runs: list[Any]) -> bool:
    verdicts = []
    for run in runs:
        read = run.chosen["fhir-read-c1"]
        verdicts.append(run.read_path["encryption_share_direct"] < FHIR_ENCRYPTION_SHARE_MAX)
        verdicts.append(read.latency_us["p99"] / 1000 < FHIR_READ_P99_MAX_MS)
        verdicts.append(all(r.error_count == 0 for r in run.chosen.values()))
    return all(verdicts)


def fhir_report(
    args: argparse.Namespace,
    started: dt.datetime,
    machine: dict[str, Any],
    stores: list[tuple[str, str | None]],
    skipped: dict[str, str],
    runs: list[Any],
    complete: bool,
    error: str | None,
) -> dict[str, Any]:
    from bench.fhir import FHIR_ROLE, SCENARIOS

    return {
        "started_at": started.isoformat(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        "command": [sys.executable, "-m", "bench", *sys.argv[1:]],
        "scenario_set": "fhir",
        "machine": machine,
        "parameters": {
            "sizes": sorted(args.sizes),
            "stores": [s for s, _ in stores],
            "skipped_stores": skipped,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "threads": args.threads,
            "rounds": args.rounds,
            "read_path_repeat": args.repeat,
            "seed_workers": args.seed_workers,
            "seed_method": args.seed_method,
            "user_role": FHIR_ROLE,
            "pinned": machine.get("pinned"),
            "server": {"factory": "bench.app:create_bench_app", "workers": 1},
        },
        "targets": {
            "encryption_share_max": FHIR_ENCRYPTION_SHARE_MAX,
            "fhir_read_p99_ms_max": FHIR_READ_P99_MAX_MS,
            "fhir_read_p99_measured_on": "fhir-read-c1 (1 connection)",
        },
        "results": {
            "fhir": [
                {
                    "store": run.store,
                    "size": run.size,
                    "resources_in_store": run.resources_in_store,
                    "seed": {
                        "resources_this_step": run.seeded.resources,
                        "patients": len(run.seeded.patient_ids),
                        "seconds": round(run.seeded.seconds, 2),
                        "per_second": round(run.seeded.per_second, 1),
                        **run.seeded.extra,
                    },
                    "read_path": run.read_path,
                    "http": {
                        name: {
                            **run.chosen[name].as_dict(),
                            "rps_ratio": round(run.ratios[name], 4),
                            "p99_ratio": round(run.p99_ratios[name], 4),
                        }
                        for name in SCENARIOS
                    },
                    "query_plans": run.plans,
                    "rounds": run.rounds,
                    "server": run.info,
                }
                for run in runs
            ]
        },
        "complete": complete,
        "error": error,
        "passed": fhir_verdict(runs) if complete else None,
    }


def fhir_main(args: argparse.Namespace, started: dt.datetime, cpus: int, pin: bool) -> int:
    from bench.fhir import run_fhir_store, steps_per_store, wrk_and_stores

    prepared = wrk_and_stores(args, pin, "fhir", console.print)
    if prepared is None:
        return 2
    runner, stores, skipped = prepared
    machine = machine_info(runner.name)
    machine["pinned"] = pin
    console.print(
        f"[bold]carevault bench[/bold] fhir: sizes {sorted(args.sizes)}, stores "
        f"{[s for s, _ in stores]}, {machine['cpu_count']} CPUs, load generator {runner.name}, "
        f"pinned: {pin}, load average {machine['loadavg_at_start']}"
    )
    runs: list[Any] = []
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"{started.strftime('%Y%m%dT%H%M%SZ')}-fhir.json"

    def write(complete: bool, error: str | None = None) -> None:
        """The JSON so far: rewritten after every store/size, so a failure keeps what ran."""
        report = fhir_report(args, started, machine, stores, skipped, runs, complete, error)
        path.write_text(json.dumps(report, indent=2) + "\n")

    def on_run(run: Any) -> None:
        runs.append(run)
        write(False)

    try:
        with Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        ) as progress:
            steps = Steps(progress, steps_per_store(args.sizes, args.rounds) * len(stores))
            for store, pg_url in stores:
                run_fhir_store(args, runner, steps, store, pg_url, pin, on_run=on_run)
            steps.finish()
    except BaseException as err:
        machine["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        write(False, f"{type(err).__name__}: {err}"[:2000])
        console.print(f"[red]stopped: partial results in {_display(path)}[/red]")
        raise
    finally:
        runner.close()
    machine["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    for table in fhir_tables(runs):
        console.print(table)
    console.print(fhir_plans_table(runs))
    for run in runs:
        console.print(
            f"{run.store} {run.size:,}: {sum(run.resources_in_store.values()):,} resources in "
            f"the store ({run.resources_in_store}); seeded {run.seeded.resources:,} more in "
            f"{run.seeded.seconds:.1f} s ({run.seeded.per_second:,.0f}/s, "
            f"{args.seed_workers} processes, {run.seeded.extra.get('method')}); Patient body "
            f"{run.info['patient_body_bytes']} bytes; first search pages "
            f"{run.info['entries_in_first_search_page']}",
            highlight=False,
        )
    for store, reason in skipped.items():
        console.print(f"[yellow]{store} skipped: {reason}[/yellow]")
    write(True)
    passed = fhir_verdict(runs)
    load = machine["loadavg_at_start"]
    console.print(
        f"load average at start {load}, at end {machine['loadavg_at_end']} ({cpus} CPUs)",
        highlight=False,
    )
    if load and load[0] > 0.5 * cpus:
        console.print(
            f"[yellow]note: load average was {load[0]:.2f} on {cpus} CPUs at the start: "
            "other work was running; compare ratios, not absolute figures[/yellow]"
        )
    console.print(
        f"results written to [bold]{_display(path)}[/bold]; "
        f"targets {'all met' if passed else 'NOT all met'}"
    )
    return 1 if args.strict and not passed else 0


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        sys.exit(130)
