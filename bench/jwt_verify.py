"""Micro benchmark: what one access-token check costs, against the bare signature check.

The product path is `AccessTokenVerifier.verify(token)` followed by
`await revocations.is_revoked(claims)`, on services built by `build_services` over a real,
migrated SQLite data directory (the `DatabaseRevocationList`, holding a few unrelated live
revocations). The baseline is one `cryptography` verification of the same token's signing input
and signature, prepared up front (for ES256 the JOSE r||s signature converted to DER with
`encode_dss_signature`): the least any correct verifier must spend. The raw verifier lives here,
in the benchmark, never in product code.

Loops are timeit-like: `iterations` calls per measurement with the garbage collector off,
`repeat` measurements per variant interleaved round-robin, best (minimum) reported.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import itertools
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

ALGORITHMS = ("ES256", "EdDSA", "PS256", "RS256")


def b64url_decode(segment: bytes | str) -> bytes:
    if isinstance(segment, str):
        segment = segment.encode("ascii")
    return base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))


def split_token(token: str) -> tuple[bytes, bytes]:
    """(signing input, JOSE signature bytes) of a compact JWS."""
    raw = token.encode("ascii")
    signing_input, _, signature = raw.rpartition(b".")
    return signing_input, b64url_decode(signature)


def jose_to_der(signature: bytes, size: int = 32) -> bytes:
    """JOSE ECDSA signature (r || s, fixed width) -> DER, as `cryptography` wants it."""
    if len(signature) != 2 * size:
        raise ValueError("wrong ECDSA signature length")
    r = int.from_bytes(signature[:size], "big")
    s = int.from_bytes(signature[size:], "big")
    return encode_dss_signature(r, s)


@dataclass(frozen=True)
class RawVerifier:
    """The baseline: one `cryptography` verify call for the token's algorithm."""

    alg: str
    public_key: Any

    def prepare(self, signature: bytes) -> bytes:
        return jose_to_der(signature) if self.alg == "ES256" else signature

    def check(self, signing_input: bytes, prepared_signature: bytes) -> bool:
        key = self.public_key
        try:
            if self.alg == "ES256":
                key.verify(prepared_signature, signing_input, _ECDSA_SHA256)
            elif self.alg == "EdDSA":
                key.verify(prepared_signature, signing_input)
            elif self.alg == "PS256":
                key.verify(prepared_signature, signing_input, _PSS, _SHA256)
            elif self.alg == "RS256":
                key.verify(prepared_signature, signing_input, _PKCS1, _SHA256)
            else:
                raise ValueError(f"unsupported algorithm {self.alg}")
        except InvalidSignature:
            return False
        return True

    def check_token(self, token: str) -> bool:
        """Signature-only check of a compact JWS (no header or claims checks at all)."""
        try:
            signing_input, signature = split_token(token)
            return self.check(signing_input, self.prepare(signature))
        except ValueError:
            return False


_SHA256 = hashes.SHA256()
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())
_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=hashes.SHA256.digest_size)
_PKCS1 = padding.PKCS1v15()


class MicroFixture:
    """A migrated SQLite data directory, its services, and one access token to verify."""

    def __init__(self, algorithm: str = "ES256", unrelated_revocations: int = 100) -> None:
        self.algorithm = algorithm
        self.unrelated_revocations = unrelated_revocations
        self.root = Path(tempfile.mkdtemp(prefix="carevault-bench-micro-"))
        self.services: Any = None
        self.token = ""
        self.raw: RawVerifier | None = None

    async def start(self) -> None:
        from carevault.config import Settings
        from carevault.db import migrate
        from carevault.runtime import build_services, ensure_key_material

        settings = Settings(
            data_dir=self.root / "var",
            database_url=None,
            redis_url=None,
            signing_algorithm=self.algorithm,
            issuer_url="http://127.0.0.1:8000",
            access_token_ttl_seconds=3600,
        )
        ensure_key_material(settings)
        migrate.upgrade(settings)
        self.services = build_services(settings)
        await self.services.start()
        now = time.time()
        for _ in range(self.unrelated_revocations // 2):
            await self.services.revocations.revoke_token(uuid.uuid4().hex, now + 3600)
            await self.services.revocations.revoke_sessions([uuid.uuid4().hex], now + 3600)
        self.token, _ = self.services.issuer.issue(
            subject=str(uuid.uuid4()),
            session_id=uuid.uuid4().hex,
            client_id="carevault-bench",
            scope="openid",
            roles=["physician"],
            amr=["pwd"],
            auth_time=int(now),
        )
        key = self.services.keyring.current
        self.raw = RawVerifier(key.alg, key.key.public_key)
        from carevault.tokens.access import AccessTokenVerifier

        self.first_use_verifier = AccessTokenVerifier(
            settings, self.services.keyring, cache_entries=0
        )

    async def full_check(self, token: str) -> bool:
        """The product path: verify, then the revocation check. True when accepted."""
        claims = self.services.verifier.verify(token)
        return not await self.services.revocations.is_revoked(claims)

    async def full_check_first_use(self, token: str) -> bool:
        """The same path for a token the verifier has not seen yet (its cache off)."""
        claims = self.first_use_verifier.verify(token)
        return not await self.services.revocations.is_revoked(claims)

    async def close(self) -> None:
        if self.services is not None:
            await self.services.close()
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Variant:
    name: str
    description: str
    sync: Callable[[], object] | None = None
    coro: Callable[[], Awaitable[object]] | None = None
    samples_us: list[float] = field(default_factory=list)

    @property
    def best_us(self) -> float:
        return min(self.samples_us)

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples_us)


