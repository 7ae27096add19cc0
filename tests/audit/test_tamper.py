"""Tampering with the audit trail as the database owner could (append-only triggers dropped,
rows changed by hand) is caught by `carevault audit verify` with the right kind and the right
sequence number, on SQLite and on PostgreSQL; with the triggers in place nothing can be changed
at all; an export verifies offline with the public key alone and a changed line is caught.

The trail: 320 entries appended in batches, checkpoints signed at 100, 200 and 300 (entries
301..320 come after the last checkpoint).
"""

from __future__ import annotations

import base64
import datetime as dt
import os
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import psycopg
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import Connection, delete, insert, select, text, update
from sqlalchemy.exc import DBAPIError

from carevault.audit import archive
from carevault.audit.entry import AuditEntry, Outcome, format_time
from carevault.audit.log import AuditLog, checkpoint_note
from carevault.config import Settings
from carevault.crypto.custody import KeyCustody
from carevault.db.engine import create_engine, dispose
from carevault.db.tables import (
    AUDIT_TABLES,
    audit_blocks,
    audit_checkpoints,
    audit_entries,
    audit_retention,
)
from tests.audit.conftest import cli_env, owner, run_cli, sql, verify_db, write_jwks
from tests.conftest import PG_URL, make_settings

SIZE = 320
CHECKPOINTS = (100, 200, 300)
BATCHES = (1, 9, 40, 50, 100, 37, 63, 20)  # sums to 320; checkpoints fall on batch edges
assert sum(BATCHES) == SIZE


def _entry(i: int) -> AuditEntry:
    return AuditEntry(
        action=("fhir.read", "fhir.search", "security.login")[i % 3],
        outcome=Outcome.deny if i % 11 == 0 else Outcome.permit,
        status=404 if i % 11 == 0 else 200,
        user=f"user-{i % 5}",
        client="carevault-web",
        roles=("physician",),
        patient=f"pat-{i % 7}" if i % 3 != 2 else None,
        resource_type="Observation" if i % 3 == 0 else None,
        resource_id=f"obs-{i}" if i % 3 == 0 else None,
        version="1" if i % 3 == 0 else None,
        purpose="TREAT",
        break_glass=i % 50 == 0,
        request_id=f"00000000-0000-4000-8000-{i:012d}",
    )


