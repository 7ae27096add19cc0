"""A key vault on PostgreSQL (`CAREVAULT_KEY_DATABASE_URL`), as a multi-host deployment runs
it: hosts with their own data directories share the vault, a destroy on one is final on every
other once its cache TTL ends, rotation re-wraps in place, and an erasure through HTTP shreds
the patient while the data database holds no key at all."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, select

from carevault.crypto.envelope import EnvelopeCipher, KeyDestroyed
from carevault.db.engine import read_connection
from carevault.db.tables import data_keys
from carevault.identity.roles import Role
from tests.access.fhir_world import mfa_login
from tests.conftest import PG_SKIP, PG_URL, make_settings

pytestmark = [
    pytest.mark.postgres,
    pytest.mark.skipif(not PG_URL, reason=PG_SKIP),
]

AD = b"Patient/p1/_history/1"


@pytest.fixture
def vault_settings(tmp_path: Path, pg_schema: Any) -> Any:
    """Settings factory: each call is another host (own data directory and SQLite data file)
    on the one PostgreSQL vault, with a copy of the same KEK and master key."""
    vault_url = pg_schema()
    first: list[Any] = []

    def host(name: str) -> Any:
        data_dir = tmp_path / name
        if first:
            import shutil

            shutil.copytree(first[0].keys_dir, data_dir / "keys")
        settings = make_settings(data_dir, None, key_database_url=vault_url)
        first.append(settings)
        return settings

    return host


async def test_hosts_share_the_vault_and_a_destroy(vault_settings, instances) -> None:
    one = await instances(vault_settings("one"))
    two = await instances(vault_settings("two"))
    ciphertext = await one.envelope.encrypt("patient:p1", b"phi", AD)
    assert await two.envelope.decrypt("patient:p1", ciphertext, AD) == b"phi"
    async with read_connection(one.vault_engine) as conn:
        rows = (await conn.execute(select(data_keys.c.scope))).scalars().all()
    assert rows == ["patient:p1"]
    assert one.vault_engine.dialect.name == "postgresql"

    await one.envelope.destroy("patient:p1")
    uncached = EnvelopeCipher(two.vault_engine, two.custody, cache_size=0)
    with pytest.raises(KeyDestroyed):
        await uncached.decrypt("patient:p1", ciphertext, AD)
    with pytest.raises(KeyDestroyed):
        await uncached.encrypt("patient:p1", b"again", AD)


async def test_kek_rotation_rewraps_the_postgres_vault(vault_settings, instances) -> None:
    host = await instances(vault_settings("one"))
    ciphertexts = {
        f"patient:{i}": await host.envelope.encrypt(f"patient:{i}", b"phi", AD) for i in range(5)
    }
    new_primary = host.custody.rotate_kek()
    result = await host.envelope.rewrap_all(batch_size=2)
    assert (result.rewrapped, result.remaining) == (5, 0)
    assert await host.envelope.kek_usage() == {new_primary: 5}
    assert await host.envelope.retire_unused_kek_keys() != []
    host.envelope._cache.clear()
    for scope, ciphertext in ciphertexts.items():
        assert await host.envelope.decrypt(scope, ciphertext, AD) == b"phi"


async def test_http_erasure_with_a_postgres_vault(vault_settings, harness_factory) -> None:
    settings = vault_settings("one")
    h = await harness_factory(settings)
    await h.add_user("dr.vault", Role.service)  # may create and read any patient's records
    await h.add_user("admin.vault", Role.admin)
    auth = {"Authorization": f"Bearer {(await h.login('dr.vault'))['access_token']}"}
    admin = {"Authorization": f"Bearer {(await mfa_login(h, 'admin.vault'))['access_token']}"}
    patient = {"resourceType": "Patient", "name": [{"family": "Vaultkeeper"}]}
    created = await h.client.post("/fhir/Patient", json=patient, headers=auth)
    assert created.status_code == 201, created.text
    pid = created.json()["id"]

    erased = await h.client.delete(f"/fhir/Patient/{pid}?_erase=true", headers=admin)
    assert erased.status_code in (200, 204), erased.text
    assert (await h.client.get(f"/fhir/Patient/{pid}", headers=auth)).status_code == 410
    assert await h.services.envelope.key_state(f"patient:{pid}") == "destroyed"
    async with h.services.engine.connect() as conn:
        tables = await conn.run_sync(lambda sync: inspect(sync).get_table_names())
    assert "data_keys" not in tables
