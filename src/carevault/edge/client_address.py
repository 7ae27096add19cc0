"""The client's address and scheme: the peer's own, or the forwarded ones only when the peer is a
trusted proxy (`trusted_proxies`: addresses or CIDR networks, e.g. "10.0.0.0/8").

uvicorn's own forwarded-header handling stays off (`proxy_headers=False`): anyone can send
X-Forwarded-For, so the app believes it only from a proxy it was told about. Behind a chain of
proxies the client is the right-most X-Forwarded-For address that is not one of ours (each
proxy appends the address it received the request from, so the entries to the left of it are
whatever the client wrote). A header that does not parse is ignored as a whole: the peer
stays the client.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Sequence

from starlette.requests import HTTPConnection

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@functools.lru_cache(maxsize=16)
def _networks(trusted_proxies: tuple[str, ...]) -> tuple[Network, ...]:
    # Settings validated every entry at start-up (config.py); strict=False accepts "10.0.0.1/8".
    return tuple(ipaddress.ip_network(item, strict=False) for item in trusted_proxies)


def address_in(address: str | None, networks: Sequence[str]) -> bool:
    """Whether `address` is in one of `networks` (addresses or CIDR networks, validated at
    start-up); an IPv4-mapped IPv6 address counts as its IPv4 address."""
    if not address or not networks:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in _networks(tuple(networks)))


def is_trusted(address: str | None, trusted_proxies: Sequence[str]) -> bool:
    """Whether `address` (a peer or a forwarded hop) is one of our proxies."""
    return address_in(address, trusted_proxies)


def client_address(request: HTTPConnection, trusted_proxies: Sequence[str]) -> str | None:
    peer = request.client.host if request.client else None
    if not is_trusted(peer, trusted_proxies):
        return peer
    forwarded = request.headers.get("x-forwarded-for", "")
    hops = [part.strip() for part in forwarded.split(",")] if forwarded else []
    try:
        addresses = [str(ipaddress.ip_address(hop)) for hop in hops]
    except ValueError:
        return peer
    # Walk from the right: the last address not added by one of our proxies is the client.
    for candidate in reversed(addresses):
        if not is_trusted(candidate, trusted_proxies):
            return candidate
    return addresses[0] if addresses else peer


def client_scheme(request: HTTPConnection, trusted_proxies: Sequence[str]) -> str:
    """ "https" or "http" as the client used it: X-Forwarded-Proto from a trusted proxy (the
    scheme the proxy was reached by), else the scheme of this connection."""
    scheme = request.url.scheme
    peer = request.client.host if request.client else None
    if is_trusted(peer, trusted_proxies):
        # One value per hop when proxies append: the right-most was set by the proxy that
        # talks to us (trusted); values to its left may come from the client.
        forwarded = request.headers.get("x-forwarded-proto", "").split(",")[-1].strip().lower()
        if forwarded in ("http", "https"):
            return forwarded
    return scheme
