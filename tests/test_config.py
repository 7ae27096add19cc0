"""Settings validation and the production-mode refusals."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from carevault.config import Settings, UnsafeSettingsError, check_production
from carevault.runtime import ensure_key_material


def _prod(tmp_path, **values):
    settings = Settings(
        environment="production",
        data_dir=tmp_path / "var",
        issuer_url="https://ehr.example.org",
        **values,
    )
    ensure_key_material(settings)
    return settings


def test_development_mode_allows_anything(tmp_path):
    settings = Settings(data_dir=tmp_path, debug=True)
    check_production(settings, bind_host="0.0.0.0", demo_accounts=3)  # no error


def test_safe_production_settings_pass(tmp_path):
    check_production(_prod(tmp_path), bind_host="127.0.0.1", demo_accounts=0)


def test_non_loopback_without_tls_is_refused(tmp_path):
    with pytest.raises(UnsafeSettingsError) as err:
        check_production(_prod(tmp_path), bind_host="0.0.0.0", demo_accounts=0)
    assert "without TLS" in str(err.value) and "CAREVAULT_TLS_CERT" in str(err.value)


def test_non_loopback_with_tls_is_allowed(tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("x")
    key.write_text("x")
    check_production(
        _prod(tmp_path, tls_cert=cert, tls_key=key), bind_host="10.0.0.5", demo_accounts=0
    )


def test_debug_demo_accounts_and_readable_secrets_are_each_named(tmp_path):
    settings = _prod(tmp_path, debug=True)
    exposed = settings.keys_dir / "signing.json"
    os.chmod(exposed, 0o644)
    with pytest.raises(UnsafeSettingsError) as err:
        check_production(settings, bind_host="127.0.0.1", demo_accounts=2)
    message = str(err.value)
    assert "debug is on" in message
    assert "2 demo account(s)" in message
    assert f"chmod 600 {exposed}" in message
    assert len(err.value.problems) == 3


def test_http_issuer_off_loopback_is_refused(tmp_path):
    settings = Settings(
        environment="production", data_dir=tmp_path, issuer_url="http://ehr.example.org"
    )
    with pytest.raises(UnsafeSettingsError, match="not https"):
        check_production(settings, bind_host="127.0.0.1", demo_accounts=0)


@pytest.mark.parametrize(
    "field,value",
    [
        ("access_token_ttl_seconds", 3601),
        ("clock_leeway_seconds", 61),
        ("argon2_memory_kib", 19455),
        ("argon2_time_cost", 1),
        ("signing_algorithm", "HS256"),
        ("signing_algorithm", "none"),
        ("max_token_bytes", 9000),
    ],
)
def test_unsafe_values_are_rejected(field, value):
    with pytest.raises(ValidationError):
        Settings(**{field: value})


def test_environment_variables_are_read(monkeypatch, tmp_path):
    monkeypatch.setenv("CAREVAULT_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("CAREVAULT_ACCESS_TOKEN_TTL_SECONDS", "120")
    monkeypatch.setenv("CAREVAULT_TRUSTED_PROXIES", "10.0.0.1, 10.0.0.2")
    settings = Settings()
    assert settings.data_dir == tmp_path
    assert settings.access_token_ttl_seconds == 120
    assert settings.trusted_proxies == ["10.0.0.1", "10.0.0.2"]


def test_key_material_is_private(tmp_path):
    settings = Settings(data_dir=tmp_path / "var")
    ensure_key_material(settings)
    assert os.stat(settings.keys_dir).st_mode & 0o777 == 0o700
    files = list(settings.keys_dir.iterdir())
    assert {f.name for f in files} >= {"signing.json", "instance.json"}
    for path in files:
        assert os.stat(path).st_mode & 0o777 == 0o600, path
