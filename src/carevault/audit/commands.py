"""`carevault audit ...`: verify, export, checkpoint, retain."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from carevault.audit import archive
from carevault.audit.events import SecurityEvent
from carevault.audit.log import ChainBroken
from carevault.audit.verify import Report
from carevault.config import Settings
from carevault.crypto.custody import AuditKeys, KeyCustody
from carevault.db import migrate

audit_app = typer.Typer(no_args_is_help=True, help="The audit trail: verify, export, retain.")
console = Console()
err_console = Console(stderr=True)


def _settings() -> Settings:
    settings = Settings()
    migrate.upgrade(settings)
    return settings


def _keys(settings: Settings) -> AuditKeys:
    return KeyCustody.from_settings(settings).audit_keys()


def _record(settings: Settings, event: SecurityEvent, alert: dict[str, Any] | None = None) -> None:
    from carevault.runtime import build_services

    async def work() -> None:
        services = build_services(settings)
        try:
            await services.events.record(event)
            if alert is not None:
                await services.alerts.emit(alert)
            with contextlib.suppress(ChainBroken):  # never sign over a broken chain
                await services.audit.checkpoint()
        finally:
            await services.close()

    asyncio.run(work())


@contextmanager
def _progress(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=True,
    ) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


def _show(report: Report, seconds: float) -> None:
    table = Table(title="audit verify")
    table.add_column("check")
    table.add_column("result")
    table.add_row("entries", f"{report.first}..{report.last} ({report.entries} verified)")
    table.add_row("checkpoints", f"{report.checkpoints} signatures and roots verified")
    table.add_row("chain MACs", "verified" if report.macs_checked else "not checked (no audit key)")
    rate = report.entries / seconds if seconds > 0 else 0
    table.add_row("time", f"{seconds:.2f} s ({rate:,.0f} entries/s)")
    if report.problem is None:
        table.add_row("result", "[green]OK[/green]")
    else:
        problem = report.problem
        table.add_row("result", f"[red]FAILED at seq {problem.seq}: {problem.kind}[/red]")
        table.add_row("detail", problem.message)
    console.print(table)


@audit_app.command("verify")
def verify(
    first: Annotated[int | None, typer.Option("--from", min=1, help="First entry.")] = None,
    last: Annotated[int | None, typer.Option("--to", min=1, help="Last entry.")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", exists=True, dir_okay=False, help="An export file.")
    ] = None,
    public_key: Annotated[
        Path | None,
        typer.Option(
            "--public-key",
            exists=True,
            dir_okay=False,
            help="JWKS of the audit key (GET /audit/public-key) for verifying an export "
            "without this server's keys.",
        ),
    ] = None,
    processes: Annotated[
        int | None,
        typer.Option(
            "--processes",
            min=1,
            help="Processes verifying the database in parallel ranges (default: the CPUs "
            "available; 1 for a single pass).",
        ),
    ] = None,
) -> None:
    """Recompute the hash chain and the Merkle roots and check every checkpoint signature.
    Exit 0 only when everything holds; otherwise the first bad sequence number and why."""
    started = time.perf_counter()
    settings: Settings | None = None
    if file is not None:
        trusted = archive.keys_of_jwks(orjson.loads(public_key.read_bytes())) if public_key else {}
        keys = None
        if not trusted:
            settings = _settings()
            keys = _keys(settings)
        try:
            exported = archive.read_export(file)
            count = int(exported.header["last"]) - int(exported.header["first"]) + 1
            with _progress("verifying export", count) as advance:
                report = archive.verify_file(file, keys, trusted, advance)
        except archive.ArchiveError as err:
            raise _fail(str(err)) from None
    else:
        settings = _settings()
        keys = _keys(settings)
        with archive.connect(settings.sqlalchemy_url) as conn:
            held_first, held_last = archive.bounds(conn)
            start = max(first or held_first, held_first)
            end = min(last or held_last, held_last)
            try:
                with _progress("verifying", max(end - start + 1, 0)) as advance:
                    report = archive.verify_database(
                        conn, keys, first, last, advance, processes=processes
                    )
            except archive.ArchiveError as err:
                raise _fail(str(err)) from None
    _show(report, time.perf_counter() - started)
    if report.problem is not None:
        if settings is not None:
            detail = {"seq": report.problem.seq, "kind": report.problem.kind}
            _record(
                settings,
                SecurityEvent("audit_verify_failed", "alert", details=detail),
                {"alert": "audit_verify_failed", **detail},
            )
        raise typer.Exit(1)


@audit_app.command("export")
def export(
    out: Annotated[Path, typer.Option("--out", dir_okay=False, help="The file to write.")],
    first: Annotated[int | None, typer.Option("--from", min=1)] = None,
    last: Annotated[
        int | None, typer.Option("--to", min=1, help="A checkpoint size (default: the newest).")
    ] = None,
) -> None:
    """Write entries, checkpoints and consistency proofs as JSON Lines that verify offline
    (`carevault audit verify --file OUT --public-key JWKS`)."""
    settings = _settings()
    keys = _keys(settings)
    if last is None:
        _record(settings, SecurityEvent("audit_export", "success", details={"stage": "start"}))
    with archive.connect(settings.sqlalchemy_url) as conn:
        try:
            with _progress("exporting", None) as advance:
                summary = archive.export(conn, keys, out, first, last, advance)
        except archive.ArchiveError as err:
            raise _fail(str(err)) from None
    _record(
        settings,
        SecurityEvent(
            "audit_export",
            "success",
            details={k: summary[k] for k in ("first", "last", "entries", "sha256")},
        ),
    )
    console.print_json(data=summary)


@audit_app.command("checkpoint")
def checkpoint() -> None:
    """Sign a checkpoint over every entry now (otherwise every 1,000 entries or 60 s)."""
    settings = _settings()

    async def work() -> dict[str, Any] | None:
        from carevault.runtime import build_services

        services = build_services(settings)
        try:
            signed = await services.audit.checkpoint()
            return signed.document() if signed else None
        finally:
            await services.close()

    try:
        document = asyncio.run(work())
    except ChainBroken as err:
        _fail(
            f"entry {err.seq} does not match its chain MAC: nothing signed; "
            "run `carevault audit verify`"
        )
        raise typer.Exit(1) from None
    if document is None:
        raise _fail("the trail is empty: nothing to sign")
    console.print_json(data=document)


@audit_app.command("retain")
def retain(
    up_to: Annotated[int, typer.Option("--up-to", min=1, help="Last entry to remove.")],
    out: Annotated[Path, typer.Option("--out", dir_okay=False, help="Export written first.")],
) -> None:
    """Retention: verify, export entries up to a checkpoint (a multiple of 1,024), record
    that in the trail, then remove them. Proofs for later entries keep working."""
    settings = _settings()
    keys = _keys(settings)
    with archive.connect(settings.sqlalchemy_url) as conn:
        try:
            with _progress("verifying", up_to) as advance:
                summary = archive.retain(
                    conn,
                    keys,
                    up_to,
                    out,
                    lambda detail: _record(
                        settings, SecurityEvent("audit_retention", "success", details=detail)
                    ),
                    advance,
                )
        except archive.ArchiveError as err:
            raise _fail(str(err)) from None
    console.print_json(data=summary)


def _fail(message: str) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {message}", soft_wrap=True, highlight=False)
    return typer.Exit(2)
