"""Retention on SQLite and PostgreSQL: `archive.retain` up to a checkpointed multiple of the
Merkle block size exports entries 1..2048 to a file that verifies (with the audit key, and
offline with the public key alone), records itself in the chain, and removes them; the
database trail still verifies, and inclusion and consistency proofs for the entries kept still
come out of AuditLog and verify with the independent RFC 9162 verifier against signed roots.
A retention point that is not a multiple of 1024 or not a checkpoint is refused and removes
nothing; so is retention over a trail that does not verify. Deleting entries by hand, without
the command (even with a forged retention mark), is caught by verify.

The trail: 2600 entries with checkpoints at 1000, 2048 and 2600.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
from pathlib import Path
from typing import Any

import orjson
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import delete, insert, select, text, update
from sqlalchemy.exc import DBAPIError

from carevault.audit import archive
from carevault.audit.entry import AuditEntry, Outcome, format_time
from carevault.audit.events import SecurityEvent
from carevault.audit.log import AuditLog, ProofUnavailable
from carevault.config import Settings
from carevault.crypto.custody import KeyCustody
from carevault.db.engine import create_engine, dispose
from carevault.db.tables import AUDIT_TABLES, audit_blocks, audit_entries, audit_retention
from tests.audit import rfc9162
from tests.audit.conftest import cli_env, owner, run_cli, sql, verify_db

SIZE = 2600
CHECKPOINTS = (1000, 2048, 2600)
UP_TO = 2048


def _entry(i: int) -> AuditEntry:
    return AuditEntry(
        action="fhir.read",
        outcome=Outcome.permit,
        status=200,
        user=f"user-{i % 9}",
        patient=f"pat-{i % 13}",
        resource_type="Observation",
        resource_id=f"obs-{i}",
        version="1",
    )


def _keys(settings: Settings) -> Any:
    return KeyCustody.from_settings(settings).audit_keys()


async def _with_log(settings: Settings, work: Any) -> Any:
    engine = create_engine(settings)
    trail = AuditLog(engine, lambda: _keys(settings))
    try:
        return await work(trail)
    finally:
        await trail.close()
        await dispose(engine)


async def _build(trail: AuditLog) -> None:
    written = 0
    for target in CHECKPOINTS:
        while written < target:
            batch = min(400, target - written)
            await trail.append([_entry(written + k + 1) for k in range(batch)])
            written += batch
        assert (await trail.checkpoint()).size == target


@pytest.fixture
def trail(settings: Settings) -> Settings:
    asyncio.run(_with_log(settings, _build))
    return settings


def _record(settings: Settings) -> Any:
    """What `carevault audit retain` does with the command's own entry: chain it (before any
    row goes) and sign a checkpoint over it."""

    def record(detail: dict[str, Any]) -> None:
        async def work(log: AuditLog) -> None:
            await log.append([SecurityEvent("audit_retention", "success", details=detail).entry()])
            await log.checkpoint()

        asyncio.run(_with_log(settings, work))

    return record


def _count(settings: Settings, where: str = "") -> int:
    return int(sql(settings, f"SELECT count(*) FROM audit_entries {where}")[0][0])


def _dump(settings: Settings) -> dict[str, list[tuple[Any, ...]]]:
    with archive.connect(settings.sqlalchemy_url) as conn:
        return {
            t: sorted(tuple(r) for r in conn.execute(text(f"SELECT * FROM {t}")))
            for t in AUDIT_TABLES
        }


def _leaf(entry: str, mac: bytes) -> bytes:
    """Leaf data of the trail's tree: the canonical entry bytes followed by the chain MAC."""
    return rfc9162.leaf_hash(entry.encode() + bytes(mac))


def _signed_root(settings: Settings, size: int) -> bytes:
    """The root of checkpoint `size`, after checking its Ed25519 signature independently."""
    row = sql(settings, "SELECT root, at, signature FROM audit_checkpoints WHERE size = :s", s=size)
    root, at, signature = bytes(row[0][0]), row[0][1], bytes(row[0][2])
    note = f"carevault audit trail\n{size}\n{base64.b64encode(root).decode()}\n{at}\n".encode()
    jwk = archive.public_jwks(_keys(settings))["keys"][0]
    public = Ed25519PublicKey.from_public_bytes(base64.urlsafe_b64decode(jwk["x"] + "=="))
    try:
        public.verify(signature, note)
    except InvalidSignature:
        pytest.fail(f"checkpoint {size} is not signed by the published audit key")
    return root