async def _build_trail(settings: Settings) -> None:
    engine = create_engine(settings)
    trail = AuditLog(engine, KeyCustody.from_settings(settings).audit_keys)
    try:
        written = 0
        for batch in BATCHES:
            await trail.append([_entry(written + k + 1) for k in range(batch)])
            written += batch
            if written in CHECKPOINTS:
                assert (await trail.checkpoint()).size == written
        assert await trail.size() == SIZE
    finally:
        await trail.close()
        await dispose(engine)


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One trail per store for the whole module (building a data directory, keys and a
    migrated schema costs far more than the attacks); `trail` puts its rows back per test."""
    made: dict[str, Any] = {}
    schemas: list[str] = []

    def settings_for(store: str) -> Settings:
        url = None
        if store == "postgresql":
            assert PG_URL
            name = f"cv_{uuid.uuid4().hex[:16]}"
            with psycopg.connect(PG_URL, autocommit=True) as conn:
                conn.execute(f'CREATE SCHEMA "{name}"')  # our name, not input
            schemas.append(name)
            url = f"{PG_URL}?options=-csearch_path%3D{name}"
        return make_settings(tmp_path_factory.mktemp(f"trail-{store}"), url)

    made["settings_for"] = settings_for
    yield made
    if schemas:
        with psycopg.connect(PG_URL, autocommit=True) as conn:
            for name in schemas:
                conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')


def _snapshot(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    with archive.connect(settings.sqlalchemy_url) as conn:
        return {
            table.name: [dict(r._mapping) for r in conn.execute(select(table))]
            for table in (audit_entries, audit_checkpoints, audit_blocks, audit_retention)
        }


def _restore(settings: Settings, snapshot: dict[str, list[dict[str, Any]]]) -> None:
    with owner(settings) as conn:
        for table in (audit_entries, audit_checkpoints, audit_blocks, audit_retention):
            conn.execute(delete(table))
            if snapshot[table.name]:
                conn.execute(insert(table), snapshot[table.name])


@pytest.fixture
async def trail(store: str, templates: dict[str, Any]) -> Settings:
    if store not in templates:
        settings = templates["settings_for"](store)
        await _build_trail(settings)
        templates[store] = (settings, _snapshot(settings))
    settings, snapshot = templates[store]
    _restore(settings, snapshot)
    return settings  # type: ignore[no-any-return]


# --- helpers: reading and changing rows as the owner ------------------------------------------


def _row(conn: Connection, seq: int) -> Any:
    return conn.execute(select(audit_entries).where(audit_entries.c.seq == seq)).one()


def _document(conn: Connection, seq: int) -> dict[str, Any]:
    return orjson.loads(_row(conn, seq).entry)


def _set_document(conn: Connection, seq: int, document: dict[str, Any], **columns: Any) -> None:
    conn.execute(
        update(audit_entries)
        .where(audit_entries.c.seq == seq)
        .values(entry=orjson.dumps(document, option=orjson.OPT_SORT_KEYS).decode(), **columns)
    )


def _move(conn: Connection, src: int, dst: int) -> None:
    conn.execute(update(audit_entries).where(audit_entries.c.seq == src).values(seq=dst))


def _shift_up_from(conn: Connection, first: int) -> None:
    """seq += 1 for every row from `first` on (via negative numbers: no key collisions)."""
    conn.execute(
        update(audit_entries)
        .where(audit_entries.c.seq >= first)
        .values(seq=-(audit_entries.c.seq + 1))
    )
    conn.execute(
        update(audit_entries).where(audit_entries.c.seq < 0).values(seq=-audit_entries.c.seq)
    )


def _forged_row(conn: Connection, seq: int, like: int) -> dict[str, Any]:
    """A row for `seq` that looks like entry `like` (columns consistent with its JSON, a fresh
    request id, another user), with a MAC the forger had to make up."""
    document = _document(conn, like)
    document.update(seq=seq, user="user-forged", request_id="11111111-2222-4333-8444-555555555555")
    source = _row(conn, like)
    return {
        "seq": seq,
        "at": document["at"],
        "action": document["action"],
        "outcome": document["outcome"],
        "user_id": "user-forged",
        "patient_id": document.get("patient"),
        "break_glass": bool(document.get("break_glass")),
        "entry": orjson.dumps(document, option=orjson.OPT_SORT_KEYS).decode(),
        "mac": bytes(reversed(source.mac)),
    }


def _checkpoint(conn: Connection, size: int) -> Any:
    return conn.execute(select(audit_checkpoints).where(audit_checkpoints.c.size == size)).one()


# --- the attacks --------------------------------------------------------------------------------


def modify_json_and_column(conn: Connection) -> None:
    document = _document(conn, 150)
    document["user"] = "user-mallory"
    _set_document(conn, 150, document, user_id="user-mallory")


def modify_json_only(conn: Connection) -> None:
    document = _document(conn, 150)
    assert document["type"] == "Observation"
    document["id"] = "obs-other"  # a field no column repeats
    _set_document(conn, 150, document)


def modify_outcome(conn: Connection) -> None:
    document = _document(conn, 143)
    assert document["outcome"] == "deny"
    document["outcome"], document["status"] = "permit", 200
    _set_document(conn, 143, document, outcome="permit")


def modify_patient_column_only(conn: Connection) -> None:
    assert _row(conn, 150).patient_id is not None
    conn.execute(
        update(audit_entries).where(audit_entries.c.seq == 150).values(patient_id="pat-other")
    )


def modify_break_glass_column_only(conn: Connection) -> None:
    assert _row(conn, 150).break_glass is True
    conn.execute(update(audit_entries).where(audit_entries.c.seq == 150).values(break_glass=False))


def _column_only(column: str, value: Any) -> Callable[[Connection], None]:
    def attack(conn: Connection) -> None:
        assert getattr(_row(conn, 150), column) != value
        conn.execute(
            update(audit_entries).where(audit_entries.c.seq == 150).values(**{column: value})
        )

    return attack


def modify_mac_only(conn: Connection) -> None:
    mac = _row(conn, 150).mac
    conn.execute(
        update(audit_entries).where(audit_entries.c.seq == 150).values(mac=bytes(reversed(mac)))
    )


def delete_one(conn: Connection) -> None:
    conn.execute(delete(audit_entries).where(audit_entries.c.seq == 150))


def delete_first(conn: Connection) -> None:
    conn.execute(delete(audit_entries).where(audit_entries.c.seq == 1))


def insert_forged(conn: Connection) -> None:
    forged = _forged_row(conn, 150, like=150)
    _shift_up_from(conn, 150)
    conn.execute(insert(audit_entries).values(**forged))


def insert_forged_at_tail(conn: Connection) -> None:
    conn.execute(insert(audit_entries).values(**_forged_row(conn, SIZE + 1, like=SIZE)))


def swap_two(conn: Connection) -> None:
    _move(conn, 120, -1)
    _move(conn, 180, 120)
    _move(conn, -1, 180)


def swap_neighbours(conn: Connection) -> None:
    _move(conn, 150, -1)
    _move(conn, 151, 150)
    _move(conn, -1, 151)


def truncate_tail(conn: Connection) -> None:
    conn.execute(delete(audit_entries).where(audit_entries.c.seq > 250))


def truncate_everything(conn: Connection) -> None:
    conn.execute(delete(audit_entries))


def replace_signature(conn: Connection) -> None:
    conn.execute(
        update(audit_checkpoints)
        .where(audit_checkpoints.c.size == 200)
        .values(signature=os.urandom(64))
    )


def replace_root(conn: Connection) -> None:
    conn.execute(
        update(audit_checkpoints).where(audit_checkpoints.c.size == 200).values(root=os.urandom(32))
    )


def resign_with_own_key(conn: Connection) -> None:
    """A new root signed with the attacker's key under the trail's key id."""
    row = _checkpoint(conn, 200)
    root = os.urandom(32)
    signature = Ed25519PrivateKey.generate().sign(checkpoint_note(200, root, row.at))
    conn.execute(
        update(audit_checkpoints)
        .where(audit_checkpoints.c.size == 200)
        .values(root=root, signature=signature)
    )


def forge_checkpoint(conn: Connection) -> None:
    row = _checkpoint(conn, 200)
    conn.execute(
        insert(audit_checkpoints).values(
            size=250, root=os.urandom(32), at=row.at, key_id=row.key_id, signature=os.urandom(64)
        )
    )


ATTACKS: dict[str, tuple[Callable[[Connection], None], tuple[str, ...], int]] = {
    # name: (attack, acceptable kinds, the sequence number verify must name)
    "modify-json-and-column": (modify_json_and_column, ("modified",), 150),
    "modify-json-only": (modify_json_only, ("modified",), 150),
    "modify-outcome": (modify_outcome, ("modified",), 143),
    "modify-patient-column-only": (modify_patient_column_only, ("modified",), 150),
    "modify-break-glass-column-only": (modify_break_glass_column_only, ("modified",), 150),
    "modify-user-column-only": (_column_only("user_id", "user-1"), ("modified",), 150),
    "modify-action-column-only": (_column_only("action", "fhir.search"), ("modified",), 150),
    "modify-outcome-column-only": (_column_only("outcome", "error"), ("modified",), 150),
    "modify-at-column-only": (
        _column_only("at", "2001-01-01T00:00:00.000000Z"),
        ("modified",),
        150,
    ),
    "modify-mac-only": (modify_mac_only, ("modified",), 150),
    "delete-one": (delete_one, ("missing",), 150),
    "delete-first": (delete_first, ("missing",), 1),
    "insert-forged": (insert_forged, ("inserted",), 150),
    # nothing chains after a forged last row: "inserted" or "modified" both name it
    "insert-forged-at-tail": (insert_forged_at_tail, ("inserted", "modified"), SIZE + 1),
    "swap-two": (swap_two, ("reordered",), 120),
    "swap-neighbours": (swap_neighbours, ("reordered",), 150),
    "truncate-tail": (truncate_tail, ("truncated",), 251),
    "truncate-everything": (truncate_everything, ("truncated", "missing"), 1),
    "replace-signature": (replace_signature, ("bad-signature",), 200),
    "replace-root": (replace_root, ("bad-signature",), 200),
    "resign-with-own-key": (resign_with_own_key, ("bad-signature",), 200),
    "forge-checkpoint": (forge_checkpoint, ("bad-signature",), 250),
}


def _failed_at(output: str) -> tuple[int, str] | None:
    found = re.search(r"FAILED at seq (\d+): ([a-z-]+)", output)
    return (int(found.group(1)), found.group(2)) if found else None


@pytest.mark.parametrize("name", list(ATTACKS))
def test_tampering_is_caught_with_kind_and_seq(trail: Settings, name: str) -> None:
    attack, kinds, seq = ATTACKS[name]
    assert verify_db(trail).ok
    with owner(trail) as conn:
        attack(conn)

    report = verify_db(trail)
    assert report.problem is not None, f"{name}: verify_database found nothing"
    assert report.problem.kind in kinds, report.problem
    assert report.problem.seq == seq, report.problem

    result = run_cli(cli_env(trail), "audit", "verify")
    assert result.exit_code == 1, result.output
    assert _failed_at(result.output) == (seq, report.problem.kind), result.output
    # the failure is itself recorded, as an alert, in the trail it could not trust
    alerts = sql(
        trail, "SELECT entry FROM audit_entries WHERE action = 'security.audit_verify_failed'"
    )
    assert [orjson.loads(a.entry)["detail"]["seq"] for a in alerts] == [seq]


def test_untampered_trail_verifies(trail: Settings) -> None:
    report = verify_db(trail)
    assert report.ok, report.problem
    assert (report.first, report.last, report.entries) == (1, SIZE, SIZE)
    assert report.checkpoints == len(CHECKPOINTS) and report.macs_checked
    result = run_cli(cli_env(trail), "audit", "verify")
    assert result.exit_code == 0, result.output
    assert "OK" in result.output and "FAILED" not in result.output


def test_range_verify_names_the_seq_and_skips_untouched_ranges(trail: Settings) -> None:
    with owner(trail) as conn:
        modify_json_and_column(conn)
    env = cli_env(trail)
    inside = run_cli(env, "audit", "verify", "--from", "101", "--to", "200")
    assert inside.exit_code == 1 and _failed_at(inside.output) == (150, "modified"), inside.output
    before = run_cli(env, "audit", "verify", "--to", "149")
    assert before.exit_code == 0, before.output
    assert run_cli(env, "audit", "verify", "--from", "0").exit_code == 2  # usage error


# --- the triggers -----------------------------------------------------------------------------


def _dump(settings: Settings) -> dict[str, list[tuple[Any, ...]]]:
    with archive.connect(settings.sqlalchemy_url) as conn:
        return {
            table: sorted(tuple(r) for r in conn.execute(text(f"SELECT * FROM {table}")))
            for table in AUDIT_TABLES
        }


async def test_triggers_refuse_update_and_delete(trail: Settings) -> None:
    # a block hash and a retention mark exist only on a longer trail; give each table a row
    with owner(trail) as conn:
        conn.execute(text("INSERT INTO audit_blocks (block, hash) VALUES (99, :h)"), {"h": b"x"})
        conn.execute(
            text(
                "INSERT INTO audit_retention (up_to, last_mac, at, export_sha256) "
                "VALUES (0, :m, :at, :d)"
            ),
            {"m": b"m", "at": format_time(dt.datetime.now(dt.UTC)), "d": "0" * 64},
        )
    before = _dump(trail)
    attempts = [
        "UPDATE audit_entries SET user_id = 'user-mallory' WHERE seq = 150",
        "UPDATE audit_entries SET entry = replace(entry, 'user-0', 'user-9')",
        "UPDATE audit_entries SET seq = seq + 1000 WHERE seq = 320",
        "DELETE FROM audit_entries WHERE seq = 150",
        "DELETE FROM audit_entries",
        "UPDATE audit_checkpoints SET signature = root WHERE size = 200",
        "DELETE FROM audit_checkpoints WHERE size = 300",
        "DELETE FROM audit_checkpoints",
        "UPDATE audit_blocks SET hash = :x",
        "DELETE FROM audit_blocks",
        "UPDATE audit_retention SET up_to = 5",
        "DELETE FROM audit_retention",
    ]
    if trail.database_url:
        attempts += [f"TRUNCATE {table}" for table in AUDIT_TABLES]
    for statement in attempts:
        with pytest.raises(DBAPIError) as refused:
            sql(trail, statement, x=b"y")
        assert "append-only" in str(refused.value), statement
    assert _dump(trail) == before
    with owner(trail) as conn:  # remove the placeholders added above
        conn.execute(text("DELETE FROM audit_blocks"))
        conn.execute(text("DELETE FROM audit_retention"))
    assert verify_db(trail).ok


# --- export, verified offline -------------------------------------------------------------------


def _lines(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def _write_lines(path: Path, lines: list[dict[str, Any]]) -> None:
    path.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in lines))


def _offline_env(tmp_path: Path) -> dict[str, str | None]:
    """No data directory with keys, no database: only what the auditor was handed."""
    return {
        "CAREVAULT_DATA_DIR": str(tmp_path / "auditor-has-nothing"),
        "CAREVAULT_DATABASE_URL": None,
    }


def test_export_verifies_offline_with_the_public_key_and_changes_are_caught(
    trail: Settings, tmp_path: Path
) -> None:
    out = tmp_path / "trail.jsonl"
    exported = run_cli(cli_env(trail), "audit", "export", "--out", str(out))
    assert exported.exit_code == 0, exported.output
    lines = _lines(out)
    entries = [line for line in lines if "seq" in line]
    signed = [line["checkpoint"]["size"] for line in lines if "checkpoint" in line]
    # the export command records its start (and signs over it) before it reads the trail
    assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
    assert len(entries) > SIZE and signed[: len(CHECKPOINTS)] == list(CHECKPOINTS)
    assert signed[-1] == len(entries)
    assert sum(1 for line in lines if "consistency" in line) == len(signed) - 1

    jwks = write_jwks(trail, tmp_path / "audit-public.jwks")
    offline = _offline_env(tmp_path)
    ok = run_cli(offline, "audit", "verify", "--file", str(out), "--public-key", str(jwks))
    assert ok.exit_code == 0, ok.output
    assert "OK" in ok.output and "not checked" in ok.output  # no audit key: MACs not checked
    assert not (tmp_path / "auditor-has-nothing").exists()  # it never looked for keys
    report = archive.verify_file(out, None, archive.keys_of_jwks(orjson.loads(jwks.read_bytes())))
    assert report.ok and report.entries == len(entries) and report.checkpoints == len(signed)

    # one field of one line changed: with the public key alone, caught at the next checkpoint;
    # with the audit key (the server's own verify), at the line itself
    changed = [dict(line) for line in lines]
    index = next(i for i, line in enumerate(changed) if line.get("seq") == 150)
    changed[index] = {**changed[index], "entry": {**changed[index]["entry"], "user": "user-x"}}
    tampered = tmp_path / "tampered.jsonl"
    _write_lines(tampered, changed)
    result = run_cli(offline, "audit", "verify", "--file", str(tampered), "--public-key", str(jwks))
    assert result.exit_code == 1, result.output
    assert _failed_at(result.output) == (200, "modified"), result.output
    with_key = run_cli(cli_env(trail), "audit", "verify", "--file", str(tampered))
    assert with_key.exit_code == 1 and _failed_at(with_key.output) == (150, "modified")

    # a line removed
    dropped = tmp_path / "dropped.jsonl"
    _write_lines(dropped, lines[:index] + lines[index + 1 :])
    result = run_cli(offline, "audit", "verify", "--file", str(dropped), "--public-key", str(jwks))
    assert result.exit_code == 1 and _failed_at(result.output) == (150, "missing"), result.output

    # a checkpoint root changed
    rooted = [dict(line) for line in lines]
    at = next(i for i, line in enumerate(rooted) if line.get("checkpoint", {}).get("size") == 200)
    rooted[at] = {
        "checkpoint": {**rooted[at]["checkpoint"], "root": base64.b64encode(b"r" * 32).decode()}
    }
    bad_root = tmp_path / "root.jsonl"
    _write_lines(bad_root, rooted)
    result = run_cli(offline, "audit", "verify", "--file", str(bad_root), "--public-key", str(jwks))
    assert result.exit_code == 1 and _failed_at(result.output) == (200, "bad-signature")


def test_export_resigned_by_someone_else_is_not_trusted(trail: Settings, tmp_path: Path) -> None:
    """A forger who rewrites entries and re-signs every checkpoint with their own key (and
    puts that key in the file's header) fails against the auditor's copy of the real key."""
    out = tmp_path / "trail.jsonl"
    assert run_cli(cli_env(trail), "audit", "export", "--out", str(out)).exit_code == 0
    lines = _lines(out)
    # the forger: entry 150 changed, roots recomputed and re-signed with their own key
    from carevault.audit import merkle
    from carevault.audit.entry import canonical

    forger = Ed25519PrivateKey.generate()
    leaves = []
    for line in lines:
        if "seq" in line:
            if line["seq"] == 150:
                line["entry"] = {**line["entry"], "user": "user-x"}
            leaves.append(merkle.leaf_hash(canonical(line["entry"]) + bytes.fromhex(line["mac"])))
        elif "checkpoint" in line:
            c = line["checkpoint"]
            root = merkle.root_of(leaves[: c["size"]])
            c["root"] = base64.b64encode(root).decode()
            c["signature"] = base64.b64encode(
                forger.sign(checkpoint_note(c["size"], root, c["timestamp"]))
            ).decode()
    from cryptography.hazmat.primitives import serialization
    from joserfc.jwk import OKPKey

    pem = forger.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    forged_jwk = OKPKey.import_key(pem).as_dict()
    real_kid = lines[0]["keys"]["keys"][0]["kid"]
    forged_jwk.update(kid=real_kid, use="sig", alg="EdDSA")
    lines[0]["keys"] = {"keys": [forged_jwk]}
    lines = [line for line in lines if "consistency" not in line]
    forged = tmp_path / "forged.jsonl"
    _write_lines(forged, lines)

    # the forger's own key would accept it: the file is self-consistent
    forged_jwks = tmp_path / "forged.jwks"
    forged_jwks.write_bytes(orjson.dumps({"keys": [forged_jwk]}))
    offline = _offline_env(tmp_path)
    fooled = run_cli(
        offline, "audit", "verify", "--file", str(forged), "--public-key", str(forged_jwks)
    )
    assert fooled.exit_code == 0, fooled.output
    # the auditor's copy of the real key does not
    jwks = write_jwks(trail, tmp_path / "audit-public.jwks")
    result = run_cli(offline, "audit", "verify", "--file", str(forged), "--public-key", str(jwks))
    assert result.exit_code == 1 and _failed_at(result.output) == (100, "bad-signature"), (
        result.output
    )
    # and the file's own keys are never trusted on their own
    with pytest.raises(archive.ArchiveError):
        archive.verify_file(forged, None, {})


async def test_a_change_in_the_unsigned_tail_is_not_signed_over(
    trail: Settings, tmp_path: Path
) -> None:
    """Entries 301..320 are not under a checkpoint yet. If the owner changes one there, the
    next checkpoint (signed automatically every 1000 entries or 60 s) must not bless it: an
    auditor holding only the public key would otherwise accept the changed entry."""
    with owner(trail) as conn:
        document = _document(conn, 310)
        document["user"] = "user-mallory"
        _set_document(conn, 310, document, user_id="user-mallory")
    engine = create_engine(trail)
    try:
        log = AuditLog(engine, KeyCustody.from_settings(trail).audit_keys)
        try:
            await log.checkpoint()
        except Exception:  # noqa: BLE001, S110 - refusing to sign is one right answer
            pass
    finally:
        await dispose(engine)
    problem = verify_db(trail).problem  # with the audit key: the MAC gives it away
    assert problem is not None and (problem.kind, problem.seq) == ("modified", 310)
    signed = [r[0] for r in sql(trail, "SELECT size FROM audit_checkpoints ORDER BY size")]
    if max(signed) < 310:
        return  # nothing signed over the change: fine
    out = tmp_path / "export.jsonl"
    with archive.connect(trail.sqlalchemy_url) as conn:
        keys = KeyCustody.from_settings(trail).audit_keys()
        archive.export(conn, keys, out)
        public = archive.keys_of_jwks(archive.public_jwks(keys))
    report = archive.verify_file(out, None, public)
    assert not report.ok, "a changed entry is now under a valid signature: the auditor accepts it"
