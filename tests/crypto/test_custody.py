"""Key custody: master key, KEK and blind-index keysets on disk (files, modes, refusals)."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest
import tink
from tink import secret_key_access
from tink.proto import aes_gcm_pb2, hmac_prf_pb2, tink_pb2

from carevault.config import Settings
from carevault.crypto.custody import (
    INDEX_FILE,
    INDEX_FILE_AD,
    KEK_FILE,
    MASTER_FILE,
    InsecureKeyFileError,
    KeyCustody,
    KeyCustodyError,
    MasterKeyError,
    encode_master_key_env,
    generate_master_key_json,
    load_master_aead,
)
from carevault.runtime import build_services, ensure_key_material


@pytest.fixture
def keyed(tmp_path: Path) -> Settings:
    """A data directory with key material only (these tests need no database)."""
    settings = Settings(data_dir=tmp_path / "var")
    ensure_key_material(settings)
    return settings


def _raw_key_bytes(handle: tink.KeysetHandle, key_class: type) -> list[bytes]:
    proto = tink_pb2.Keyset.FromString(
        tink.proto_keyset_format.serialize(handle, secret_key_access.TOKEN)
    )
    return [key_class.FromString(key.key_data.value).key_value for key in proto.key]


def test_key_files_are_0600_and_keysets_are_encrypted(keyed: Settings) -> None:
    keys = keyed.keys_dir
    for name in (MASTER_FILE, KEK_FILE, INDEX_FILE):
        assert os.stat(keys / name).st_mode & 0o777 == 0o600, name
    custody = KeyCustody.from_settings(keyed)
    master = load_master_aead(keys)
    secrets = {
        KEK_FILE: _raw_key_bytes(custody.kek().handle, aes_gcm_pb2.AesGcmKey),
        INDEX_FILE: _raw_key_bytes(
            tink.json_proto_keyset_format.parse_encrypted(
                (keys / INDEX_FILE).read_text(), master, INDEX_FILE_AD
            ),
            hmac_prf_pb2.HmacPrfKey,
        ),
    }
    for name, raw_keys in secrets.items():
        text = (keys / name).read_text()
        data = json.loads(text)
        # tink's encrypted keyset format: ciphertext plus non-secret key info, nothing else
        assert set(data) == {"encryptedKeyset", "keysetInfo"}, name
        assert "keyData" not in text and '"value"' not in text
        assert set(data["keysetInfo"]) == {"primaryKeyId", "keyInfo"}
        for raw in raw_keys:
            assert len(raw) == 32
            assert raw not in (keys / name).read_bytes()
            assert base64.b64encode(raw).decode() not in text
            assert base64.urlsafe_b64encode(raw).decode().rstrip("=") not in text
    # the KEK and the index key are different keys
    assert not set(secrets[KEK_FILE]) & set(secrets[INDEX_FILE])
    # master.key is tink's cleartext format (that is why it must be 0600)
    assert "keyData" in (keys / MASTER_FILE).read_text()


def test_ensure_is_idempotent(keyed: Settings) -> None:
    before = {n: (keyed.keys_dir / n).read_bytes() for n in (MASTER_FILE, KEK_FILE, INDEX_FILE)}
    ensure_key_material(keyed)
    after = {n: (keyed.keys_dir / n).read_bytes() for n in (MASTER_FILE, KEK_FILE, INDEX_FILE)}
    assert before == after


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_master_key_file_readable_by_others_is_refused(keyed: Settings, mode: int) -> None:
    path = keyed.keys_dir / MASTER_FILE
    os.chmod(path, mode)
    for attempt in (
        lambda: KeyCustody.from_settings(keyed),
        lambda: ensure_key_material(keyed),
        lambda: build_services(keyed),
    ):
        with pytest.raises(InsecureKeyFileError) as err:
            attempt()
        assert f"chmod 600 {path}" in str(err.value)
        assert f"{mode:04o}" in str(err.value)
    os.chmod(path, 0o600)
    KeyCustody.from_settings(keyed)


def test_refused_in_development_too(keyed: Settings) -> None:
    assert keyed.environment == "development"
    os.chmod(keyed.keys_dir / MASTER_FILE, 0o644)
    with pytest.raises(InsecureKeyFileError):
        KeyCustody.from_settings(keyed)


def test_env_master_key_is_used_and_no_file_is_written(tmp_path: Path) -> None:
    value = encode_master_key_env(generate_master_key_json())
    settings = Settings(data_dir=tmp_path / "var", master_key=value)
    ensure_key_material(settings)
    assert not (settings.keys_dir / MASTER_FILE).exists()
    assert value not in repr(settings)  # SecretStr
    KeyCustody.from_settings(settings)
    # kek.json opens only with that master key
    other = Settings(
        data_dir=settings.data_dir, master_key=encode_master_key_env(generate_master_key_json())
    )
    with pytest.raises(MasterKeyError) as err:
        KeyCustody.from_settings(other)
    assert "kek.json" in str(err.value)
    # ... and without it nothing silently creates a fresh master key
    with pytest.raises(MasterKeyError, match="restore"):
        ensure_key_material(Settings(data_dir=settings.data_dir))


def test_env_master_key_read_from_environment(tmp_path: Path, monkeypatch) -> None:
    value = encode_master_key_env(generate_master_key_json())
    monkeypatch.setenv("CAREVAULT_DATA_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("CAREVAULT_MASTER_KEY", value)
    settings = Settings()
    assert settings.master_key is not None and settings.master_key.get_secret_value() == value
    ensure_key_material(settings)
    assert not (settings.keys_dir / MASTER_FILE).exists()
    assert KeyCustody.from_settings(settings).kek().primary_id


@pytest.mark.parametrize(
    "value",
    [
        "not base64 at all!",
        base64.b64encode(b"{nope").decode(),
        base64.b64encode(b'{"primaryKeyId": 1, "key": []}').decode(),
    ],
)
def test_malformed_env_master_key_is_refused_without_echo(tmp_path: Path, value: str) -> None:
    settings = Settings(data_dir=tmp_path / "var", master_key=value)
    with pytest.raises(MasterKeyError) as err:
        ensure_key_material(settings)
    assert "CAREVAULT_MASTER_KEY" in str(err.value)
    assert value not in str(err.value)


def test_master_key_must_be_an_aead_keyset(tmp_path: Path) -> None:
    from tink import prf

    handle = tink.new_keyset_handle(prf.prf_key_templates.HMAC_SHA256)
    keyset_json = tink.json_proto_keyset_format.serialize(handle, secret_key_access.TOKEN)
    settings = Settings(data_dir=tmp_path / "var", master_key=encode_master_key_env(keyset_json))
    with pytest.raises(MasterKeyError, match="AEAD"):
        ensure_key_material(settings)


def test_lost_master_key_file_is_not_silently_replaced(keyed: Settings) -> None:
    kek_before = (keyed.keys_dir / KEK_FILE).read_bytes()
    (keyed.keys_dir / MASTER_FILE).unlink()
    with pytest.raises(MasterKeyError) as err:
        ensure_key_material(keyed)
    assert "restore" in str(err.value) and "CAREVAULT_MASTER_KEY" in str(err.value)
    assert not (keyed.keys_dir / MASTER_FILE).exists()
    assert (keyed.keys_dir / KEK_FILE).read_bytes() == kek_before


def test_keyset_files_cannot_be_swapped(keyed: Settings) -> None:
    """Each file is bound to its role by associated data: index.json is no KEK."""
    (keyed.keys_dir / KEK_FILE).write_bytes((keyed.keys_dir / INDEX_FILE).read_bytes())
    with pytest.raises(MasterKeyError, match="kek.json"):
        KeyCustody.from_settings(keyed)


def test_kek_rotation_adds_a_primary_and_keeps_old_keys(keyed: Settings) -> None:
    custody = KeyCustody.from_settings(keyed)
    first = custody.kek()
    ciphertext = first.aead.encrypt(b"wrapped data key", b"ad")
    new_primary = custody.rotate_kek()
    rotated = custody.kek()
    assert rotated.primary_id == new_primary != first.primary_id
    assert rotated.key_ids == first.key_ids | {new_primary}
    assert rotated.aead.decrypt(ciphertext, b"ad") == b"wrapped data key"
    # another process sees the new file on its next current_kek()
    other = KeyCustody.from_settings(keyed)
    assert other.current_kek().primary_id == new_primary
    with pytest.raises(KeyCustodyError, match="primary"):
        custody.drop_kek_keys([new_primary])
    assert custody.drop_kek_keys([first.primary_id]) == [first.primary_id]
    assert custody.kek().key_ids == {new_primary}
    with pytest.raises(tink.TinkError):
        custody.kek().aead.decrypt(ciphertext, b"ad")
    assert os.stat(keyed.keys_dir / KEK_FILE).st_mode & 0o777 == 0o600
    stale = other.kek()
    assert other.current_kek() is not stale  # file changed: reloaded
    assert other.current_kek() is other.current_kek()  # unchanged: no reload


async def test_env_master_key_round_trip_on_the_store(settings_factory, instances) -> None:
    settings = settings_factory(master_key=encode_master_key_env(generate_master_key_json()))
    assert not (settings.keys_dir / MASTER_FILE).exists()
    services = await instances(settings)
    ciphertext = await services.envelope.encrypt("patient:env", b"phi", b"ad")
    assert await services.envelope.decrypt("patient:env", ciphertext, b"ad") == b"phi"
