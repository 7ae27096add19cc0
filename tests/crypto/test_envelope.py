"""Envelope encryption: per-scope DEKs wrapped by the KEK, on SQLite and PostgreSQL.

Covers the data-at-rest half of security invariant 1: ciphertexts bound to their row (AD) and
scope, wrapped DEKs bound to their scope, tamper detection, wrong keys, crypto-shredding across
restarts and processes, first-use races, and KEK rotation under live traffic.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from carevault.config import Settings
from carevault.crypto.custody import KEK_FILE
from carevault.crypto.envelope import (
    DecryptionFailed,
    EnvelopeCipher,
    InvalidScope,
    KeyDestroyed,
    RewrapProgress,
)
from carevault.db.engine import read_connection, write_transaction
from carevault.db.tables import data_keys
from carevault.runtime import Services, ensure_key_material
from tests.crypto.conftest import other_host_settings

AD = b"Patient/p1/_history/1"


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _rows(services: Services) -> list[Any]:
    async with read_connection(services.vault_engine) as conn:
        return (await conn.execute(select(data_keys).order_by(data_keys.c.scope))).all()


# -- round trip and binding -------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1024, 1024 * 1024])
async def test_round_trip(services: Services, size: int) -> None:
    plaintext = os.urandom(size)
    ciphertext = await services.envelope.encrypt("patient:p1", plaintext, AD)
    assert await services.envelope.decrypt("patient:p1", ciphertext, AD) == plaintext
    # a fresh process (no cached DEK) reads it too
    services.envelope._cache.clear()
    assert await services.envelope.decrypt("patient:p1", ciphertext, AD) == plaintext


async def test_ciphertexts_are_randomised_and_hold_no_plaintext(services: Services) -> None:
    plaintext = b"Jane Doe, born 1970-01-01, MRN 123456" * 4
    first = await services.envelope.encrypt("patient:p1", plaintext, AD)
    second = await services.envelope.encrypt("patient:p1", plaintext, AD)
    assert first != second
    assert b"Jane" not in first and b"123456" not in first
    rows = await _rows(services)
    assert len(rows) == 1 and rows[0].scope == "patient:p1"
    assert b"Jane" not in rows[0].wrapped
    assert rows[0].kek_key_id == services.custody.kek().primary_id


async def test_associated_data_binds_ciphertext_to_its_row(services: Services) -> None:
    """Moving a ciphertext to another row (another resource id or version) fails."""
    ciphertext = await services.envelope.encrypt("patient:p1", b"body of v1", AD)
    for other in (b"Patient/p1/_history/2", b"Patient/p2/_history/1", b"", AD + b"\x00"):
        with pytest.raises(DecryptionFailed):
            await services.envelope.decrypt("patient:p1", ciphertext, other)


async def test_ciphertext_of_one_scope_does_not_open_under_another(services: Services) -> None:
    ciphertext = await services.envelope.encrypt("patient:p1", b"phi", AD)
    await services.envelope.encrypt("patient:p2", b"other", AD)
    with pytest.raises(DecryptionFailed):
        await services.envelope.decrypt("patient:p2", ciphertext, AD)


async def test_wrapped_dek_moved_to_another_scope_row_fails(
    services: Services, instances, settings: Settings
) -> None:
    mine = await services.envelope.encrypt("patient:victim", b"victim's record", AD)
    theirs = await services.envelope.encrypt("patient:attacker", b"attacker's", AD)
    victim = next(r for r in await _rows(services) if r.scope == "patient:victim")
    async with write_transaction(services.vault_engine) as conn:
        await conn.execute(
            update(data_keys)
            .where(data_keys.c.scope == "patient:attacker")
            .values(wrapped=victim.wrapped, kek_key_id=victim.kek_key_id)
        )
    fresh = await instances(settings)  # nothing cached
    # the victim's DEK, now in the attacker's row, does not unwrap there ...
    with pytest.raises(DecryptionFailed) as err:
        await fresh.envelope.decrypt("patient:attacker", mine, AD)
    assert not isinstance(err.value, KeyDestroyed)
    with pytest.raises(DecryptionFailed):
        await fresh.envelope.decrypt("patient:attacker", theirs, AD)
    with pytest.raises(DecryptionFailed):
        await fresh.envelope.encrypt("patient:attacker", b"x", AD)
    # ... and the victim's own row is untouched
    assert await fresh.envelope.decrypt("patient:victim", mine, AD) == b"victim's record"


async def test_every_single_byte_flip_is_detected(services: Services) -> None:
    ciphertext = await services.envelope.encrypt("patient:p1", b"x" * 64, AD)
    for position in range(len(ciphertext)):
        tampered = bytearray(ciphertext)
        tampered[position] ^= 1 << random.randrange(8)
        with pytest.raises(DecryptionFailed) as err:
            await services.envelope.decrypt("patient:p1", bytes(tampered), AD)
        assert "x" * 8 not in str(err.value)
    for broken in (b"", ciphertext[:-1], ciphertext[:5], ciphertext + b"\x00"):
        with pytest.raises(DecryptionFailed):
            await services.envelope.decrypt("patient:p1", broken, AD)


async def test_missing_data_key_fails_closed(services: Services) -> None:
    ciphertext = await services.envelope.encrypt("patient:p1", b"phi", AD)
    with pytest.raises(DecryptionFailed) as err:
        await services.envelope.decrypt("patient:never", ciphertext, AD)
    assert not isinstance(err.value, KeyDestroyed)
    assert await _rows(services) and len(await _rows(services)) == 1  # decrypt creates nothing


async def test_wrong_kek_fails(services: Services, settings: Settings, instances) -> None:
    secret = b"PHI that must not come back as garbage"
    ciphertext = await services.envelope.encrypt("patient:p1", secret, AD)
    (settings.keys_dir / KEK_FILE).unlink()
    ensure_key_material(settings)  # new KEK material under the same master key
    fresh = await instances(settings)
    with pytest.raises(DecryptionFailed) as err:
        await fresh.envelope.decrypt("patient:p1", ciphertext, AD)
    assert secret.decode() not in str(err.value)
    with pytest.raises(DecryptionFailed):
        await fresh.envelope.encrypt("patient:p1", b"more", AD)
    # new scopes work under the new KEK
    other = await fresh.envelope.encrypt("patient:p2", b"new", AD)
    assert await fresh.envelope.decrypt("patient:p2", other, AD) == b"new"


@pytest.mark.parametrize("scope", ["", "x" * 101, "patient: p1", "patient:\x00", "patient:é"])
async def test_invalid_scopes_are_refused(services: Services, scope: str) -> None:
    with pytest.raises(InvalidScope):
        await services.envelope.encrypt(scope, b"x", AD)
    with pytest.raises(InvalidScope):
        await services.envelope.decrypt(scope, b"x", AD)


async def test_cache_is_bounded_lru(services: Services) -> None:
    envelope = EnvelopeCipher(services.vault_engine, services.custody, cache_size=2)
    cts = {s: await envelope.encrypt(s, s.encode(), AD) for s in ("type:A", "type:B", "type:C")}
    assert envelope.cached_scopes() == 2
    for scope, ciphertext in cts.items():
        assert await envelope.decrypt(scope, ciphertext, AD) == scope.encode()
    uncached = EnvelopeCipher(services.vault_engine, services.custody, cache_size=0)
    assert await uncached.decrypt("type:A", cts["type:A"], AD) == b"type:A"
    assert uncached.cached_scopes() == 0


# -- crypto-shredding -------------------------------------------------------------------------


async def test_destroy_shreds_one_scope_and_survives_restart(
    services: Services, settings: Settings, instances
) -> None:
    doomed = [
        await services.envelope.encrypt("patient:gone", f"rec {i}".encode(), AD) for i in range(5)
    ]
    kept = [
        await services.envelope.encrypt("patient:kept", f"rec {i}".encode(), AD) for i in range(5)
    ]
    await services.envelope.destroy("patient:gone")
    for ciphertext in doomed:
        with pytest.raises(KeyDestroyed):
            await services.envelope.decrypt("patient:gone", ciphertext, AD)
    with pytest.raises(KeyDestroyed):
        await services.envelope.encrypt("patient:gone", b"new", AD)
    for i, ciphertext in enumerate(kept):
        plaintext = await services.envelope.decrypt("patient:kept", ciphertext, AD)
        assert plaintext == f"rec {i}".encode()
    row = next(r for r in await _rows(services) if r.scope == "patient:gone")
    assert row.wrapped == b"" and row.destroyed_at is not None
    assert await services.envelope.is_destroyed("patient:gone")

    await services.envelope.destroy("patient:gone")  # idempotent
    restarted = await instances(settings)
    for ciphertext in doomed:
        with pytest.raises(KeyDestroyed):
            await restarted.envelope.decrypt("patient:gone", ciphertext, AD)
    with pytest.raises(KeyDestroyed):
        await restarted.envelope.encrypt("patient:gone", b"new", AD)
    assert await restarted.envelope.decrypt("patient:kept", kept[0], AD) == b"rec 0"


async def test_destroyed_key_leaves_no_copy_in_the_vault_files(
    services: Services, settings: Settings
) -> None:
    """The embedded vault zeroes a destroyed key's bytes (secure_delete) and truncates its
    write-ahead log, so neither the file nor the WAL keeps the wrapped DEK; a neighbour's
    key is untouched."""
    await services.envelope.encrypt("patient:gone", b"phi", AD)
    await services.envelope.encrypt("patient:kept", b"phi", AD)
    wrapped = {row.scope: bytes(row.wrapped) for row in await _rows(services)}

    def vault_bytes() -> bytes:
        files = sorted(settings.keys_dir.glob("data-keys.db*"))
        return b"".join(f.read_bytes() for f in files)

    assert wrapped["patient:gone"] in vault_bytes()  # control: the scan does find keys
    await services.envelope.destroy("patient:gone")
    raw = vault_bytes()
    assert wrapped["patient:gone"][16:48] not in raw
    assert wrapped["patient:kept"] in raw


async def test_destroy_before_first_use_blocks_the_scope(services: Services) -> None:
    await services.envelope.destroy("patient:erased")
    with pytest.raises(KeyDestroyed):
        await services.envelope.encrypt("patient:erased", b"x", AD)


async def test_destroy_reaches_other_processes_on_the_host_at_once(
    services: Services, settings: Settings, instances
) -> None:
    other = await instances(settings)  # another worker: same data directory
    ciphertext = await services.envelope.encrypt("patient:p1", b"phi", AD)
    assert await other.envelope.decrypt("patient:p1", ciphertext, AD) == b"phi"  # now cached
    await services.envelope.destroy("patient:p1")
    with pytest.raises(KeyDestroyed):
        await other.envelope.decrypt("patient:p1", ciphertext, AD)
    with pytest.raises(KeyDestroyed):
        await other.envelope.encrypt("patient:p1", b"more", AD)


async def test_destroy_reaches_other_hosts_within_the_ttl(
    services: Services, settings: Settings, instances, tmp_path: Path
) -> None:
    host2 = await instances(other_host_settings(settings, tmp_path / "host2"))
    monotonic = FakeMonotonic()
    cipher2 = EnvelopeCipher(
        host2.vault_engine, host2.custody, cache_ttl_seconds=30, monotonic=monotonic
    )
    ciphertext = await services.envelope.encrypt("patient:p1", b"phi", AD)
    assert await cipher2.decrypt("patient:p1", ciphertext, AD) == b"phi"
    await services.envelope.destroy("patient:p1")
    # documented bound: another host may still use its cached DEK until the TTL ends ...
    monotonic.now += 29
    assert await cipher2.decrypt("patient:p1", ciphertext, AD) == b"phi"
    # ... and not a moment later, however often it was used meanwhile
    monotonic.now += 1
    with pytest.raises(KeyDestroyed):
        await cipher2.decrypt("patient:p1", ciphertext, AD)


# -- concurrency ------------------------------------------------------------------------------


async def test_concurrent_first_use_from_two_instances_makes_one_dek(
    services: Services, settings: Settings, instances
) -> None:
    other = await instances(settings)
    scopes = [f"patient:race-{i}" for i in range(12)]
    results = await asyncio.gather(
        *[
            cipher.encrypt(scope, f"{scope} from {n}".encode(), AD)
            for scope in scopes
            for n, cipher in enumerate((services.envelope, other.envelope, services.envelope))
        ]
    )
    rows = await _rows(services)
    assert sorted(r.scope for r in rows) == sorted(scopes)  # exactly one DEK per scope
    fresh = await instances(settings)
    index = 0
    for scope in scopes:
        for n in range(3):
            expected = f"{scope} from {n}".encode()
            for reader in (services.envelope, other.envelope, fresh.envelope):
                assert await reader.decrypt(scope, results[index], AD) == expected
            index += 1


# -- KEK rotation -----------------------------------------------------------------------------


async def _fill(envelope: EnvelopeCipher, count: int) -> dict[str, bytes]:
    return {
        f"patient:{i:04d}": await envelope.encrypt(f"patient:{i:04d}", f"r{i}".encode(), AD)
        for i in range(count)
    }


async def _assert_readable(envelope: EnvelopeCipher, data: dict[str, bytes]) -> None:
    for scope, ciphertext in data.items():
        assert await envelope.decrypt(scope, ciphertext, AD) == f"r{int(scope[8:])}".encode()


async def test_kek_rotation_keeps_data_readable_and_rewraps_everything(
    services: Services, settings: Settings, instances
) -> None:
    data = await _fill(services.envelope, 7)
    old_primary = services.custody.kek().primary_id
    await services.envelope.destroy("patient:0006")
    data.pop("patient:0006")
    new_primary = services.custody.rotate_kek()
    await _assert_readable(services.envelope, data)
    await _assert_readable((await instances(settings)).envelope, data)  # before re-wrap
    # new DEKs are wrapped under the new primary straight away
    data["patient:0100"] = await services.envelope.encrypt("patient:0100", b"r100", AD)
    assert await services.envelope.kek_usage() == {old_primary: 6, new_primary: 1}

    seen: list[RewrapProgress] = []
    result = await services.envelope.rewrap_all(batch_size=4, progress=seen.append)
    assert (result.total, result.rewrapped, result.remaining, result.failed) == (6, 6, 0, ())
    assert [p.processed for p in seen] == [4, 6]
    assert await services.envelope.kek_usage() == {new_primary: 7}
    assert all(r.kek_key_id == new_primary for r in await _rows(services) if r.destroyed_at is None)

    assert await services.envelope.retire_unused_kek_keys() == [old_primary]
    assert services.custody.kek().key_ids == {new_primary}
    await _assert_readable(services.envelope, data)
    restarted = await instances(settings)
    await _assert_readable(restarted.envelope, data)
    with pytest.raises(KeyDestroyed):
        await restarted.envelope.decrypt("patient:0006", b"x" * 40, AD)
    # nothing left to do: a second run is a no-op
    again = await services.envelope.rewrap_all()
    assert (again.total, again.rewrapped, again.remaining) == (0, 0, 0)


async def test_old_kek_keys_are_kept_while_anything_is_wrapped_under_them(
    services: Services,
) -> None:
    data = await _fill(services.envelope, 3)
    old_primary = services.custody.kek().primary_id
    services.custody.rotate_kek()
    assert await services.envelope.retire_unused_kek_keys() == []
    assert old_primary in services.custody.kek().key_ids
    await _assert_readable(services.envelope, data)


async def test_rewrap_is_resumable(services: Services, settings: Settings, instances) -> None:
    data = await _fill(services.envelope, 5)
    old_primary = services.custody.kek().primary_id
    new_primary = services.custody.rotate_kek()

    def interrupt(progress: RewrapProgress) -> None:
        raise KeyboardInterrupt  # e.g. Ctrl-C after the first batch

    with pytest.raises(KeyboardInterrupt):
        await services.envelope.rewrap_all(batch_size=2, progress=interrupt)
    assert await services.envelope.kek_usage() == {old_primary: 3, new_primary: 2}
    await _assert_readable((await instances(settings)).envelope, data)

    resumed = await (await instances(settings)).envelope.rewrap_all(batch_size=2)
    assert (resumed.total, resumed.rewrapped, resumed.remaining) == (3, 3, 0)
    assert await services.envelope.kek_usage() == {new_primary: 5}
    assert await services.envelope.retire_unused_kek_keys() == [old_primary]
    await _assert_readable((await instances(settings)).envelope, data)


async def test_rotation_under_live_traffic_has_zero_failures(
    services: Services, settings: Settings, instances
) -> None:
    other = await instances(settings)  # a second worker serving traffic during the rotation
    data = await _fill(services.envelope, 40)
    lock = asyncio.Lock()
    stop = asyncio.Event()
    failures: list[BaseException] = []
    operations = 0

    async def traffic(worker: EnvelopeCipher, seed: int) -> None:
        nonlocal operations
        rng = random.Random(seed)
        while not stop.is_set():
            try:
                if rng.random() < 0.3:
                    scope = f"patient:{rng.randrange(40, 80):04d}"  # new and existing scopes
                    number = int(scope[8:])
                    ciphertext = await worker.encrypt(scope, f"r{number}".encode(), AD)
                    async with lock:
                        data[scope] = ciphertext
                else:
                    scope, ciphertext = rng.choice(list(data.items()))
                    plaintext = await worker.decrypt(scope, ciphertext, AD)
                    assert plaintext == f"r{int(scope[8:])}".encode()
                if rng.random() < 0.2:
                    worker._cache.clear()  # force unwraps during the rotation
                operations += 1
            except BaseException as err:  # noqa: BLE001 - every failure counts
                failures.append(err)
                return
            await asyncio.sleep(0)

    workers = [
        asyncio.create_task(traffic(w, n))
        for n, w in enumerate([services.envelope, other.envelope] * 3)
    ]
    await asyncio.sleep(0.05)
    old_primary = services.custody.kek().primary_id
    new_primary = services.custody.rotate_kek()
    result = await services.envelope.rewrap_all(batch_size=3)
    await asyncio.sleep(0.05)
    dropped = await services.envelope.retire_unused_kek_keys(batch_size=3)
    await asyncio.sleep(0.05)
    stop.set()
    await asyncio.gather(*workers)
    assert failures == []
    assert operations > 100
    assert result.failed == ()
    assert dropped == [old_primary]
    assert await services.envelope.kek_usage() == {new_primary: len(data)}
    await _assert_readable((await instances(settings)).envelope, data)


async def test_process_started_before_a_rotation_wraps_new_keys_under_the_new_primary(
    services: Services, settings: Settings, instances
) -> None:
    stale = await instances(settings)  # loaded the KEK before the rotation
    services.custody.rotate_kek()
    await services.envelope.rewrap_all()
    await services.envelope.retire_unused_kek_keys()
    ciphertext = await stale.envelope.encrypt("patient:late", b"phi", AD)
    (row,) = [r for r in await _rows(services) if r.scope == "patient:late"]
    assert row.kek_key_id == services.custody.kek().primary_id
    fresh = await instances(settings)
    assert await fresh.envelope.decrypt("patient:late", ciphertext, AD) == b"phi"


async def test_dek_created_during_a_rotation_is_moved_to_the_new_primary(
    services: Services, monkeypatch
) -> None:
    """The race the post-insert check closes: a DEK wrapped under the old primary just as the
    rotation runs is re-wrapped by its creator, so dropping old keys cannot orphan it."""
    custody = services.custody
    before = custody.current_kek()
    real_current = custody.current_kek
    calls = 0

    def stale_once():
        nonlocal calls
        calls += 1
        return before if calls == 1 else real_current()

    monkeypatch.setattr(custody, "current_kek", stale_once)
    new_primary = custody.rotate_kek()
    ciphertext = await services.envelope.encrypt("patient:racy", b"phi", AD)
    (row,) = await _rows(services)
    assert row.kek_key_id == new_primary
    monkeypatch.setattr(custody, "current_kek", real_current)
    assert await services.envelope.retire_unused_kek_keys() == [before.primary_id]
    services.envelope._cache.clear()
    assert await services.envelope.decrypt("patient:racy", ciphertext, AD) == b"phi"


async def test_cli_rotate_kek(
    services: Services, settings: Settings, instances, monkeypatch
) -> None:
    from typer.testing import CliRunner

    from carevault.cli import app
    from tests.audit.trail import audit_documents

    monkeypatch.setenv("CAREVAULT_DATA_DIR", str(settings.data_dir))
    if settings.database_url:
        monkeypatch.setenv("CAREVAULT_DATABASE_URL", settings.database_url)
    else:
        monkeypatch.delenv("CAREVAULT_DATABASE_URL", raising=False)
    data = await _fill(services.envelope, 6)
    old_primary = services.custody.kek().primary_id

    def run() -> Any:
        return CliRunner().invoke(app, ["keys", "rotate-kek", "--batch-size", "2"])

    result = await asyncio.to_thread(run)
    assert result.exit_code == 0, result.output
    assert "6 data key(s) re-wrapped" in result.output
    kek = services.custody.current_kek()
    assert old_primary not in kek.key_ids and len(kek.key_ids) == 1
    assert await services.envelope.kek_usage() == {kek.primary_id: 6}
    await _assert_readable((await instances(settings)).envelope, data)
    await _assert_readable(services.envelope, data)  # the running process never noticed

    # an interrupted rotation (old key still present) is resumed, not restarted
    resumed_primary = services.custody.rotate_kek()
    result = await asyncio.to_thread(run)
    assert result.exit_code == 0, result.output
    assert "resumed" in result.output
    assert services.custody.current_kek().key_ids == {resumed_primary}

    events = await audit_documents(services.engine, "security.kek_rotation")
    assert [(e["action"], e["outcome"]) for e in events] == [
        ("security.kek_rotation", "permit")
    ] * 2
