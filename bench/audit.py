"""Scenario set "audit": what the audit trail costs, in one run per store.

1. **Audit cost per request.** On the `fhir` set's data set (seeded by
   `bench.fhir.seed_processes`), two servers of the same code on the same database, started by
   this module's factories: `create_audited_app` (the product's `AuditWriter`, group commit)
   and `create_noop_audit_app`, whose `Services.audit_writer` is replaced, in the server
   process, by `NoopAuditWriter` before `create_app` wires the `AuditTrail` middleware to it.
   No setting or variable reaches that substitution: only `python -m bench.server --factory
   bench.audit:create_noop_audit_app` builds such a server. wrk reads
   `GET /fhir/Observation/{id}` over up to 5,000 seeded Observations as the service account,
   with 32 connections and with 1, audited and not in alternating order; the req/s ratio
   audited / no-op is the cost of auditing (target >= 0.80). Each measurement also reads
   the audited server's `AuditWriter.batches` and the trail's size before and after
   (`GET /bench/audit-stats`, a route of these factories only, outside the audited paths):
   entries written and entries per commit.
2. **Append throughput.** In-process, on the same database after the HTTP part: N tasks
   (1, 8, 64) each awaiting `AuditWriter.write([entry])` in a loop for a fixed time: entries/s,
   commits/s, write latency; then the same with `PerEntryWriter`, one `AuditLog.append`
   transaction per entry (what the trail would cost without group commit). The whole trail
   (HTTP run + appends) is then verified with `archive.verify_database`: it must be ok.
3. **`audit verify` speed.** A fresh database is bulk-seeded with a valid trail of
   `--verify-entries` entries (default 1,000,000) built here exactly as `AuditLog.append`
   builds rows (canonical entry, HMAC chain with the store's audit MAC key), executemany in
   batches on a sync connection, plus what the running product adds: a checkpoint signed
   every 1,000 entries (RFC 9162 root from `merkle.CompactRange`, Ed25519 over
   `checkpoint_note`, as `AuditLog.checkpoint`) and the hash of every complete 1,024-entry block
   (as `AuditLog._subtrees` stores them). `archive.verify_database` is then timed end to end
   (connect, every row, every checkpoint; must report ok; target >= 100,000 entries/s), and
   `carevault audit verify` (the CLI, subprocess) on the same database for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from bench.fhir import (
    RESOURCES_PER_PATIENT,
    ROTATE_SCRIPT,
    SEED,
    create_pg_schema,
    drop_pg_schema,
    group_count,
    make_group,
    seed_processes,
    write_paths,
    wrk_and_stores,
)

DEFAULT_SIZE = 10_000
DEFAULT_VERIFY_ENTRIES = 1_000_000
DEFAULT_CONCURRENCY = (1, 8, 64)
AUDIT_RATIO_MIN = 0.80  # audited read req/s >= 0.80 x the same read with a no-op writer
VERIFY_RATE_MIN = 100_000  # entries/s of archive.verify_database
READ_IDS_MAX = 5000
AUDITED_FACTORY = "bench.audit:create_audited_app"
NOOP_FACTORY = "bench.audit:create_noop_audit_app"
STATS_PATH = "/bench/audit-stats"
PARTS = ("http", "append", "verify")
# (scenario, connections): None = the harness's --connections (default 32)
HTTP_SCENARIOS = {"read": None, "read-c1": 1}
VARIANTS = ("audited", "noop")
WRITERS = ("group", "per-entry")
SEED_BATCH = 10_000  # rows per executemany when seeding the verify trail
GROUP_TIME_EVERY = 8  # seeded entries share their time in runs of 8, like a group commit's


# ---------------------------------------------------------------------------------- writers


class NoopAuditWriter:
    """The benchmark's stand-in for `AuditWriter`: `write` returns at once, nothing is
    recorded. It exists only here and is put into `Services` only by
    `create_noop_audit_app` (never by configuration). `writes` counts calls, so the harness can
    check that every request went through it."""

    def __init__(self) -> None:
        self.batches = 0
        self.writes = 0

    async def write(self, entries: list[Any]) -> None:
        self.writes += 1

    async def run_checkpoints(self) -> None:
        return

    async def drain(self) -> None:
        return


class PerEntryWriter:
    """The contrast of part 2: no group commit, one `AuditLog.append` transaction per entry."""

    def __init__(self, trail: Any) -> None:
        self.trail = trail
        self.batches = 0

    async def write(self, entries: list[Any]) -> None:
        for entry in entries:
            await self.trail.append([entry])
            self.batches += 1

    async def drain(self) -> None:
        return


# ---------------------------------------------------------------------------------- factories


def bench_app(settings: Any = None, *, noop: bool) -> Any:
    """The product's `create_app` on `build_services(settings)`, the audit writer replaced by a
    `NoopAuditWriter` when `noop`, plus `GET /bench/audit-stats` (not an audited path)."""
    from fastapi import FastAPI

    from carevault.app import create_app
    from carevault.config import Settings
    from carevault.runtime import build_services

    settings = settings or Settings()
    services = build_services(settings)
    if noop:
        services.audit_writer = NoopAuditWriter()  # type: ignore[assignment]
    app: FastAPI = create_app(settings, services)

    @app.get(STATS_PATH, include_in_schema=False)
    async def audit_stats() -> dict[str, Any]:
        writer = services.audit_writer
        return {
            "writer": type(writer).__name__,
            "batches": writer.batches,
            "writes": getattr(writer, "writes", None),
            "size": await services.audit.size(),
        }

    return app


def create_audited_app() -> Any:
    return bench_app(noop=False)


def create_noop_audit_app() -> Any:
    return bench_app(noop=True)


# ---------------------------------------------------------------------------------- entries


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def entry_templates(
    count: int = 1024, seed_value: int = SEED, *, denials: bool = True
) -> list[Any]:
    """Entries shaped like the trail's: mostly FHIR reads by a service or clinician account,
    some searches (keyed query hash), denials, logins and a few break-glass reads; ids only.
    Without `denials` (what the append part writes through `AuditWriter`) the denied reads are
    permitted ones: bursts of denials would make the writer's alert rules add alert entries."""
    from carevault.audit.entry import AuditEntry, Outcome

    rng = random.Random(f"{seed_value}:audit")
    patients = [_uuid(rng) for _ in range(400)]
    users = [(_uuid(rng), role) for role in ("service", "physician", "nurse") for _ in range(12)]
    out = []
    for _ in range(count):
        user, role = rng.choice(users)
        common = {
            "user": user,
            "client": "carevault",
            "roles": (role,),
            "request_id": _uuid(rng),
            "source": f"10.0.{rng.randint(0, 9)}.{rng.randint(1, 254)}",
            "user_agent": f"{rng.getrandbits(128):032x}",
        }
        kind = rng.random()
        if kind < 0.78:
            rtype = rng.choice(("Observation",) * 6 + ("Patient", "Encounter", "Condition"))
            glass = rng.random() < 0.005
            out.append(
                AuditEntry(
                    action="fhir.read",
                    outcome=Outcome.permit,
                    status=200,
                    patient=rng.choice(patients),
                    resource_type=rtype,
                    resource_id=_uuid(rng),
                    version="1",
                    purpose="ETREAT" if glass else "TREAT",
                    break_glass=glass,
                    **common,
                )
            )
        elif kind < 0.92:
            out.append(
                AuditEntry(
                    action="fhir.search",
                    outcome=Outcome.permit,
                    status=200,
                    resource_type="Observation",
                    purpose="TREAT",
                    query=f"{rng.getrandbits(128):032x}",
                    **common,
                )
            )
        elif kind < 0.97:
            out.append(
                AuditEntry(
                    action="fhir.read",
                    outcome=Outcome.deny if denials else Outcome.permit,
                    status=404 if denials else 200,
                    patient=rng.choice(patients),
                    resource_type="Observation",
                    resource_id=_uuid(rng),
                    purpose="TREAT",
                    **common,
                )
            )
        else:
            out.append(
                AuditEntry(
                    action="security.login",
                    outcome=Outcome.permit,
                    user=user,
                    client="carevault",
                    roles=(role,),
                    request_id=common["request_id"],
                    source=common["source"],
                    detail={"method": "pwd"},
                )
            )
    return out


