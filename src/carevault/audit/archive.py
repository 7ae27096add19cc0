"""The audit trail outside the server: verifying the database, exporting to a file that
verifies offline, verifying such a file, and retention (export, then remove a checkpointed
range).

These run in the CLI with a synchronous connection: verification streams every row once, and
the per-row cost of the async driver would be most of the time.

Export format (JSON Lines, one object per line):
1. `{"format": "carevault-audit-export/1", "origin", "first", "last", "keys": JWKS,
   "start": {"previous_mac": hex, "peaks": [base64...]}}`: the chain MAC before `first` and
   the compact range of the Merkle tree over entries 1..first-1;
2. `{"seq", "entry": {...}, "mac": hex}` for each entry, in order;
3. `{"checkpoint": {...}}` for each checkpoint within [first - 1, last];
4. `{"consistency": {"from", "to", "proof": [base64...]}}` between consecutive checkpoints.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from joserfc.jwk import OKPKey
from sqlalchemy import Connection, create_engine, insert, pool, select

from carevault.audit import merkle, parallel
from carevault.audit.entry import GENESIS_MAC, canonical, format_time
from carevault.audit.log import ORIGIN, Checkpoint
from carevault.audit.verify import Problem, Report, Row, Start, Verifier
from carevault.crypto.custody import AuditKeys
from carevault.db import append_only
from carevault.db.engine import sync_url
from carevault.db.tables import audit_blocks, audit_checkpoints, audit_entries, audit_retention

FORMAT = "carevault-audit-export/1"
_FETCH = 5000
Progress = Callable[[int], None]  # called with the number of entries just verified


class ArchiveError(Exception):
    """A request the trail cannot satisfy (bad range, unreadable file). Generic messages."""


@contextmanager
def connect(database_url: str) -> Iterator[Connection]:
    engine = create_engine(sync_url(database_url), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def public_jwks(keys: AuditKeys) -> dict[str, Any]:
    """The checkpoint signing key as a JWK Set (`GET /audit/public-key`, export headers): one
    OKP (Ed25519) key for EdDSA."""
    pem = Ed25519PublicKey.from_public_bytes(keys.public_key).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    jwk = OKPKey.import_key(pem, {"kid": keys.key_id, "use": "sig", "alg": "EdDSA"})
    return {"keys": [jwk.as_dict(private=False)]}


def keys_of_jwks(jwks: dict[str, Any]) -> dict[str, bytes]:
    found = {}
    for jwk in jwks.get("keys", []):
        if jwk.get("kty") == "OKP" and jwk.get("crv") == "Ed25519" and "kid" in jwk:
            key = OKPKey.import_key(jwk)
            raw = key.public_key.public_bytes(
                serialization.Encoding.Raw, serialization.PublicFormat.Raw
            )
            found[jwk["kid"]] = raw
    return found


# -- the database ---------------------------------------------------------------------------


def bounds(conn: Connection) -> tuple[int, int]:
    """(first, last) sequence numbers held; last is 0 for an empty trail."""
    row = conn.execute(select(audit_entries.c.seq).order_by(audit_entries.c.seq).limit(1)).first()
    top = conn.execute(
        select(audit_entries.c.seq).order_by(audit_entries.c.seq.desc()).limit(1)
    ).first()
    retained = conn.execute(
        select(audit_retention.c.up_to).order_by(audit_retention.c.up_to.desc()).limit(1)
    ).scalar()
    first = (retained or 0) + 1
    if row is not None:
        first = min(first, row.seq)
    return first, top.seq if top else (retained or 0)


def checkpoints(conn: Connection) -> list[Checkpoint]:
    rows = conn.execute(select(audit_checkpoints).order_by(audit_checkpoints.c.size)).all()
    return [Checkpoint(r.size, r.root, r.at, r.key_id, r.signature) for r in rows]


def blocks(conn: Connection) -> dict[int, bytes]:
    return {r.block: r.hash for r in conn.execute(select(audit_blocks)).all()}


_ROW_COLUMNS = "seq, entry, mac, at, action, outcome, user_id, patient_id, break_glass"


def rows(conn: Connection, first: int, last: int | None) -> Iterator[Row]:
    """Entries first..last in order, straight from the driver's cursor: verification reads
    every row once, and a SQLAlchemy result row costs about as much as verifying it. On
    PostgreSQL a named (server-side) cursor streams them; SQLite's cursor does by itself."""
    dbapi = conn.connection.dbapi_connection
    postgresql = conn.dialect.name == "postgresql"
    mark = "%s" if postgresql else "?"
    sql = f"SELECT {_ROW_COLUMNS} FROM audit_entries WHERE seq >= {mark}"  # noqa: S608
    params: tuple[int, ...] = (first,)
    if last is not None:
        sql += f" AND seq <= {mark}"
        params += (last,)
    sql += " ORDER BY seq"
    cursor = dbapi.cursor(name="carevault_audit_rows") if postgresql else dbapi.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute(sql, params)
        while batch := cursor.fetchmany(_FETCH):
            for seq, entry, mac, *columns in batch:
                yield seq, entry, bytes(mac), tuple(columns)
    finally:
        cursor.close()


