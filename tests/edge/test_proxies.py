"""Trusted proxies: X-Forwarded-For / X-Forwarded-Proto are believed only from a configured
proxy (an address or a CIDR network), seen through what the app records (the source address
of the audit entry for a failed login), and production's rule for a proxy deployment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from starlette.requests import Request

from carevault.config import Settings, UnsafeSettingsError, check_production
from carevault.db.tables import audit_entries
from carevault.edge.client_address import client_address, client_scheme

PEER_UNTRUSTED = "203.0.113.7"
CLIENT = "198.51.100.1"


async def _source_of_failed_login(
    harness: Any, peer: str, headers: dict[str, str] | None = None
) -> str | None:
    """Log in with a wrong password from `peer`; the source address the audit trail kept."""
    transport = httpx.ASGITransport(app=harness.app, client=(peer, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.post(
            "/auth/login",
            json={"username": "nobody", "password": "wrong-password-123"},
            headers=headers or {},
        )
    assert response.status_code == 401, response.text
    async with harness.services.engine.connect() as conn:
        rows = (
            await conn.execute(
                select(audit_entries.c.action, audit_entries.c.entry).order_by(
                    audit_entries.c.seq.desc()
                )
            )
        ).all()
    for action, entry in rows:
        if "login" in action:
            return json.loads(entry).get("source")
    raise AssertionError(f"no login entry among {[a for a, _ in rows]}")


@pytest.fixture
async def proxied(harness_factory: Any, settings_factory: Any) -> Any:
    return await harness_factory(
        settings_factory(trusted_proxies=["10.0.0.0/8", "192.0.2.10", "fd00::/8"])
    )


async def test_untrusted_peer_forwarded_for_is_ignored(proxied: Any) -> None:
    source = await _source_of_failed_login(proxied, PEER_UNTRUSTED, {"X-Forwarded-For": CLIENT})
    assert source == PEER_UNTRUSTED


async def test_without_trusted_proxies_nothing_forwarded_is_believed(
    harness_factory: Any, settings_factory: Any
) -> None:
    harness = await harness_factory(settings_factory())
    source = await _source_of_failed_login(harness, "10.1.1.1", {"X-Forwarded-For": CLIENT})
    assert source == "10.1.1.1"


async def test_trusted_proxy_address_is_believed(proxied: Any) -> None:
    source = await _source_of_failed_login(proxied, "192.0.2.10", {"X-Forwarded-For": CLIENT})
    assert source == CLIENT


async def test_trusted_proxy_network_cidr_is_believed(proxied: Any) -> None:
    # The peer is inside 10.0.0.0/8; so is the inner proxy that appended itself.
    source = await _source_of_failed_login(
        proxied, "10.20.30.40", {"X-Forwarded-For": f"{CLIENT}, 10.9.9.9"}
    )
    assert source == CLIENT


async def test_ipv6_network_is_matched(proxied: Any) -> None:
    source = await _source_of_failed_login(proxied, "fd00::5", {"X-Forwarded-For": CLIENT})
    assert source == CLIENT


async def test_client_written_entries_left_of_the_proxy_are_not_believed(proxied: Any) -> None:
    # The client sent "X-Forwarded-For: 1.1.1.1"; our proxy appended the address it saw.
    source = await _source_of_failed_login(
        proxied, "10.0.0.2", {"X-Forwarded-For": f"1.1.1.1, {CLIENT}"}
    )
    assert source == CLIENT


@pytest.mark.parametrize(
    "header", ["not-an-address", f"{CLIENT}:443", f"{CLIENT}, , x", "unknown", f"[{CLIENT}]"]
)
async def test_malformed_forwarded_for_falls_back_to_the_peer(proxied: Any, header: str) -> None:
    source = await _source_of_failed_login(proxied, "10.0.0.2", {"X-Forwarded-For": header})
    assert source == "10.0.0.2"


async def test_trusted_peer_without_header_is_the_client(proxied: Any) -> None:
    assert await _source_of_failed_login(proxied, "10.0.0.2") == "10.0.0.2"


def _request(peer: str, headers: dict[str, str], scheme: str = "http") -> Request:
    return Request(
        {
            "type": "http",
            "scheme": scheme,
            "method": "GET",
            "path": "/",
            "query_string": b"",
            "server": ("carevault", 8000),
            "client": (peer, 1234),
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        }
    )


@pytest.mark.parametrize(
    ("peer", "header", "expected"),
    [
        ("10.0.0.2", "https", "https"),
        ("10.0.0.2", "http, https", "https"),  # the right-most: set by the proxy next to us
        ("10.0.0.2", "gopher", "http"),
        (PEER_UNTRUSTED, "https", "http"),
    ],
)
def test_forwarded_proto_only_from_a_trusted_proxy(peer: str, header: str, expected: str) -> None:
    request = _request(peer, {"X-Forwarded-Proto": header})
    assert client_scheme(request, ["10.0.0.0/8"]) == expected


def test_ipv4_mapped_peer_matches_an_ipv4_network() -> None:
    request = _request("::ffff:10.0.0.2", {"X-Forwarded-For": CLIENT})
    assert client_address(request, ["10.0.0.0/8"]) == CLIENT


@pytest.mark.parametrize("value", ["proxy.internal", "10.0.0.0/33", "10.0.0.1,nonsense"])
def test_settings_refuse_entries_that_are_not_addresses_or_networks(value: str) -> None:
    with pytest.raises(ValueError, match="trusted_proxies"):
        Settings(trusted_proxies=value)


def test_settings_read_a_comma_separated_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAREVAULT_TRUSTED_PROXIES", "10.0.0.0/8, 192.0.2.10")
    assert Settings().trusted_proxies == ["10.0.0.0/8", "192.0.2.10"]


# --- production: TLS here, or a proxy in front ---------------------------------------------------


def _production(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "environment": "production",
        "data_dir": tmp_path,
        "issuer_url": "https://ehr.example.org",
    }
    values.update(overrides)
    return Settings(**values)


def test_production_without_tls_on_a_public_address_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnsafeSettingsError, match="without TLS"):
        check_production(_production(tmp_path), bind_host="93.184.216.34", demo_accounts=0)
    # Trusted proxies do not make a public or wildcard bind safe: plain HTTP would be
    # reachable there without the proxy.
    for host in ("93.184.216.34", "0.0.0.0", "::"):  # noqa: S104 - the point of the test
        with pytest.raises(UnsafeSettingsError, match="without TLS"):
            check_production(
                _production(tmp_path, trusted_proxies=["10.0.0.1"]),
                bind_host=host,
                demo_accounts=0,
            )


def test_production_behind_a_trusted_proxy_may_bind_a_private_address(tmp_path: Path) -> None:
    settings = _production(tmp_path, trusted_proxies=["10.0.0.1"])
    check_production(settings, bind_host="10.0.0.20", demo_accounts=0)
    check_production(settings, bind_host="127.0.0.1", demo_accounts=0)
    # ... but not without naming the proxy.
    with pytest.raises(UnsafeSettingsError, match="CAREVAULT_TRUSTED_PROXIES"):
        check_production(_production(tmp_path), bind_host="10.0.0.20", demo_accounts=0)


def test_production_with_tls_may_bind_anywhere(tmp_path: Path) -> None:
    settings = _production(tmp_path, tls_cert=tmp_path / "c.pem", tls_key=tmp_path / "k.pem")
    check_production(settings, bind_host="0.0.0.0", demo_accounts=0)  # noqa: S104