def _time_sync(fn: Callable[[], object], n: int) -> float:
    loop = itertools.repeat(None, n)
    start = time.perf_counter()
    for _ in loop:
        fn()
    return time.perf_counter() - start


async def _time_async(fn: Callable[[], Awaitable[object]], n: int) -> float:
    loop = itertools.repeat(None, n)
    start = time.perf_counter()
    for _ in loop:
        await fn()
    return time.perf_counter() - start


def build_variants(fixture: MicroFixture) -> list[Variant]:
    from joserfc import jws

    assert fixture.raw is not None
    token = fixture.token
    raw = fixture.raw
    signing_input, signature = split_token(token)
    prepared = raw.prepare(signature)
    key = fixture.services.keyring.current
    registry = jws.JWSRegistry(algorithms=[key.alg])
    token_bytes = token.encode("ascii")

    def joserfc_only() -> bool:
        obj = jws.extract_compact(token_bytes, registry=registry)
        return jws.validate_compact(obj, key.key, registry=registry)

    return [
        Variant(
            "raw",
            f"cryptography {key.alg} verify of the prepared signature (baseline)",
            sync=lambda: raw.check(signing_input, prepared),
        ),
        Variant(
            "joserfc",
            "joserfc extract_compact + validate_compact only (breakdown)",
            sync=joserfc_only,
        ),
        Variant(
            "verify",
            "AccessTokenVerifier.verify, first use of a token (breakdown)",
            sync=lambda: fixture.first_use_verifier.verify(token),
        ),
        Variant(
            "full",
            "first use: AccessTokenVerifier.verify (signature checked) + "
            "await DatabaseRevocationList.is_revoked",
            coro=lambda: fixture.full_check_first_use(token),
        ),
        Variant(
            "full-repeat",
            "repeat use: verify served from the verified-token cache "
            "(time, key retirement re-checked) + is_revoked",
            coro=lambda: fixture.full_check(token),
        ),
    ]


async def run_micro(
    algorithm: str, iterations: int, repeat: int, advance: Callable[[int], None] | None = None
) -> dict[str, Any]:
    """Time every variant; `advance(n)` is told of each n iterations done (progress bar)."""
    fixture = MicroFixture(algorithm)
    await fixture.start()
    try:
        assert fixture.raw is not None
        token = fixture.token
        if not fixture.raw.check_token(token) or not await fixture.full_check(token):
            raise RuntimeError("the benchmark token does not verify")
        variants = build_variants(fixture)
        warm = max(50, iterations // 10)
        for variant in variants:  # warm caches and the keyring's reload check
            if variant.sync:
                _time_sync(variant.sync, warm)
            else:
                assert variant.coro is not None
                await _time_async(variant.coro, warm)
        gc_was_enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        try:
            for round_ in range(repeat):
                shift = round_ % len(variants)  # rotate the order: no variant always goes first
                for variant in variants[shift:] + variants[:shift]:
                    if variant.sync:
                        seconds = _time_sync(variant.sync, iterations)
                    else:
                        assert variant.coro is not None
                        seconds = await _time_async(variant.coro, iterations)
                    variant.samples_us.append(seconds / iterations * 1e6)
                    if advance:
                        advance(iterations)
        finally:
            if gc_was_enabled:
                gc.enable()
        baseline = variants[0].best_us
        return {
            "algorithm": algorithm,
            "iterations": iterations,
            "repeat": repeat,
            "token_bytes": len(fixture.token),
            "variants": {
                v.name: {
                    "description": v.description,
                    "best_us": round(v.best_us, 3),
                    "median_us": round(v.median_us, 3),
                    "samples_us": [round(s, 3) for s in v.samples_us],
                    "ratio_to_raw": round(v.best_us / baseline, 3),
                }
                for v in variants
            },
        }
    finally:
        await fixture.close()


def variant_count() -> int:
    return 4


def run_micro_sync(
    algorithm: str, iterations: int, repeat: int, advance: Callable[[int], None] | None = None
) -> dict[str, Any]:
    return asyncio.run(run_micro(algorithm, iterations, repeat, advance))