def test_retain_exports_removes_and_proofs_still_work(
    trail: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    settings = trail
    rows = sql(settings, "SELECT seq, entry, mac FROM audit_entries ORDER BY seq")
    leaves = [_leaf(r.entry, r.mac) for r in rows]
    assert [r.seq for r in rows] == list(range(1, SIZE + 1))
    for size in CHECKPOINTS:  # the independent tree agrees with every signed root
        assert rfc9162.root_hash(leaves[:size]) == _signed_root(settings, size)

    out = tmp_path / "retained.jsonl"
    with archive.connect(settings.sqlalchemy_url) as conn:
        summary = archive.retain(conn, _keys(settings), UP_TO, out, _record(settings))
    assert (summary["first"], summary["last"], summary["entries"]) == (1, UP_TO, UP_TO)
    assert summary["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()

    # the export: entries 1..2048 exactly, verifying with the key and with the public key alone
    lines = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert [line["seq"] for line in lines if "seq" in line] == list(range(1, UP_TO + 1))
    report = archive.verify_file(out, _keys(settings))
    assert report.ok and report.entries == UP_TO and report.checkpoints == 2, report.problem
    public = archive.keys_of_jwks(archive.public_jwks(_keys(settings)))
    offline = archive.verify_file(out, None, public)
    assert offline.ok and not offline.macs_checked, offline.problem

    # the database: 1..2048 gone, the rest (and the command's own entry) kept, triggers back
    assert _count(settings, f"WHERE seq <= {UP_TO}") == 0
    kept = sql(settings, "SELECT seq, entry, mac FROM audit_entries ORDER BY seq")
    assert [r.seq for r in kept] == list(range(UP_TO + 1, SIZE + 2))
    own = orjson.loads(kept[-1].entry)
    assert own["action"] == "security.audit_retention"
    assert own["detail"]["up_to"] == UP_TO and own["detail"]["export_sha256"] == summary["sha256"]
    mark = sql(settings, "SELECT up_to, export_sha256 FROM audit_retention")
    assert [tuple(m) for m in mark] == [(UP_TO, summary["sha256"])]
    with pytest.raises(DBAPIError):
        sql(settings, f"DELETE FROM audit_entries WHERE seq = {UP_TO + 1}")

    report = verify_db(settings)
    assert report.ok, report.problem
    assert (report.first, report.last) == (UP_TO + 1, SIZE + 1)
    result = run_cli(cli_env(settings), "audit", "verify")
    assert result.exit_code == 0, result.output

    # proofs for the entries kept, from AuditLog, checked independently against signed roots
    leaves.append(_leaf(kept[-1].entry, kept[-1].mac))
    newest = SIZE + 1  # the checkpoint the retention command signed over its own entry
    assert rfc9162.root_hash(leaves) == _signed_root(settings, newest)

    async def proofs(log: AuditLog) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for seq in (UP_TO + 1, UP_TO + 2, 2500, SIZE, newest):
            for size in (SIZE, newest):
                if seq <= size:
                    found[f"incl {seq} {size}"] = await log.inclusion_proof(seq, size)
        found["cons 2048 2600"] = await log.consistency_proof(UP_TO, SIZE)
        found["cons 2600 2601"] = await log.consistency_proof(SIZE, newest)
        for seq in (1, 1000, UP_TO):  # their leaves are gone: no proof, no made-up one
            with pytest.raises(ProofUnavailable):
                await log.inclusion_proof(seq, newest)
        return found

    found = asyncio.run(_with_log(settings, proofs))
    for name, proof in found.items():
        kind, a, b = name.split()
        a, b = int(a), int(b)
        if kind == "incl":
            assert rfc9162.verify_inclusion(
                a - 1, b, leaves[a - 1], proof, _signed_root(settings, b)
            ), name
            assert not rfc9162.verify_inclusion(
                a - 1, b, leaves[a - 2], proof, _signed_root(settings, b)
            ), name
        else:
            assert rfc9162.verify_consistency(
                a, b, _signed_root(settings, a), _signed_root(settings, b), proof
            ), name
            assert proof == rfc9162.consistency_proof(a, leaves[:b]), name

    # the chain goes on after retention
    asyncio.run(_with_log(settings, lambda log: log.append([_entry(i) for i in range(5)])))
    assert verify_db(settings).ok


@pytest.mark.parametrize("up_to", [2000, 1000, 1024, 3072, 4096, 0])
def test_retention_point_must_be_a_checkpointed_block_boundary(
    trail: Settings, tmp_path: Path, up_to: int
) -> None:
    settings = trail
    before = _dump(settings)
    out = tmp_path / "refused.jsonl"
    with archive.connect(settings.sqlalchemy_url) as conn, pytest.raises(archive.ArchiveError):
        archive.retain(conn, _keys(settings), up_to, out, _record(settings))
    assert _dump(settings) == before  # nothing removed, nothing recorded
    assert not out.exists()
    if up_to > 0:
        result = run_cli(
            cli_env(settings), "audit", "retain", "--up-to", str(up_to), "--out", str(out)
        )
        assert result.exit_code == 2, result.output
        assert _dump(settings) == before and not out.exists()


def test_retention_over_a_trail_that_does_not_verify_removes_nothing(
    trail: Settings, tmp_path: Path
) -> None:
    settings = trail
    with owner(settings) as conn:
        conn.execute(update(audit_entries).where(audit_entries.c.seq == 100).values(user_id="x"))
    before = _dump(settings)
    with archive.connect(settings.sqlalchemy_url) as conn, pytest.raises(archive.ArchiveError):
        archive.retain(conn, _keys(settings), UP_TO, tmp_path / "r.jsonl", _record(settings))
    assert _dump(settings) == before


def test_removing_entries_by_hand_is_caught(trail: Settings) -> None:
    settings = trail
    with owner(settings) as conn:
        conn.execute(delete(audit_entries).where(audit_entries.c.seq <= UP_TO))
    report = verify_db(settings)
    assert report.problem is not None and (report.problem.kind, report.problem.seq) == (
        "missing",
        1,
    ), report.problem
    result = run_cli(cli_env(settings), "audit", "verify")
    assert result.exit_code == 1 and "FAILED at seq 1: missing" in result.output, result.output


def test_removing_entries_by_hand_with_a_forged_retention_mark_is_caught(trail: Settings) -> None:
    """The owner also writes the retention mark the command would have written: the trail
    itself has no entry recording a retention, so verify still fails."""
    settings = trail
    with owner(settings) as conn:
        last_mac = conn.execute(
            select(audit_entries.c.mac).where(audit_entries.c.seq == UP_TO)
        ).scalar_one()
        conn.execute(delete(audit_entries).where(audit_entries.c.seq <= UP_TO))
        conn.execute(
            insert(audit_retention).values(
                up_to=UP_TO,
                last_mac=last_mac,
                at=format_time(dt.datetime.now(dt.UTC)),
                export_sha256="0" * 64,
            )
        )
    assert int(sql(settings, "SELECT count(*) FROM audit_entries")[0][0]) == SIZE - UP_TO
    report = verify_db(settings)
    assert report.problem is not None and (report.problem.kind, report.problem.seq) == (
        "missing",
        1,
    ), report.problem
    result = run_cli(cli_env(settings), "audit", "verify")
    assert result.exit_code == 1 and "FAILED at seq 1: missing" in result.output, result.output


def test_a_changed_block_hash_is_caught(trail: Settings) -> None:
    """The stored hash of entries 1..1024 stands in for them in proofs: a forged one is
    caught against the entries while they are held."""
    settings = trail
    with owner(settings) as conn:
        conn.execute(update(audit_blocks).where(audit_blocks.c.block == 0).values(hash=bytes(32)))
    report = verify_db(settings)
    assert report.problem is not None, "a forged block hash went unnoticed"
    assert (report.problem.kind, report.problem.seq) == ("modified", 1), report.problem


@pytest.mark.parametrize("attack", ["block-hash", "retention-mac", "first-kept-entry"])
def test_tampering_after_retention_is_caught(
    trail: Settings, tmp_path: Path, request: pytest.FixtureRequest, attack: str
) -> None:
    """Once entries 1..2048 are gone, what stands in for them (the stored block hashes, the
    retention mark's last MAC) is still bound by the signed checkpoints and the chain."""
    settings = trail
    with archive.connect(settings.sqlalchemy_url) as conn:
        archive.retain(conn, _keys(settings), UP_TO, tmp_path / "r.jsonl", _record(settings))
    assert verify_db(settings).ok
    with owner(settings) as conn:
        if attack == "block-hash":
            conn.execute(
                update(audit_blocks).where(audit_blocks.c.block == 1).values(hash=bytes(32))
            )
        elif attack == "retention-mac":
            conn.execute(update(audit_retention).values(last_mac=bytes(32)))
        else:
            first = conn.execute(
                select(audit_entries.c.entry).where(audit_entries.c.seq == UP_TO + 1)
            ).scalar_one()
            changed = first.replace('"user-', '"user-x')
            assert changed != first
            conn.execute(
                update(audit_entries).where(audit_entries.c.seq == UP_TO + 1).values(entry=changed)
            )
    report = verify_db(settings)
    assert report.problem is not None, attack
    expected = {
        # the tree before 2049 (from the stored block hashes) no longer gives checkpoint 2048
        "block-hash": ("modified", UP_TO),
        "retention-mac": ("modified", UP_TO + 1),  # 2049 no longer chains
        "first-kept-entry": ("modified", UP_TO + 1),
    }[attack]
    assert (report.problem.kind, report.problem.seq) == expected, report.problem
    result = run_cli(cli_env(settings), "audit", "verify")
    assert result.exit_code == 1, result.output


def test_cli_retain_then_verify(
    trail: Settings, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    settings = trail
    out = tmp_path / "cli.jsonl"
    env = cli_env(settings)
    result = run_cli(env, "audit", "retain", "--up-to", str(UP_TO), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert _count(settings, f"WHERE seq <= {UP_TO}") == 0
    assert run_cli(env, "audit", "verify").exit_code == 0
    assert run_cli(env, "audit", "verify", "--file", str(out)).exit_code == 0
    # retaining again, or at the next block without a checkpoint there, is refused
    again = run_cli(env, "audit", "retain", "--up-to", str(UP_TO), "--out", str(tmp_path / "b"))
    assert again.exit_code == 2 and _count(settings) == SIZE - UP_TO + 1