# ---------------------------------------------------------------------------------- part 3


def seed_trail(
    database_url: str,
    keys: Any,
    n: int,
    *,
    batch: int = SEED_BATCH,
    checkpoint_every: int = 1000,
    advance: Callable[[int], None] | None = None,
    seed_value: int = SEED,
) -> dict[str, Any]:
    """Write a valid trail of `n` entries into an empty audit table (sync connection,
    executemany of `batch` rows per transaction): the rows `AuditLog.append` writes (canonical
    entry, `chain_mac` with the audit MAC key), a signed checkpoint every `checkpoint_every`
    entries and at `n` (root over entries 1..size as `AuditLog.checkpoint` signs it) and the
    hash of every complete `merkle.BLOCK` (as the product stores them for proofs)."""
    from sqlalchemy import func, insert, select

    from carevault.audit import archive, merkle
    from carevault.audit.entry import GENESIS_MAC, canonical, format_time
    from carevault.audit.log import checkpoint_note, stored_row
    from carevault.db.tables import audit_blocks, audit_checkpoints, audit_entries

    templates = entry_templates(seed_value=seed_value)
    rng = random.Random(f"{seed_value}:request-ids")
    mac_key, signer, key_id = keys.mac, keys.signer, keys.key_id
    tree = merkle.CompactRange()
    block_leaves: list[bytes] = []
    previous = GENESIS_MAC
    base = dt.datetime(2026, 1, 5, 8, 0, tzinfo=dt.UTC)
    at = base
    rows: list[dict[str, Any]] = []
    signed: list[dict[str, Any]] = []
    blocks: list[dict[str, Any]] = []
    counts = {"entries": 0, "checkpoints": 0, "blocks": 0}
    started = time.perf_counter()
    with archive.connect(database_url) as conn:
        held = conn.execute(select(func.count()).select_from(audit_entries)).scalar_one()
        if held:
            raise RuntimeError(f"seed_trail needs an empty trail; this one holds {held} entries")

        def flush() -> None:
            if rows:
                conn.execute(insert(audit_entries), rows)
            if signed:
                conn.execute(insert(audit_checkpoints), signed)
            if blocks:
                conn.execute(insert(audit_blocks), blocks)
            conn.commit()
            counts["entries"] += len(rows)
            counts["checkpoints"] += len(signed)
            counts["blocks"] += len(blocks)
            if advance is not None and rows:
                advance(len(rows))
            rows.clear()
            signed.clear()
            blocks.clear()

        for seq in range(1, n + 1):
            if seq % GROUP_TIME_EVERY == 1:
                at = base + dt.timedelta(milliseconds=25 * seq)
                stamp = format_time(at)
            entry = templates[seq % len(templates)]
            entry.request_id = str(uuid.UUID(int=rng.getrandbits(128), version=4))
            body = canonical(entry.document(seq, stamp))
            previous = mac_key.compute(previous + body, 32)
            rows.append(stored_row(entry, seq, stamp, body, previous))
            leaf = merkle.leaf_hash(body + previous)
            tree.append(leaf)
            block_leaves.append(leaf)
            if len(block_leaves) == merkle.BLOCK:
                blocks.append(
                    {"block": seq // merkle.BLOCK - 1, "hash": merkle.root_of(block_leaves)}
                )
                block_leaves = []
            if seq % checkpoint_every == 0 or seq == n:
                root = tree.root()
                note_at = format_time(at + dt.timedelta(milliseconds=10))
                signed.append(
                    {
                        "size": seq,
                        "root": root,
                        "at": note_at,
                        "key_id": key_id,
                        "signature": signer.sign(checkpoint_note(seq, root, note_at)),
                    }
                )
            if len(rows) >= batch:
                flush()
        flush()
    seconds = time.perf_counter() - started
    return {
        **counts,
        "seconds": round(seconds, 2),
        "entries_per_second": round(counts["entries"] / seconds, 1) if seconds else None,
        "batch_rows": batch,
        "checkpoint_every": checkpoint_every,
        "block": merkle.BLOCK,
    }


def time_verify(
    database_url: str, keys: Any, progress: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """`archive.verify_database` end to end (connect, stream every row, every checkpoint), with
    its default processes (block-aligned ranges in parallel)."""
    from carevault.audit import archive, parallel

    def cpu_seconds() -> float:  # this process and its verifying processes (joined children)
        own, children = (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    started, cpu = time.perf_counter(), cpu_seconds()
    with archive.connect(database_url) as conn:
        report = archive.verify_database(conn, keys, progress=progress)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    return {
        "ok": report.ok,
        "problem": None
        if report.problem is None
        else {
            "seq": report.problem.seq,
            "kind": report.problem.kind,
            "message": report.problem.message,
        },
        "first": report.first,
        "last": report.last,
        "entries": report.entries,
        "checkpoints": report.checkpoints,
        "macs_checked": report.macs_checked,
        "processes": parallel.default_processes(),
        "seconds": round(seconds, 3),
        "entries_per_second": round(report.entries / seconds, 1) if seconds else None,
        "cpu_seconds": round(cpu, 3),  # verifying processes (not the PostgreSQL server's)
        "entries_per_cpu_second": round(report.entries / cpu, 1) if cpu else None,
    }


def cli_verify(settings_kwargs: dict[str, Any], timeout: float = 1800.0) -> dict[str, Any]:
    """`carevault audit verify` in a subprocess on the same database: wall time (including the
    interpreter, imports and `migrate.upgrade`) and the rate the command reports itself."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAREVAULT_")}
    env["CAREVAULT_DATA_DIR"] = str(settings_kwargs["data_dir"])
    if settings_kwargs.get("database_url"):
        env["CAREVAULT_DATABASE_URL"] = settings_kwargs["database_url"]
    env["COLUMNS"] = "120"
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "carevault.cli", "audit", "verify"],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    seconds = time.perf_counter() - started
    rate = re.search(r"\(([\d,]+) entries/s\)", result.stdout)
    return {
        "exit_code": result.returncode,
        "ok": result.returncode == 0 and "OK" in result.stdout,
        "wall_seconds": round(seconds, 2),
        "reported_entries_per_second": int(rate.group(1).replace(",", "")) if rate else None,
        "stdout_tail": result.stdout[-800:],
        "stderr_tail": result.stderr[-800:],
    }


# ---------------------------------------------------------------------------------- part 2


async def measure_append(
    services: Any,
    concurrency: int,
    seconds: float,
    writer_kind: str,
    templates: list[Any] | None = None,
) -> dict[str, Any]:
    """`concurrency` tasks, each awaiting `writer.write([entry])` in a loop for `seconds`.
    writer "group": the services' `AuditWriter` (group commit, background checkpoints);
    "per-entry": `PerEntryWriter` (one `AuditLog.append` transaction per entry)."""
    from sqlalchemy import func, select

    from carevault.db.engine import read_connection
    from carevault.db.tables import audit_checkpoints

    if writer_kind not in WRITERS:
        raise ValueError(f"writer must be one of {WRITERS}")
    writer: Any = (
        services.audit_writer if writer_kind == "group" else PerEntryWriter(services.audit)
    )
    pool = templates or entry_templates(256, denials=False)

    async def checkpoints() -> int:
        async with read_connection(services.engine) as conn:
            return int(
                (
                    await conn.execute(select(func.count()).select_from(audit_checkpoints))
                ).scalar_one()
            )

    await writer.drain()
    size_before = await services.audit.size()
    checkpoints_before = await checkpoints()
    batches_before = writer.batches
    loop = asyncio.get_running_loop()
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    stop_at = loop.time() + seconds

    async def task(index: int) -> None:
        mine = latencies[index]
        n = index
        while loop.time() < stop_at:
            entry = pool[n % len(pool)]
            n += concurrency
            t0 = time.perf_counter()
            try:
                await writer.write([entry])
            except Exception:  # noqa: BLE001 - counted: an entry that was not made durable
                errors[index] += 1
                continue
            mine.append(time.perf_counter() - t0)

    started = time.perf_counter()
    await asyncio.gather(*(task(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    commits = writer.batches - batches_before
    await writer.drain()  # a checkpoint the last batch started
    size_after = await services.audit.size()
    flat = sorted(x for lat in latencies for x in lat)
    written = len(flat)

    def pct(q: float) -> float:
        return round(flat[min(len(flat) - 1, int(q * len(flat)))] * 1e3, 3) if flat else 0.0

    return {
        "writer": writer_kind,
        "concurrency": concurrency,
        "seconds": round(elapsed, 3),
        "entries": written,
        "entries_in_trail": size_after - size_before,
        "errors": sum(errors),
        "commits": commits,
        "entries_per_second": round(written / elapsed, 1) if elapsed else 0.0,
        "commits_per_second": round(commits / elapsed, 1) if elapsed else 0.0,
        "entries_per_commit": round(written / commits, 2) if commits else None,
        "write_ms": {"p50": pct(0.50), "p99": pct(0.99), "max": pct(1.0)},
        "checkpoints_signed": await checkpoints() - checkpoints_before,
    }


async def append_part(
    settings: Any,
    concurrency: list[int],
    seconds: float,
    advance: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Every concurrency level with both writers (group first, then per-entry); the ratio is
    group entries/s over per-entry entries/s at the same concurrency."""
    from carevault.runtime import build_services

    services = build_services(settings)
    await services.start()
    runs: list[dict[str, Any]] = []
    try:
        templates = entry_templates(256, denials=False)
        for tasks in concurrency:
            for kind in WRITERS:
                runs.append(await measure_append(services, tasks, seconds, kind, templates))
                if advance is not None:
                    advance(1)
    finally:
        await services.close()  # signs a checkpoint over everything appended
    by = {(r["writer"], r["concurrency"]): r for r in runs}
    ratios = {
        str(c): round(
            by[("group", c)]["entries_per_second"]
            / max(by[("per-entry", c)]["entries_per_second"], 1e-9),
            3,
        )
        for c in concurrency
    }
    return {"seconds_each": seconds, "runs": runs, "group_to_per_entry_ratio": ratios}


# ---------------------------------------------------------------------------------- part 1


def _stats(server: Any) -> dict[str, Any]:
    from bench.server import ServerError, _http

    status, _, body = _http("GET", server.base_url + STATS_PATH, timeout=30.0)
    if status != 200:
        raise ServerError(f"{STATS_PATH} answered HTTP {status}")
    return orjson.loads(body)


def _database_cpu_seconds() -> dict[int, float]:
    """CPU seconds of each local PostgreSQL process: what the database spends, next to what the
    server spends (its backends live as long as the servers' pools)."""
    seconds: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if text[text.find("(") + 1 : text.rfind(")")] != "postgres":
            continue
        fields = text.rsplit(")", 1)[1].split()
        seconds[int(stat.parent.name)] = (int(fields[11]) + int(fields[12])) / os.sysconf(
            "SC_CLK_TCK"
        )
    return seconds


def _cpu_use(server: Any) -> tuple[float | None, dict[int, float]]:
    from bench.access import _cpu_seconds

    process = getattr(server, "_process", None)
    return (_cpu_seconds(process.pid) if process else None), _database_cpu_seconds()


def _cpu_per_request(
    before: tuple[float | None, dict[int, float]],
    after: tuple[float | None, dict[int, float]],
    requests: int,
) -> dict[str, float | None]:
    """Server and database CPU milliseconds per request over a measurement: where the cost of
    auditing goes (the server process is pinned; the database is not). A database process that
    ended meanwhile (an autovacuum worker) is not counted."""
    if not requests:
        return {"server_cpu_ms_per_request": None, "database_cpu_ms_per_request": None}
    server = None
    if before[0] is not None and after[0] is not None:
        server = round((after[0] - before[0]) * 1000 / requests, 3)
    database = sum(cpu - before[1].get(pid, 0.0) for pid, cpu in after[1].items())
    return {
        "server_cpu_ms_per_request": server,
        "database_cpu_ms_per_request": round(database * 1000 / requests, 3),
    }


def check_servers(
    servers: dict[str, Any], auth: dict[str, str], observation_id: str
) -> dict[str, Any]:
    """Before any load: both servers answer the same read with the same bytes; the audited
    server's read adds to the trail and goes through `AuditWriter`, the no-op server's read
    adds nothing and goes through `NoopAuditWriter`."""
    from bench.server import ServerError, _http

    path = f"/fhir/Observation/{observation_id}"
    bodies: dict[str, bytes] = {}
    seen: dict[str, Any] = {}
    for variant in VARIANTS:
        server = servers[variant]
        before = _stats(server)
        status, _, body = _http(
            "GET", server.base_url + path, headers={"Authorization": auth[variant]}
        )
        if status != 200 or orjson.loads(body).get("id") != observation_id:
            raise ServerError(f"{variant}: GET {path} answered HTTP {status}")
        after = _stats(server)
        bodies[variant] = body
        seen[variant] = {"before": before, "after": after}
    audited, noop = seen["audited"], seen["noop"]
    if audited["after"]["writer"] != "AuditWriter" or noop["after"]["writer"] != (
        "NoopAuditWriter"
    ):
        raise ServerError(f"unexpected writers: {audited['after']['writer']}, {noop['after']}")
    if audited["after"]["size"] - audited["before"]["size"] < 1:
        raise ServerError("the audited server's read added no audit entry")
    if noop["after"]["size"] != noop["before"]["size"]:
        raise ServerError("the no-op server's read added an audit entry")
    if noop["after"]["writes"] - noop["before"]["writes"] != 1:
        raise ServerError("the no-op server's read did not go through NoopAuditWriter")
    if bodies["audited"] != bodies["noop"]:
        raise ServerError("the two servers answer the same read with different bytes")
    return {
        "read_body_bytes": len(bodies["audited"]),
        "entries_per_read": audited["after"]["size"] - audited["before"]["size"],
        "writers": {v: seen[v]["after"]["writer"] for v in VARIANTS},
    }


def observation_ids(size: int, limit: int = READ_IDS_MAX) -> list[str]:
    """Up to `limit` Observation ids of the seeded data set, spread over all of it."""
    groups = group_count(size)
    every = [
        body["id"]
        for i in range(groups)
        for body in make_group(i).resources
        if body["resourceType"] == "Observation"
    ]
    rng = random.Random(SEED + 3)
    return rng.sample(every, min(limit, len(every)))


def measure_http(
    args: Any,
    runner: Any,
    steps: Any,
    servers: dict[str, Any],
    passwords: str,
    label: str,
    ids: list[str],
) -> dict[str, Any]:
    from bench.access import _login, wait_idle
    from bench.server import BENCH_USER

    single = None
    try:
        steps.begin(f"{label}: start audited and no-op servers, log in, check", None)
        for server in servers.values():
            server.start(timeout=120)
        auth = {v: _login(servers[v], BENCH_USER, passwords) for v in VARIANTS}
        checks = check_servers(servers, auth, ids[0])
        root = servers["audited"].static_body_file.parent
        paths = write_paths(root / "audit-read.txt", [f"/fhir/Observation/{i}" for i in ids])
        env = {"BENCH_PATHS_FILE": str(paths)}
        steps.done()
        single = type(runner)(runner.binary, 1, 1, runner.cpu)
        loads = {name: (single if conns == 1 else runner) for name, conns in HTTP_SCENARIOS.items()}
        rounds: list[dict[str, Any]] = []
        drained: list[float] = []
        for round_no in range(args.rounds):
            order = list(VARIANTS) if round_no % 2 == 0 else list(VARIANTS)[::-1]
            measured: dict[str, Any] = {}
            for scenario in HTTP_SCENARIOS:
                for variant in order:
                    server, load = servers[variant], loads[scenario]
                    url = server.base_url + "/"
                    steps.begin(
                        f"{label}: {scenario} {variant} (round {round_no + 1})",
                        args.warmup + args.duration,
                    )
                    if args.warmup > 0:
                        load.run(url, args.warmup, auth[variant], steps.tick_to, ROTATE_SCRIPT, env)
                        drained.append(wait_idle(server))
                    before = _stats(server)
                    cpu_before = _cpu_use(server)
                    result = load.run(
                        url,
                        args.duration,
                        auth[variant],
                        lambda t: steps.tick_to(args.warmup + t),
                        ROTATE_SCRIPT,
                        env,
                    )
                    drained.append(wait_idle(server))  # abandoned requests answered (and audited)
                    cpu_after = _cpu_use(server)
                    after = _stats(server)
                    entries = after["size"] - before["size"]
                    commits = after["batches"] - before["batches"]
                    result.extra.update(
                        {
                            "audit_entries": entries,
                            "audit_commits": commits,
                            "entries_per_commit": round(entries / commits, 2) if commits else None,
                            "noop_writes": (after["writes"] - before["writes"])
                            if after.get("writes") is not None
                            else None,
                            **_cpu_per_request(cpu_before, cpu_after, result.requests),
                        }
                    )
                    measured[f"{scenario}:{variant}"] = result
                    steps.done()
            rounds.append(measured)
        info = {
            "ports": {v: s.port for v, s in servers.items()},
            "read_ids": len(ids),
            "checks": checks,
            "drain_seconds_max": round(max(drained, default=0.0), 2),
            "log_tail": {v: s.log_tail(600) for v, s in servers.items()},
        }
    finally:
        if single is not None:
            single.close()
        for server in servers.values():
            server.stop()
    chosen: dict[str, Any] = {}
    for scenario in HTTP_SCENARIOS:
        audited, noop = f"{scenario}:audited", f"{scenario}:noop"
        order = sorted(
            range(len(rounds)),
            key=lambda i: rounds[i][audited].rps / max(rounds[i][noop].rps, 1e-9),
        )
        pick = rounds[order[len(order) // 2]]
        a, b = pick[audited], pick[noop]
        chosen[scenario] = {
            "audited": a.as_dict(),
            "noop": b.as_dict(),
            "rps_ratio": round(a.rps / max(b.rps, 1e-9), 4),
            "p50_ratio": round(a.latency_us["p50"] / max(b.latency_us["p50"], 1e-9), 4),
            "p99_ratio": round(a.latency_us["p99"] / max(b.latency_us["p99"], 1e-9), 4),
            "round_ratios": [round(r[audited].rps / max(r[noop].rps, 1e-9), 4) for r in rounds],
        }
    return {
        "scenarios": chosen,
        "rounds": [{k: v.as_dict() for k, v in r.items()} for r in rounds],
        "info": info,
    }


# ---------------------------------------------------------------------------------- one store


def steps_per_store(args: Any) -> int:
    steps = 0
    if "http" in args.audit_parts:
        steps += 3 + args.rounds * len(HTTP_SCENARIOS) * len(VARIANTS)  # init, seed, start
    if "append" in args.audit_parts:
        steps += (0 if "http" in args.audit_parts else 1) + 2  # (init) + measuring + verify
    if "verify" in args.audit_parts:
        steps += 3  # seed, verify_database, CLI
    return steps


def run_audit_store(
    args: Any, runner: Any, steps: Any, store_name: str, pg_url: str | None, pin: bool
) -> dict[str, Any]:
    from bench.server import BenchServer
    from carevault.config import Settings

    size = args.size
    label = f"{store_name} {size:,}"
    out: dict[str, Any] = {"store": store_name, "size": size}
    parts = args.audit_parts
    schemas: list[str] = []
    cleanup: list[Any] = []
    try:
        if "http" in parts or "append" in parts:
            database_url = None
            if pg_url:
                schema, database_url = create_pg_schema(pg_url)
                schemas.append(schema)
            server = BenchServer(
                cpu=0 if pin else None,
                keep=args.keep,
                database_url=database_url,
                role="service",
                factory=AUDITED_FACTORY,
            )
            cleanup.append(server)
            steps.begin(f"{label}: carevault init + user add (service)", None)
            password = server.prepare()
            steps.done()
            settings_kwargs = {
                "data_dir": server.data_dir,
                "database_url": database_url,
                "signing_algorithm": server.algorithm,
            }
            if "http" in parts:
                total = group_count(size) * RESOURCES_PER_PATIENT
                steps.begin(
                    f"{label}: seed {total:,} (bench.fhir, {args.seed_workers} procs)", total
                )
                written, seconds, seed_extra = seed_processes(
                    settings_kwargs,
                    size,
                    workers=args.seed_workers,
                    method=args.seed_method,
                    advance=steps.advance,
                )
                steps.done()
                out["seed"] = {
                    "resources": written,
                    "seconds": round(seconds, 2),
                    "per_second": round(written / seconds, 1) if seconds else None,
                    **seed_extra,
                }
                noop = BenchServer(
                    cpu=0 if pin else None,
                    keep=args.keep,
                    database_url=database_url,
                    role="service",
                    factory=NOOP_FACTORY,
                )
                noop.data_dir = server.data_dir  # the same data, keys and accounts
                cleanup.append(noop)
                out["http"] = measure_http(
                    args,
                    runner,
                    steps,
                    {"audited": server, "noop": noop},
                    password,
                    label,
                    observation_ids(size),
                )
            if "append" in parts:
                settings = Settings(**settings_kwargs)
                steps.begin(
                    f"{label}: append, {args.append_concurrency} tasks x "
                    f"{args.append_seconds:g} s, group commit vs per entry",
                    len(args.append_concurrency) * len(WRITERS),
                )
                out["append"] = asyncio.run(
                    append_part(
                        settings, args.append_concurrency, args.append_seconds, steps.advance
                    )
                )
                steps.done()
                steps.begin(f"{label}: verify the trail written by the HTTP run and appends", None)
                out["append"]["trail_verify"] = time_verify(
                    settings.sqlalchemy_url, _audit_keys(settings)
                )
                steps.done()
        if "verify" in parts:
            out["verify"] = verify_part(args, steps, store_name, pg_url, schemas, cleanup)
    finally:
        for item in cleanup:
            if isinstance(item, Path):
                if not args.keep:
                    shutil.rmtree(item, ignore_errors=True)
            else:
                item.cleanup()
        if pg_url and not args.keep:
            for schema in schemas:
                drop_pg_schema(pg_url, schema)
    out["passed"] = store_passed(out)
    return out


def _audit_keys(settings: Any) -> Any:
    """The audit keys `build_services` gives `Services.custody` (and the CLI's verify uses)."""
    from carevault.crypto.custody import KeyCustody

    return KeyCustody.from_settings(settings).audit_keys()


def fresh_settings(
    pg_url: str | None, schemas: list[str], cleanup: list[Any]
) -> tuple[Any, dict[str, Any]]:
    """A new data directory (keys) and database (SQLite file in it, or a new PostgreSQL
    schema), migrated."""
    from carevault.config import Settings
    from carevault.db import migrate
    from carevault.runtime import ensure_key_material

    root = Path(tempfile.mkdtemp(prefix="carevault-bench-audit-"))
    cleanup.append(root)
    database_url = None
    if pg_url:
        schema, database_url = create_pg_schema(pg_url)
        schemas.append(schema)
    kwargs = {"data_dir": root / "var", "database_url": database_url}
    settings = Settings(**kwargs)
    ensure_key_material(settings)
    migrate.upgrade(settings)
    return settings, kwargs


def verify_part(
    args: Any,
    steps: Any,
    store_name: str,
    pg_url: str | None,
    schemas: list[str],
    cleanup: list[Any],
) -> dict[str, Any]:
    n = args.verify_entries
    settings, kwargs = fresh_settings(pg_url, schemas, cleanup)
    keys = _audit_keys(settings)
    steps.begin(f"{store_name}: seed a chained, checkpointed trail of {n:,} entries", n)
    seeded = seed_trail(settings.sqlalchemy_url, keys, n, advance=steps.advance)
    steps.done()
    steps.begin(f"{store_name}: archive.verify_database over {n:,} entries", n)
    verified = time_verify(settings.sqlalchemy_url, keys, steps.advance)
    steps.done()
    steps.begin(f"{store_name}: carevault audit verify (CLI subprocess)", None)
    cli = cli_verify(kwargs)
    steps.done()
    return {"entries": n, "seed": seeded, "verify": verified, "cli": cli}


# ---------------------------------------------------------------------------------- report


def store_passed(run: dict[str, Any]) -> bool:
    verdicts = []
    if "http" in run:
        read = run["http"]["scenarios"]["read"]
        verdicts.append(read["rps_ratio"] >= AUDIT_RATIO_MIN)
        for s in run["http"]["scenarios"].values():
            for v in VARIANTS:
                verdicts.append(s[v]["error_count"] == 0 and s[v]["requests"] > 0)
    if "append" in run and "trail_verify" in run["append"]:
        verdicts.append(run["append"]["trail_verify"]["ok"])
        verdicts.append(all(r["errors"] == 0 for r in run["append"]["runs"]))
    if "verify" in run:
        v = run["verify"]["verify"]
        verdicts.append(v["ok"] and v["entries"] == run["verify"]["entries"])
        verdicts.append((v["entries_per_second"] or 0) >= VERIFY_RATE_MIN)
    return all(verdicts)


def _ms(us: float) -> str:
    return f"{us / 1000:.2f}"


def _cpu_ms(measured: dict[str, Any]) -> str:
    value = measured["extra"].get("server_cpu_ms_per_request")
    return "-" if value is None else f"{value:.2f}"


def _verdict(ok: bool) -> str:
    return "[green]PASS[/green]" if ok else "[red]FAIL[/red]"


def tables(runs: list[dict[str, Any]]) -> list[Any]:
    from rich.table import Table

    out = []
    http = Table(
        title="Audit cost per FHIR read (wrk, GET /fhir/Observation/{id}, service account): "
        "audited vs the same server with a no-op audit writer, same round",
        caption="entries (commits) over the measured window: trail growth and AuditWriter."
        "batches; server CPU ms/req: audited / no-op server process; target on the "
        "many-connection row (throughput)",
    )
    for col in (
        "store / N",
        "conns",
        "audited req/s",
        "p50 / p99 ms",
        "no-op req/s",
        "p50 / p99 ms ",
        "ratio",
        "entries (commits)",
        "entries/ commit",
        "server CPU ms/req",
        "target",
        "result",
    ):
        http.add_column(col, justify="left" if col == "store / N" else "right")
    for run in runs:
        if "http" not in run:
            continue
        for scenario, s in run["http"]["scenarios"].items():
            a, b = s["audited"], s["noop"]
            errors = a["error_count"] + b["error_count"]
            target = f">= {AUDIT_RATIO_MIN:.2f}" if scenario == "read" else ""
            if errors:
                verdict = f"[red]{errors} ERRORS[/red]"
            elif target:
                verdict = _verdict(s["rps_ratio"] >= AUDIT_RATIO_MIN)
            else:
                verdict = "info"
            http.add_row(
                f"{run['store']} {run['size']:,}",
                str(a["connections"]),
                f"{a['rps']:,.0f}",
                f"{_ms(a['latency_us']['p50'])} / {_ms(a['latency_us']['p99'])}",
                f"{b['rps']:,.0f}",
                f"{_ms(b['latency_us']['p50'])} / {_ms(b['latency_us']['p99'])}",
                f"{s['rps_ratio']:.2f}",
                f"{a['extra']['audit_entries']:,} ({a['extra']['audit_commits']:,})",
                f"{a['extra']['entries_per_commit'] or 0:.2f}",
                f"{_cpu_ms(a)} / {_cpu_ms(b)}",
                target,
                verdict,
            )
    if http.rows:
        out.append(http)

    append = Table(
        title="Append throughput in-process: N tasks each awaiting write([entry]) in a loop: "
        "group commit (AuditWriter) vs one AuditLog.append transaction per entry",
        caption="per entry: commits/s = entries/s; trail = the HTTP run's and these entries, "
        "verified by archive.verify_database afterwards",
    )
    for col in (
        "store",
        "tasks",
        "group entries/s",
        "commits/s",
        "entries/ commit",
        "p50 / p99 ms",
        "per-entry entries/s",
        "p50 / p99 ms ",
        "ratio group/ per-entry",
        "errors",
        "trail",
    ):
        append.add_column(col, justify="left" if col == "store" else "right")
    for run in runs:
        if "append" not in run:
            continue
        by = {(r["writer"], r["concurrency"]): r for r in run["append"]["runs"]}
        tv = run["append"].get("trail_verify")
        trail = ""
        if tv:
            trail = f"{tv['entries']:,} " + ("[green]ok[/green]" if tv["ok"] else "[red]BAD[/red]")
        for c in sorted({r["concurrency"] for r in run["append"]["runs"]}):
            g, p = by[("group", c)], by[("per-entry", c)]
            append.add_row(
                run["store"],
                str(c),
                f"{g['entries_per_second']:,.0f}",
                f"{g['commits_per_second']:,.0f}",
                f"{g['entries_per_commit'] or 0:.1f}",
                f"{g['write_ms']['p50']:.1f} / {g['write_ms']['p99']:.1f}",
                f"{p['entries_per_second']:,.0f}",
                f"{p['write_ms']['p50']:.1f} / {p['write_ms']['p99']:.1f}",
                f"{run['append']['group_to_per_entry_ratio'][str(c)]:.2f}",
                str(g["errors"] + p["errors"]),
                trail,
            )
            trail = ""
        append.add_section()
    if append.rows:
        out.append(append)

    verify = Table(
        title="audit verify: archive.verify_database end to end on a bulk-seeded valid trail",
        caption="seed: rows, chain MACs, a signed checkpoint every 1,000 and block hashes every "
        "1,024 built in-process, executemany on a sync connection; CPU = this process's CPU "
        "time during verify; CLI = `carevault audit verify` subprocess wall time",
    )
    for col in (
        "store",
        "entries",
        "checkpoints",
        "seed s (entries/s)",
        "verify s",
        "entries/s",
        "per CPU-s",
        "CLI s (entries/s)",
        "ok",
        "target",
        "result",
    ):
        verify.add_column(col, justify="left" if col == "store" else "right")
    for run in runs:
        if "verify" not in run:
            continue
        v, seed, cli = run["verify"]["verify"], run["verify"]["seed"], run["verify"]["cli"]
        rate = v["entries_per_second"] or 0
        cli_rate = cli.get("reported_entries_per_second")
        verify.add_row(
            run["store"],
            f"{v['entries']:,}",
            f"{v['checkpoints']:,}",
            f"{seed['seconds']:.1f} ({seed['entries_per_second']:,.0f})",
            f"{v['seconds']:.2f}",
            f"{rate:,.0f}",
            f"{v['entries_per_cpu_second'] or 0:,.0f}",
            f"{cli['wall_seconds']:.1f} ({cli_rate:,})"
            if cli_rate
            else f"{cli['wall_seconds']:.1f} (exit {cli['exit_code']})",
            "[green]ok[/green]" if v["ok"] else f"[red]{v['problem']}[/red]",
            f">= {VERIFY_RATE_MIN:,}",
            _verdict(v["ok"] and rate >= VERIFY_RATE_MIN),
        )
    if verify.rows:
        out.append(verify)
    return out


def report(
    args: Any,
    started: dt.datetime,
    machine: dict[str, Any],
    stores: list[tuple[str, str | None]],
    skipped: dict[str, str],
    runs: list[dict[str, Any]],
    complete: bool,
    error: str | None,
) -> dict[str, Any]:
    return {
        "started_at": started.isoformat(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
        "command": [sys.executable, "-m", "bench", *sys.argv[1:]],
        "scenario_set": "audit",
        "machine": machine,
        "parameters": {
            "parts": list(args.audit_parts),
            "size": args.size,
            "stores": [s for s, _ in stores],
            "skipped_stores": skipped,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "connections": args.connections,
            "threads": args.threads,
            "rounds": args.rounds,
            "seed_workers": args.seed_workers,
            "seed_method": args.seed_method,
            "append_concurrency": args.append_concurrency,
            "append_seconds": args.append_seconds,
            "verify_entries": args.verify_entries,
            "pinned": machine.get("pinned"),
            "user_role": "service",
            "servers": {
                "audited": {"factory": AUDITED_FACTORY, "workers": 1},
                "noop": {"factory": NOOP_FACTORY, "workers": 1},
            },
        },
        "targets": {
            "audited_to_noop_read_rps_ratio_min": AUDIT_RATIO_MIN,
            "audited_ratio_measured_on": f"read, {args.connections} connections",
            "verify_entries_per_second_min": VERIFY_RATE_MIN,
        },
        "results": {"audit": runs},
        "complete": complete,
        "error": error,
        "passed": all(r["passed"] for r in runs) if complete and runs else None,
    }


def _display(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def audit_main(
    args: argparse.Namespace,
    started: dt.datetime,
    cpus: int,
    pin: bool,
    console: Any,
    machine_info: Callable[[str | None], dict[str, Any]],
    steps_class: Any,
) -> int:
    """`python -m bench audit`: the harness's entry point for this set."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    args.size = args.size or DEFAULT_SIZE
    runner: Any = None
    if "http" in args.audit_parts:
        prepared = wrk_and_stores(args, pin, "audit", console.print)
        if prepared is None:
            return 2
        runner, stores, skipped = prepared
    else:
        from bench.fhir import pg_unavailable

        stores, skipped = [], {}
        for store in args.stores:
            reason = pg_unavailable(args.pg) if store == "postgresql" else None
            if reason:
                skipped[store] = reason
                console.print(f"[yellow]SKIPPED postgresql: {reason}[/yellow]")
            else:
                stores.append((store, args.pg if store == "postgresql" else None))
    machine = machine_info(runner.name if runner else None)
    machine["pinned"] = pin
    console.print(
        f"[bold]carevault bench[/bold] audit: parts {list(args.audit_parts)}, {args.size:,} "
        f"resources, verify {args.verify_entries:,} entries, append tasks "
        f"{args.append_concurrency}, stores {[s for s, _ in stores]}, "
        f"{machine['cpu_count']} CPUs, {runner.name if runner else '-'}, pinned: {pin}, "
        f"load average {machine['loadavg_at_start']}",
        highlight=False,
    )
    runs: list[dict[str, Any]] = []
    args.output_dir.mkdir(parents=True, exist_ok=True)
    path = args.output_dir / f"{started.strftime('%Y%m%dT%H%M%SZ')}-audit.json"

    def write(complete: bool, error: str | None = None) -> None:
        data = report(args, started, machine, stores, skipped, runs, complete, error)
        path.write_text(json.dumps(data, indent=2) + "\n")

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
            steps = steps_class(progress, steps_per_store(args) * len(stores))
            for store, pg_url in stores:
                runs.append(run_audit_store(args, runner, steps, store, pg_url, pin))
                write(False)
            steps.finish()
    except BaseException as err:
        machine["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        write(False, f"{type(err).__name__}: {err}"[:2000])
        console.print(f"[red]stopped: partial results in {_display(path)}[/red]")
        raise
    finally:
        if runner is not None:
            runner.close()
    machine["loadavg_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    for table in tables(runs):
        console.print(table)
    for run in runs:
        if "http" in run:
            rr = {s: x["round_ratios"] for s, x in run["http"]["scenarios"].items()}
            console.print(
                f"{run['store']} {run['size']:,}: audited/no-op ratio per round {rr}; "
                f"{run['http']['info']['checks']['entries_per_read']} entry per read; seeded "
                f"{run['seed']['resources']:,} resources in {run['seed']['seconds']:.0f} s",
                highlight=False,
            )
    for store, reason in skipped.items():
        console.print(f"[yellow]{store} skipped: {reason}[/yellow]")
    write(True)
    passed = all(r["passed"] for r in runs)
    console.print(
        f"load average at start {machine['loadavg_at_start']}, at end "
        f"{machine['loadavg_at_end']} ({cpus} CPUs)",
        highlight=False,
    )
    console.print(
        f"results written to [bold]{_display(path)}[/bold]; targets (audited read >= "
        f"{AUDIT_RATIO_MIN:.2f} x no-op, verify >= {VERIFY_RATE_MIN:,} entries/s) "
        f"{'met' if passed else 'NOT met'}"
    )
    return 1 if args.strict and not passed else 0