def start_at(conn: Connection, first: int, block_hashes: dict[int, bytes]) -> Start:
    """The chain MAC and Merkle compact range just before entry `first`, from the database
    (the MAC of entry first-1, or a retention mark; the tree from stored blocks and leaves).
    They are not trusted: a wrong one fails at the first MAC or the next checkpoint."""
    if first <= 1:
        return Start()
    previous = conn.execute(
        select(audit_entries.c.mac).where(audit_entries.c.seq == first - 1)
    ).scalar()
    if previous is None:
        previous = conn.execute(
            select(audit_retention.c.last_mac).where(audit_retention.c.up_to == first - 1)
        ).scalar()
    if previous is None:
        raise ArchiveError(f"entry {first - 1} is not held: start at a retained boundary")
    size = first - 1
    peaks = []
    lo = 0
    for bit in reversed(range(size.bit_length())):
        width = 1 << bit
        if size & width:
            peaks.append(_subtree(conn, lo, lo + width, block_hashes))
            lo += width
    return Start(first, previous, tuple(peaks))


def _subtree(conn: Connection, lo: int, hi: int, block_hashes: dict[int, bytes]) -> bytes:
    leaves: dict[int, bytes] = {}
    if hi - lo < merkle.BLOCK or hi % merkle.BLOCK:
        block_lo = (hi - 1) // merkle.BLOCK * merkle.BLOCK
        for r in conn.execute(
            select(audit_entries.c.seq, audit_entries.c.entry, audit_entries.c.mac).where(
                audit_entries.c.seq > max(lo, block_lo), audit_entries.c.seq <= hi
            )
        ):
            leaves[r.seq - 1] = merkle.leaf_hash(r.entry.encode() + r.mac)
    try:
        return merkle.range_hash(lo, hi, leaves.__getitem__, block_hashes.get)
    except KeyError:
        raise ArchiveError("the entries before the start are not held") from None


def verify_database(
    conn: Connection,
    keys: AuditKeys | None,
    first: int | None = None,
    last: int | None = None,
    progress: Progress | None = None,
    *,
    processes: int | None = None,
    min_range: int = parallel.MIN_RANGE,
) -> Report:
    """Verify entries first..last (default: all held). A long trail is verified in
    block-aligned ranges on `processes` processes (default: the CPUs this process may use),
    with the same verdict as one pass (see `parallel`)."""
    held_first, held_last = bounds(conn)
    first = max(first or held_first, held_first)
    whole = last is None or last >= held_last
    block_hashes = blocks(conn)
    signed = checkpoints(conn)
    ranges = parallel.split(
        first,
        held_last if whole else last,  # type: ignore[arg-type]
        parallel.default_processes() if processes is None else processes,
        min_range,
        whole=whole,
    )
    done: Report | None = None  # what ranges verified in parallel before `first`
    if len(ranges) > 1:
        url = conn.engine.url.render_as_string(hide_password=False)
        done, first_bad = parallel.verify_ranges(url, keys, ranges, signed, block_hashes, progress)
        if first_bad is None:
            return _retention_checked(conn, held_first, done)
        first, progress = first_bad, None  # one pass from there names the first problem
        signed = [c for c in signed if c.size >= first]  # the earlier ones were checked
    verifier = Verifier(
        keys.mac if keys else None,
        {keys.key_id: keys.public_key} if keys else {},
        signed,
        start_at(conn, first, block_hashes),
        block_hashes,
    )
    _run(verifier, rows(conn, first, last), progress)
    report = verifier.finish(whole=whole)
    if done is not None:
        report.first = done.first
        report.last = report.last or done.last
        report.entries += done.entries
        report.checkpoints += done.checkpoints
    return _retention_checked(conn, held_first, report)


def _retention_checked(conn: Connection, held_first: int, report: Report) -> Report:
    if report.first == held_first and held_first > 1 and report.ok:
        _check_retention_recorded(conn, held_first - 1, report)
    return report


