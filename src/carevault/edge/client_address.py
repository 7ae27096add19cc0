"""The client's address: the peer, or a forwarded address only when the peer is a trusted proxy."""

from __future__ import annotations

import ipaddress

from starlette.requests import Request


def client_address(request: Request, trusted_proxies: list[str]) -> str | None:
    peer = request.client.host if request.client else None
    if peer is None or not trusted_proxies or peer not in trusted_proxies:
        return peer
    forwarded = request.headers.get("x-forwarded-for", "")
    # Walk from the right: the last address not added by one of our proxies is the client.
    for candidate in reversed([p.strip() for p in forwarded.split(",") if p.strip()]):
        try:
            ipaddress.ip_address(candidate)
        except ValueError:
            return peer
        if candidate not in trusted_proxies:
            return candidate
    return peer