def _check_retention_recorded(conn: Connection, up_to: int, report: Report) -> None:
    """Entries 1..up_to were removed by retention: the trail must say so itself (an entry
    chained after them), or the removal was not the audited command."""
    for r in conn.execute(
        select(audit_entries.c.entry).where(audit_entries.c.action == "security.audit_retention")
    ):
        if orjson.loads(r.entry).get("detail", {}).get("up_to") == up_to:
            return
    report.problem = Problem(
        1, "missing", f"entries 1..{up_to} are gone without a retention record"
    )


def _run(verifier: Verifier, source: Iterator[Row], progress: Progress | None) -> None:
    done = 0
    for _ in verifier.feed(source):
        done += 1
        if progress is not None and done == 1000:
            progress(done)
            done = 0
    if progress is not None and done:
        progress(done)


# -- export files ---------------------------------------------------------------------------


def export(
    conn: Connection,
    keys: AuditKeys,
    path: Path,
    first: int | None = None,
    last: int | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write entries first..last with their checkpoints and proofs; `last` must be a
    checkpoint size (the newest by default), so that every exported entry is signed for."""
    held_first, _ = bounds(conn)
    first = max(first or held_first, held_first)
    signed = checkpoints(conn)
    if last is None:
        if not signed:
            raise ArchiveError("no checkpoint yet: nothing is signed to export")
        last = signed[-1].size
    if last not in {c.size for c in signed} or last < first:
        raise ArchiveError("--to must be a checkpoint size at or after --from")
    block_hashes = blocks(conn)
    start = start_at(conn, first, block_hashes)
    within = [c for c in signed if first - 1 <= c.size <= last]
    digest = hashlib.sha256()
    with path.open("wb") as out:

        def line(obj: dict[str, Any]) -> None:
            data = orjson.dumps(obj) + b"\n"
            digest.update(data)
            out.write(data)

        line(
            {
                "format": FORMAT,
                "origin": ORIGIN,
                "first": first,
                "last": last,
                "keys": public_jwks(keys),
                "start": {
                    "previous_mac": start.previous_mac.hex(),
                    "peaks": [base64.b64encode(p).decode() for p in start.peaks],
                },
            }
        )
        count = 0
        for seq, entry, mac, _ in rows(conn, first, last):
            line({"seq": seq, "entry": orjson.loads(entry), "mac": mac.hex()})
            count += 1
            if progress is not None and count % 1000 == 0:
                progress(1000)
        if progress is not None and count % 1000:
            progress(count % 1000)
        for checkpoint in within:
            line({"checkpoint": checkpoint.document()})
        leaves_cache: dict[int, bytes] = {}
        for a, b in zip(within, within[1:], strict=False):
            proof = _consistency(conn, a.size, b.size, block_hashes, leaves_cache)
            line(
                {
                    "consistency": {
                        "from": a.size,
                        "to": b.size,
                        "proof": [base64.b64encode(p).decode() for p in proof],
                    }
                }
            )
    return {
        "path": str(path),
        "first": first,
        "last": last,
        "entries": count,
        "sha256": digest.hexdigest(),
    }


def _consistency(
    conn: Connection, a: int, b: int, block_hashes: dict[int, bytes], cache: dict[int, bytes]
) -> list[bytes]:
    if a == 0 or a == b:
        return []
    ranges = merkle.consistency_ranges(a, b)
    needed: set[int] = set()
    for lo, hi in ranges:
        if hi - lo < merkle.BLOCK:
            needed.add(lo // merkle.BLOCK)
        if hi % merkle.BLOCK:
            needed.add((hi - 1) // merkle.BLOCK)
        if (hi - lo) >= merkle.BLOCK:
            needed.update(
                blk
                for blk in range(lo // merkle.BLOCK, hi // merkle.BLOCK)
                if blk not in block_hashes
            )
    for blk in needed:
        lo = blk * merkle.BLOCK
        if lo in cache:
            continue
        for r in conn.execute(
            select(audit_entries.c.seq, audit_entries.c.entry, audit_entries.c.mac).where(
                audit_entries.c.seq > lo, audit_entries.c.seq <= lo + merkle.BLOCK
            )
        ):
            cache[r.seq - 1] = merkle.leaf_hash(r.entry.encode() + r.mac)
    return [merkle.range_hash(lo, hi, cache.__getitem__, block_hashes.get) for lo, hi in ranges]


@dataclass
class ExportFile:
    header: dict[str, Any]
    checkpoints: list[Checkpoint]
    consistency: list[dict[str, Any]]
    path: Path


def read_export(path: Path) -> ExportFile:
    header: dict[str, Any] | None = None
    signed: list[Checkpoint] = []
    proofs: list[dict[str, Any]] = []
    try:
        with path.open("rb") as source:
            for raw in source:
                obj = orjson.loads(raw)
                if header is None:
                    header = obj
                elif "checkpoint" in obj:
                    c = obj["checkpoint"]
                    signed.append(
                        Checkpoint(
                            int(c["size"]),
                            base64.b64decode(c["root"], validate=True),
                            str(c["timestamp"]),
                            str(c["key_id"]),
                            base64.b64decode(c["signature"], validate=True),
                        )
                    )
                elif "consistency" in obj:
                    proofs.append(obj["consistency"])
    except (OSError, orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ArchiveError("the file is not a readable carevault audit export") from None
    if not header or header.get("format") != FORMAT:
        raise ArchiveError("the file is not a carevault audit export")
    return ExportFile(header, signed, proofs, path)


def _file_rows(path: Path) -> Iterator[Row]:
    with path.open("rb") as source:
        next(source)
        for raw in source:
            obj = orjson.loads(raw)
            if "seq" not in obj:
                return
            yield int(obj["seq"]), canonical(obj["entry"]).decode(), bytes.fromhex(obj["mac"]), None


def verify_file(
    path: Path,
    keys: AuditKeys | None,
    trusted_public_keys: dict[str, bytes] | None = None,
    progress: Progress | None = None,
) -> Report:
    """Verify an export. The public keys come from `trusted_public_keys` (the auditor's copy)
    or the local audit key; never from the file alone, which anyone could have re-signed."""
    exported = read_export(path)
    public = dict(trusted_public_keys or {})
    if keys is not None:
        public.setdefault(keys.key_id, keys.public_key)
    if not public:
        raise ArchiveError("no trusted audit public key: pass --public-key")
    start_doc = exported.header.get("start", {})
    first = int(exported.header["first"])
    start = Start(
        first,
        bytes.fromhex(start_doc.get("previous_mac", GENESIS_MAC.hex())),
        tuple(base64.b64decode(p) for p in start_doc.get("peaks", [])),
    )
    verifier = Verifier(keys.mac if keys else None, public, exported.checkpoints, start)
    try:
        _run(verifier, _file_rows(path), progress)
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        raise ArchiveError("the file is not a readable carevault audit export") from None
    report = verifier.finish(whole=True)
    if report.ok:
        by_size = {c.size: c for c in exported.checkpoints}
        for proof in exported.consistency:
            a, b = by_size.get(proof["from"]), by_size.get(proof["to"])
            hashes = [base64.b64decode(p) for p in proof["proof"]]
            if (
                a is None
                or b is None
                or not merkle.verify_consistency(a.size, b.size, a.root, b.root, hashes)
            ):
                report.problem = Problem(
                    proof["to"],
                    "modified",
                    f"consistency proof {proof['from']}->{proof['to']} fails",
                )
                break
    return report


# -- retention ------------------------------------------------------------------------------


def retain(
    conn: Connection,
    keys: AuditKeys,
    up_to: int,
    path: Path,
    record: Callable[[dict[str, Any]], None],
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Export entries up to `up_to` and remove them. `up_to` must be a checkpoint size and a
    multiple of the Merkle block size (so proofs for the entries kept still work from the
    stored block hashes), and the trail up to it must verify first."""
    if up_to % merkle.BLOCK or up_to <= 0:
        raise ArchiveError(f"the retention point must be a multiple of {merkle.BLOCK}")
    if up_to not in {c.size for c in checkpoints(conn)}:
        raise ArchiveError("the retention point must be a checkpoint size")
    report = verify_database(conn, keys, last=up_to, progress=progress)
    if not report.ok:
        raise ArchiveError("the trail does not verify up to the retention point: nothing removed")
    held_first, _ = bounds(conn)
    summary = export(conn, keys, path, first=held_first, last=up_to)
    last_mac = conn.execute(
        select(audit_entries.c.mac).where(audit_entries.c.seq == up_to)
    ).scalar_one()
    conn.rollback()  # end the reads' implicit transaction before the write one
    # The command's own entry, chained before the rows go: the trail records its retention.
    record({"up_to": up_to, "export_sha256": summary["sha256"], "entries": summary["entries"]})
    with conn.begin():
        append_only.drop(conn, ("audit_entries",))
        conn.execute(audit_entries.delete().where(audit_entries.c.seq <= up_to))
        append_only.create(conn, ("audit_entries",))
        conn.execute(
            insert(audit_retention).values(
                up_to=up_to,
                last_mac=last_mac,
                at=format_time(dt.datetime.now(dt.UTC)),
                export_sha256=summary["sha256"],
            )
        )
    return summary
