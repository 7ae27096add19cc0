"""DPoP proof verification (RFC 9449 §4.3): accepted proofs, and one attack per check.

Every attack proof is otherwise valid (signed by the key in its own header, right method, URL,
time, hash, nonce), so each test fails if the check it names is removed. Proofs are built with
joserfc: `sign` signs any header and payload text (duplicate members, forbidden parameters,
`none`, HMAC) with joserfc's own algorithm models, so attacks are real signatures, not parse
errors. Most tests run on an in-memory replay double (the store is not under test; it records
what the verifier asks); the replay tests run on SQLite, PostgreSQL and Redis with two verifiers
on two separate caches, as two workers would.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import socket
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwk, jws
from joserfc.util import urlsafe_b64decode, urlsafe_b64encode

from carevault.oauth import dpop
from carevault.oauth.dpop import (
    INVALID_DPOP_PROOF,
    MAX_PROOF_BYTES,
    USE_DPOP_NONCE,
    DpopError,
    DpopProof,
    DpopVerifier,
    access_token_hash,
    jwk_thumbprint,
    normalize_htu,
)
from carevault.oauth.replay import RedisReplayCache, ReplayCacheUnavailable
from carevault.tokens.keys import full_size_jwk
from tests.conftest import FakeClock
from tests.oauth import test_replay as replay_tests

# The store fixtures of test_replay.py (module-scoped: one migrated store per backend here too).
replay_store = replay_tests.replay_store
make_cache = replay_tests.make_cache

URL = "https://api.carevault.test/oauth/token"
SECRET = b"k" * 32
OTHER_SECRET = b"j" * 32
ACCESS_TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ0ZXN0In0.c2lnbmF0dXJl"
VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "wycheproof"

# RFC 7638 §3.1: the example key and its SHA-256 thumbprint.
RFC7638_KEY = {
    "kty": "RSA",
    "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_B"
    "JECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_F"
    "DW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4"
    "vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
    "e": "AQAB",
    "alg": "RS256",
    "kid": "2011-04-29",
}
RFC7638_THUMBPRINT = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
WINDOW_START = 300.0 * 5_666_667  # a multiple of the default 300 s nonce window

pytestmark = pytest.mark.filterwarnings("ignore:EdDSA is deprecated:joserfc.errors.SecurityWarning")


# --- building proofs ------------------------------------------------------------------------------

_KEY_SPECS = {
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "EdDSA": ("OKP", "Ed25519"),
    "Ed25519": ("OKP", "Ed25519"),
    "Ed448": ("OKP", "Ed448"),
    "PS256": ("RSA", 2048),
    "RS256": ("RSA", 2048),
}


@functools.cache
def private_key(name: str) -> Any:
    """One joserfc private key per name (generated once per test run)."""
    kty, size_or_crv = _KEY_SPECS[name.split("#")[0]]
    return jwk.generate_key(kty, size_or_crv, private=True)  # type: ignore[call-overload]


def public_jwk(key: Any) -> dict[str, Any]:
    """The public JWK a client sends (EC coordinates at full size, as RFC 7518 requires)."""
    return full_size_jwk(key.as_dict(private=False))


def rfc7638(public: dict[str, Any]) -> str:
    """RFC 7638 §3, written out: SHA-256 of the required members, sorted, no whitespace. (Not
    joserfc's `thumbprint()`: it hashes EC coordinates without their leading zero octets.)"""
    required = {
        "EC": ("crv", "kty", "x", "y"),
        "OKP": ("crv", "kty", "x"),
        "RSA": ("e", "kty", "n"),
    }
    members = {name: public[name] for name in required[public["kty"]]}
    canonical = json.dumps(members, separators=(",", ":"), sort_keys=True).encode()
    return b64(hashlib.sha256(canonical).digest()).rstrip("=")


def b64(data: bytes | str) -> str:
    return urlsafe_b64encode(data.encode() if isinstance(data, str) else data).decode()


def compact(value: dict[str, Any] | str) -> str:
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def sign(header: dict[str, Any] | str, payload: dict[str, Any] | str, key: Any, alg: str) -> str:
    """A JWS compact serialization of exactly this header and payload text, signed with
    joserfc's model of `alg` (any registered algorithm: the verifier must do the refusing)."""
    signing_input = f"{b64(compact(header))}.{b64(compact(payload))}"
    model = jws.JWSRegistry.algorithms[alg]
    signature = model.sign(signing_input.encode(), key) if alg != "none" else b""
    return f"{signing_input}.{b64(signature)}"


DROP = object()


def make_claims(clock: FakeClock, **overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "jti": uuid.uuid4().hex,
        "htm": "POST",
        "htu": URL,
        "iat": int(clock.now),
    }
    for name, value in overrides.items():
        if value is DROP:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def make_proof(
    clock: FakeClock,
    alg: str = "ES256",
    *,
    key_name: str | None = None,
    header: dict[str, Any] | None = None,
    **claims: Any,
) -> str:
    """A valid proof unless told otherwise: `header` entries replace (DROP removes) the
    defaults, keyword arguments replace (DROP removes) claims."""
    key = private_key(key_name or alg)
    values: dict[str, Any] = {"typ": "dpop+jwt", "alg": alg, "jwk": public_jwk(key)}
    for name, value in (header or {}).items():
        if value is DROP:
            values.pop(name, None)
        else:
            values[name] = value
    return sign(values, make_claims(clock, **claims), key, alg)


class MemoryReplay:
    """In-memory replay double that honours expiry with the test clock and records its calls."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.seen: dict[str, float] = {}
        self.calls: list[tuple[str, float]] = []

    async def first_use(self, key: str, expires_at: float) -> bool:
        self.calls.append((key, expires_at))
        if key in self.seen and self.seen[key] > self._clock():
            return False
        self.seen[key] = expires_at
        return True

    async def close(self) -> None:
        return None


class DownReplay:
    async def first_use(self, key: str, expires_at: float) -> bool:
        raise ReplayCacheUnavailable("down")

    async def close(self) -> None:
        return None


@pytest.fixture
def replay(clock: FakeClock) -> MemoryReplay:
    return MemoryReplay(clock)


@pytest.fixture
def verifier(replay: MemoryReplay, clock: FakeClock) -> DpopVerifier:
    return DpopVerifier(replay, SECRET, clock=clock)


async def refused(
    verifier: DpopVerifier,
    proofs: list[str] | str,
    error: str = INVALID_DPOP_PROOF,
    **options: Any,
) -> DpopError:
    values = [proofs] if isinstance(proofs, str) else proofs
    options.setdefault("method", "POST")
    options.setdefault("url", URL)
    with pytest.raises(DpopError) as caught:
        await verifier.verify(values, **options)
    assert caught.value.error == error, caught.value.description
    return caught.value


async def accepted(verifier: DpopVerifier, proof: str, **options: Any) -> DpopProof:
    options.setdefault("method", "POST")
    options.setdefault("url", URL)
    return await verifier.verify([proof], **options)


# --- accepted proofs ------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES256", "EdDSA", "PS256", "RS256"])
async def test_valid_proof_accepted(
    verifier: DpopVerifier, replay: MemoryReplay, clock: FakeClock, alg: str
) -> None:
    key = private_key(alg)
    jti = uuid.uuid4().hex
    result = await accepted(verifier, make_proof(clock, alg, jti=jti))
    expected_jwk = public_jwk(key)
    assert result.jkt == jwk_thumbprint(expected_jwk) == rfc7638(expected_jwk)
    assert result.jti == jti
    assert result.iat == int(clock.now)
    assert result.jwk == expected_jwk  # public members only
    assert not result.jwk.keys() & dpop.PRIVATE_KEY_MEMBERS
    # The replay cache is asked once, last, for (key, jti), until the proof is too old anyway.
    assert replay.calls == [(f"dpop:{result.jkt}:{jti}", int(clock.now) + 60 + 5)]


async def test_configured_algorithms(clock: FakeClock, replay: MemoryReplay) -> None:
    """RFC 9864's "Ed25519" and ES384 when configured; never an algorithm left out."""
    verifier = DpopVerifier(replay, SECRET, clock=clock, algorithms=("Ed25519", "ES384"))
    assert verifier.algorithms == ("Ed25519", "ES384")
    await accepted(verifier, make_proof(clock, "Ed25519"))
    await accepted(verifier, make_proof(clock, "ES384"))
    for alg in ("ES256", "EdDSA", "RS256"):
        await refused(verifier, make_proof(clock, alg))
    default = DpopVerifier(replay, SECRET, clock=clock)
    await refused(default, make_proof(clock, "Ed25519"))  # not a default algorithm


@pytest.mark.parametrize(
    "algorithms", [("none",), ("HS256",), ("ES256", "HS512"), (), ("ES256K",), ("Ed448",)]
)
def test_only_asymmetric_algorithms_can_be_configured(algorithms: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        DpopVerifier(MemoryReplay(FakeClock()), SECRET, algorithms=algorithms)


@pytest.mark.parametrize("secret", [b"", b"short", b"x" * 31, "k" * 32])
def test_nonce_secret_must_be_32_bytes(secret: Any) -> None:
    with pytest.raises(ValueError):
        DpopVerifier(MemoryReplay(FakeClock()), secret)


async def test_kid_is_ignored(verifier: DpopVerifier, clock: FakeClock) -> None:
    """A `kid` names nothing here: the key is the proof's own `jwk`."""
    result = await accepted(verifier, make_proof(clock, header={"kid": "some-other-key"}))
    assert result.jkt == rfc7638(public_jwk(private_key("ES256")))


async def test_jwk_extra_members_allowed_but_not_returned(
    verifier: DpopVerifier, clock: FakeClock
) -> None:
    key = private_key("ES256")
    extra = {**public_jwk(key), "alg": "ES256", "use": "sig", "kid": "k1", "ext": True}
    result = await accepted(verifier, make_proof(clock, header={"jwk": extra}))
    assert result.jwk == public_jwk(key)
    assert result.jkt == rfc7638(public_jwk(key))


# --- thumbprints ----------------------------------------------------------------------------------


def test_thumbprint_rfc7638_example() -> None:
    assert jwk_thumbprint(RFC7638_KEY) == RFC7638_THUMBPRINT
    public = {k: v for k, v in RFC7638_KEY.items() if k in ("kty", "n", "e")}
    assert jwk_thumbprint(public) == RFC7638_THUMBPRINT  # alg and kid are not hashed


def test_thumbprint_same_for_private_and_public_halves() -> None:
    key = private_key("ES256")
    assert jwk_thumbprint(key.as_dict(private=True)) == jwk_thumbprint(public_jwk(key))


def test_thumbprint_of_garbage_is_value_error() -> None:
    for value in ({}, {"kty": "EC"}, {"kty": "RSA", "n": 5, "e": "AQAB"}, {"kty": "nope"}):
        with pytest.raises(ValueError):
            jwk_thumbprint(value)  # type: ignore[arg-type]


# --- htm / htu ------------------------------------------------------------------------------------


@pytest.mark.parametrize("htm", ["GET", "post", "Post", "PUT", "", "POST "])
async def test_wrong_htm(verifier: DpopVerifier, clock: FakeClock, htm: str) -> None:
    await refused(verifier, make_proof(clock, htm=htm))


@pytest.mark.parametrize(
    "htu",
    [
        "https://api.carevault.test/oauth/authorize",  # other path
        "https://api.carevault.test/oauth/token/",  # trailing slash is another path
        "https://api.carevault.test/OAUTH/token",  # paths are case-sensitive
        "https://api.carevault.test/oauth",
        "https://evil.example/oauth/token",  # other host
        "https://api.carevault.test.evil.example/oauth/token",
        "https://evil.example/https://api.carevault.test/oauth/token",
        "http://api.carevault.test/oauth/token",  # other scheme
        "https://api.carevault.test:8443/oauth/token",  # other port
        "https://api.carevault.test:80/oauth/token",
        "https://user@api.carevault.test/oauth/token",  # user information
        "https://evil.example@api.carevault.test/oauth/token",
        "https://api.carevault.test/oauth/%74oken%2F",
        "/oauth/token",  # not absolute
        "api.carevault.test/oauth/token",
        "",
    ],
)
async def test_wrong_htu(verifier: DpopVerifier, clock: FakeClock, htu: str) -> None:
    await refused(verifier, make_proof(clock, htu=htu))


@pytest.mark.parametrize(
    ("htu", "url"),
    [
        (URL + "?client_id=x&state=1", URL),  # query ignored in the proof
        (URL, URL + "?grant_type=refresh_token"),  # ... and in the request
        (URL + "?a=1#frag", URL + "?b=2"),
        (URL + "#fragment", URL),
        ("HTTPS://API.CAREVAULT.TEST/oauth/token", URL),  # scheme and host case
        ("https://api.carevault.test:443/oauth/token", URL),  # default port
        ("http://api.carevault.test:80/fhir", "http://API.carevault.test/fhir"),
        ("https://api.carevault.test/oauth/%74oken", URL),  # unreserved percent-encoding
        ("https://api.carevault.test/oauth/./x/../token", URL),  # dot segments
        ("https://api.carevault.test", "https://api.carevault.test/"),  # empty path
        ("https://[::1]:8443/oauth/token?x", "https://[::1]:8443/oauth/token"),
    ],
)
async def test_htu_normalised(verifier: DpopVerifier, clock: FakeClock, htu: str, url: str) -> None:
    await accepted(verifier, make_proof(clock, htu=htu), url=url)


def test_normalize_htu_values() -> None:
    assert normalize_htu("HTTPS://Example.COM:443/a/b?q#f") == "https://example.com/a/b"
    assert normalize_htu("http://example.com:8080") == "http://example.com:8080/"
    assert normalize_htu("https://example.com/a/%2f%7e") == "https://example.com/a/%2F~"
    assert normalize_htu("https://example.com/a/../../b") == "https://example.com/b"
    assert normalize_htu("https://[::1]/x") == "https://[::1]/x"
    for bad in (
        "ftp://example.com/x",
        "https://",
        "https:///path",
        "https://example.com:99999/x",
        "https://example.com:port/x",
        "https://u:p@example.com/",
        "https://example.com/a b",
        "https://example.com/\u00e9",
        "https://example.com/\n",
        "javascript:alert(1)",
        None,
        7,
    ):
        assert normalize_htu(bad) is None, bad  # type: ignore[arg-type]


async def test_htu_and_htm_must_be_strings(verifier: DpopVerifier, clock: FakeClock) -> None:
    await refused(verifier, make_proof(clock, htu=[URL]))
    await refused(verifier, make_proof(clock, htu=DROP))
    await refused(verifier, make_proof(clock, htm=["POST"]))
    await refused(verifier, make_proof(clock, htm=DROP))


async def test_request_url_that_cannot_be_normalised_is_refused(
    verifier: DpopVerifier, clock: FakeClock
) -> None:
    """Fail closed on a caller's odd URL too: never compare raw strings instead."""
    await refused(verifier, make_proof(clock, htu="ftp://x/y"), url="ftp://x/y")


# --- iat and jti ----------------------------------------------------------------------------------


async def test_old_iat(verifier: DpopVerifier, clock: FakeClock) -> None:
    oldest = int(clock.now) - 60 - 5
    if oldest < clock.now - 65:  # clock.now has a fraction: the boundary is the next second
        oldest += 1
    await accepted(verifier, make_proof(clock, iat=oldest))
    await refused(verifier, make_proof(clock, iat=oldest - 1))
    await refused(verifier, make_proof(clock, iat=int(clock.now) - 3600))
    await refused(verifier, make_proof(clock, iat=0))


async def test_future_iat(verifier: DpopVerifier, clock: FakeClock) -> None:
    await accepted(verifier, make_proof(clock, iat=int(clock.now) + 5))
    await refused(verifier, make_proof(clock, iat=int(clock.now) + 6))
    await refused(verifier, make_proof(clock, iat=int(clock.now) + 3600))


@pytest.mark.parametrize("iat", [DROP, "now", None, True, 1.5, [1]])
async def test_iat_must_be_an_integer(verifier: DpopVerifier, clock: FakeClock, iat: Any) -> None:
    await refused(verifier, make_proof(clock, iat=iat))
    await refused(verifier, make_proof(clock, iat=float(int(clock.now))))


async def test_max_age_and_leeway_are_configurable(replay: MemoryReplay, clock: FakeClock) -> None:
    verifier = DpopVerifier(replay, SECRET, clock=clock, max_age=10, leeway=0)
    await accepted(verifier, make_proof(clock, iat=int(clock.now) - 9))
    await refused(verifier, make_proof(clock, iat=int(clock.now) - 11))
    await refused(verifier, make_proof(clock, iat=int(clock.now) + 1))


@pytest.mark.parametrize("jti", [DROP, "", 12345, None, ["a"], "x" * 257])
async def test_jti_required_and_bounded(verifier: DpopVerifier, clock: FakeClock, jti: Any) -> None:
    await refused(verifier, make_proof(clock, jti=jti))


async def test_jti_at_its_length_limit(verifier: DpopVerifier, clock: FakeClock) -> None:
    await accepted(verifier, make_proof(clock, jti="x" * 256))


# --- replay ---------------------------------------------------------------------------------------


async def test_replayed_jti_same_verifier(verifier: DpopVerifier, clock: FakeClock) -> None:
    proof = make_proof(clock)
    await accepted(verifier, proof)
    error = await refused(verifier, proof)
    assert error.description == "DPoP proof replayed"
    # A new proof with the same jti (and the same key) is a replay too, even if otherwise new.
    jti = uuid.uuid4().hex
    await accepted(verifier, make_proof(clock, jti=jti, htm="POST"))
    clock.advance(1)
    await refused(verifier, make_proof(clock, jti=jti, htm="POST"))


async def test_same_jti_other_keys_are_different_proofs(
    verifier: DpopVerifier, clock: FakeClock
) -> None:
    """The replay key is the pair (key thumbprint, jti): one client cannot burn another's."""
    jti = uuid.uuid4().hex
    for alg in ("ES256", "EdDSA", "RS256"):
        await accepted(verifier, make_proof(clock, alg, jti=jti))


async def test_replay_refused_for_the_whole_acceptance_window(
    verifier: DpopVerifier, clock: FakeClock
) -> None:
    """The cache remembers a proof at least as long as its iat is acceptable: at every second
    after first use the same proof is refused, as a replay or as too old."""
    proof = make_proof(clock)
    await accepted(verifier, proof)
    for _ in range(75):
        clock.advance(1)
        await refused(verifier, proof)


async def test_invalid_proofs_never_reach_the_replay_cache(
    verifier: DpopVerifier, replay: MemoryReplay, clock: FakeClock
) -> None:
    """Nothing is recorded for a refused proof (a bad proof cannot burn a jti), and nothing
    is recorded for a proof refused for its nonce (the client retries with the same jti)."""
    jti = uuid.uuid4().hex
    await refused(verifier, make_proof(clock, jti=jti, htm="GET"))
    await refused(verifier, make_proof(clock, jti=jti), USE_DPOP_NONCE, require_nonce=True)
    await refused(verifier, make_proof(clock, jti=jti), access_token=ACCESS_TOKEN)
    assert replay.calls == []
    await accepted(verifier, make_proof(clock, jti=jti))
    assert len(replay.calls) == 1


async def test_replay_cache_unavailable_propagates(clock: FakeClock) -> None:
    verifier = DpopVerifier(DownReplay(), SECRET, clock=clock)
    with pytest.raises(ReplayCacheUnavailable):
        await accepted(verifier, make_proof(clock))
    redis_cache = RedisReplayCache(replay_tests.UNREACHABLE_REDIS, clock)
    try:
        verifier = DpopVerifier(redis_cache, SECRET, clock=clock)
        with pytest.raises(ReplayCacheUnavailable):
            await accepted(verifier, make_proof(clock))
    finally:
        await redis_cache.close()


async def test_replayed_jti_across_verifiers_sharing_a_store(
    make_cache: Any, clock: FakeClock
) -> None:
    """Two workers, each with its own verifier and its own cache instance on one store."""
    worker_a = DpopVerifier(make_cache(clock), SECRET, clock=clock)
    worker_b = DpopVerifier(make_cache(clock), SECRET, clock=clock)
    proof = make_proof(clock)
    await accepted(worker_a, proof)
    assert (await refused(worker_b, proof)).description == "DPoP proof replayed"
    assert (await refused(worker_a, proof)).description == "DPoP proof replayed"
    other = make_proof(clock, "EdDSA")
    await accepted(worker_b, other)
    await refused(worker_a, other)


async def test_one_proof_raced_on_two_workers_is_accepted_once(
    make_cache: Any, clock: FakeClock
) -> None:
    workers = [DpopVerifier(make_cache(clock), SECRET, clock=clock) for _ in range(2)]
    proof = make_proof(clock, "EdDSA")
    results = await asyncio.gather(
        *(accepted(workers[i % 2], proof) for i in range(20)), return_exceptions=True
    )
    assert sum(isinstance(r, DpopProof) for r in results) == 1
    errors = [r for r in results if not isinstance(r, DpopProof)]
    assert all(isinstance(e, DpopError) and e.description == "DPoP proof replayed" for e in errors)


# --- access token hash (ath) and key binding ------------------------------------------------------


async def test_ath(verifier: DpopVerifier, clock: FakeClock) -> None:
    good = access_token_hash(ACCESS_TOKEN)
    await accepted(verifier, make_proof(clock, ath=good), access_token=ACCESS_TOKEN)
    await refused(verifier, make_proof(clock), access_token=ACCESS_TOKEN)  # missing
    for wrong in (
        access_token_hash(ACCESS_TOKEN + "x"),  # another token's hash
        ACCESS_TOKEN,  # the token itself
        good + "=",  # padded
        good.upper(),
        "",
        None,
        [good],
    ):
        await refused(verifier, make_proof(clock, ath=wrong), access_token=ACCESS_TOKEN)


def test_access_token_hash_value() -> None:
    # RFC 9449 §7.1's example token and its ath.
    token = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"
    assert access_token_hash(token) == "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"


async def test_expected_jkt(verifier: DpopVerifier, clock: FakeClock) -> None:
    bound = private_key("ES256").thumbprint()
    await accepted(verifier, make_proof(clock), expected_jkt=bound)
    # The attacker's own key, correctly used, is still not the key the token is bound to.
    attacker = make_proof(clock, key_name="ES256#attacker")
    await refused(verifier, attacker, expected_jkt=bound)
    await refused(verifier, make_proof(clock), expected_jkt=bound[:-1])
    await refused(verifier, make_proof(clock), expected_jkt=private_key("EdDSA").thumbprint())


# --- algorithms and keys --------------------------------------------------------------------------


async def test_alg_none(verifier: DpopVerifier, clock: FakeClock) -> None:
    key = private_key("ES256")
    header = {"typ": "dpop+jwt", "alg": "none", "jwk": public_jwk(key)}
    await refused(verifier, sign(header, make_claims(clock), None, "none"))
    for alg in ("None", "NONE", "", None):
        header = {"typ": "dpop+jwt", "alg": alg, "jwk": public_jwk(key)}
        await refused(verifier, sign(header, make_claims(clock), None, "none"))


@pytest.mark.filterwarnings("ignore::joserfc.errors.SecurityWarning")
@pytest.mark.parametrize("alg", ["HS256", "HS384", "HS512"])
async def test_hmac_with_the_public_jwk_as_secret(
    verifier: DpopVerifier, clock: FakeClock, alg: str
) -> None:
    """Key confusion: an HMAC keyed with the public key's bytes, which anyone has."""
    for name in ("ES256", "RS256"):
        public = public_jwk(private_key(name))
        pem = private_key(name).as_pem(private=False)
        for secret in (compact(public).encode(), pem):
            header = {"typ": "dpop+jwt", "alg": alg, "jwk": public}
            token = sign(header, make_claims(clock), jwk.OctKey.import_key(secret), alg)
            await refused(verifier, token)


async def test_symmetric_jwk(verifier: DpopVerifier, clock: FakeClock) -> None:
    secret = jwk.OctKey.generate_key(256)
    header = {"typ": "dpop+jwt", "alg": "HS256", "jwk": secret.as_dict()}
    await refused(verifier, sign(header, make_claims(clock), secret, "HS256"))
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": secret.as_dict()}
    await refused(verifier, sign(header, make_claims(clock), private_key("ES256"), "ES256"))


@pytest.mark.parametrize(
    ("alg", "member"),
    [
        ("ES256", "d"),
        ("EdDSA", "d"),
        ("RS256", "d"),
        ("RS256", "p"),
        ("RS256", "q"),
        ("RS256", "dp"),
        ("RS256", "dq"),
        ("RS256", "qi"),
        ("ES256", "k"),
        ("RS256", "k"),
    ],
)
async def test_private_key_in_header_jwk(
    verifier: DpopVerifier, clock: FakeClock, alg: str, member: str
) -> None:
    """A proof whose `jwk` leaks private material is refused, whichever member it is."""
    key = private_key(alg)
    private = key.as_dict(private=True)
    leaked = {**public_jwk(key), member: private.get(member, "c2VjcmV0")}
    await refused(verifier, make_proof(clock, alg, header={"jwk": leaked}))


async def test_whole_private_jwk_in_header(verifier: DpopVerifier, clock: FakeClock) -> None:
    for alg in ("ES256", "EdDSA", "PS256"):
        key = private_key(alg)
        await refused(verifier, make_proof(clock, alg, header={"jwk": key.as_dict(private=True)}))


@pytest.mark.parametrize(
    ("alg", "key_name", "sign_alg"),
    [
        ("ES256", "RS256", "RS256"),  # RSA key under an EC algorithm
        ("RS256", "ES256", "ES256"),  # EC key under an RSA algorithm
        ("EdDSA", "ES256", "ES256"),
        ("ES256", "EdDSA", "EdDSA"),
        ("ES256", "ES384", "ES384"),  # P-384 key under ES256
        ("EdDSA", "Ed448", "EdDSA"),  # Ed448 is not the curve EdDSA means here
        ("PS256", "RS256", "RS256"),  # PKCS#1 v1.5 signature labelled PSS
        ("RS256", "PS256", "PS256"),
    ],
)
async def test_key_type_must_match_alg(
    verifier: DpopVerifier, clock: FakeClock, alg: str, key_name: str, sign_alg: str
) -> None:
    key = private_key(key_name)
    header = {"typ": "dpop+jwt", "alg": alg, "jwk": public_jwk(key)}
    await refused(verifier, sign(header, make_claims(clock), key, sign_alg))


async def test_jwk_naming_another_alg_or_use(verifier: DpopVerifier, clock: FakeClock) -> None:
    key = private_key("PS256")
    for extra in ({"alg": "RS256"}, {"use": "enc"}, {"key_ops": ["encrypt"]}):
        jwk_value = {**public_jwk(key), **extra}
        await refused(verifier, make_proof(clock, "PS256", header={"jwk": jwk_value}))


@pytest.mark.parametrize("jwk_value", [DROP, None, "a-key", [], {}, {"kty": "EC"}])
async def test_jwk_missing_or_malformed(
    verifier: DpopVerifier, clock: FakeClock, jwk_value: Any
) -> None:
    await refused(verifier, make_proof(clock, header={"jwk": jwk_value}))


async def test_ec_point_not_on_curve(verifier: DpopVerifier, clock: FakeClock) -> None:
    public = public_jwk(private_key("ES256"))
    moved = {**public, "y": public["x"]}
    await refused(verifier, make_proof(clock, header={"jwk": moved}))


def _strip_leading_zero_key(crv: str) -> tuple[Any, dict[str, Any]]:
    """A P-256 key with a coordinate whose first octet is zero, and its JWK with that octet
    dropped (what joserfc itself writes for such a key)."""
    for _ in range(5000):
        key = jwk.ECKey.generate_key(crv, private=True)
        short = key.as_dict(private=False)
        if short != full_size_jwk(short):
            return key, short
    raise AssertionError("no key with a leading zero octet found")


async def test_non_canonical_ec_jwk(verifier: DpopVerifier, clock: FakeClock) -> None:
    """RFC 7518 §6.2.1.2: coordinates at full size. Another spelling of the same key would be
    another thumbprint (another replay namespace, another cnf.jkt)."""
    key, short = _strip_leading_zero_key("P-256")
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": short}
    await refused(verifier, sign(header, make_claims(clock), key, "ES256"))
    header["jwk"] = full_size_jwk(short)
    result = await accepted(verifier, sign(header, make_claims(clock), key, "ES256"))
    assert result.jwk == full_size_jwk(short)


async def test_non_canonical_rsa_jwk(verifier: DpopVerifier, clock: FakeClock) -> None:
    key = private_key("RS256")
    public = public_jwk(key)
    padded_n = b64(b"\x00" + urlsafe_b64decode(public["n"].encode()))
    await refused(verifier, make_proof(clock, "RS256", header={"jwk": {**public, "n": padded_n}}))
    padded_e = b64(b"\x00" + urlsafe_b64decode(public["e"].encode()))
    await refused(verifier, make_proof(clock, "RS256", header={"jwk": {**public, "e": padded_e}}))


@pytest.mark.filterwarnings("ignore:Key size should be:joserfc.errors.SecurityWarning")
async def test_small_rsa_key(verifier: DpopVerifier, clock: FakeClock) -> None:
    key = jwk.RSAKey.generate_key(1024, private=True)
    header = {"typ": "dpop+jwt", "alg": "RS256", "jwk": public_jwk(key)}
    await refused(verifier, sign(header, make_claims(clock), key, "RS256"))


# --- header ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "typ", [DROP, "JWT", "jwt", "at+jwt", "DPOP+JWT", "application/dpop+jwt", "dpop", None, 1]
)
async def test_typ_missing_or_wrong(verifier: DpopVerifier, clock: FakeClock, typ: Any) -> None:
    await refused(verifier, make_proof(clock, header={"typ": typ}))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("jku", "https://attacker.example/jwks.json"),
        ("x5u", "https://attacker.example/cert.pem"),
        ("x5c", ["MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"]),
        ("x5t#S256", "x"),
        ("crit", ["exp"]),
        ("b64", True),
        ("cty", "json"),
        ("zip", "DEF"),
        ("nonce", "in-the-header"),
    ],
)
async def test_header_parameters_outside_the_allowlist(
    verifier: DpopVerifier,
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    value: Any,
) -> None:
    """Keys come from the proof's own `jwk` only: `jku` and `x5u` are refused, never fetched."""
    connections: list[Any] = []

    def no_network(*args: Any, **kwargs: Any) -> Any:
        connections.append(args)
        raise AssertionError("the verifier tried to open a connection")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    await refused(verifier, make_proof(clock, header={name: value}))
    assert connections == []


# --- signature ------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["ES256", "EdDSA", "RS256"])
async def test_payload_tampered(verifier: DpopVerifier, clock: FakeClock, alg: str) -> None:
    proof = make_proof(clock, alg, htu="https://api.carevault.test/fhir/Patient")
    header, _, signature = proof.split(".")
    forged_payload = b64(compact(make_claims(clock)))  # htu now the token endpoint
    await refused(verifier, f"{header}.{forged_payload}.{signature}")


async def test_header_tampered(verifier: DpopVerifier, clock: FakeClock) -> None:
    proof = make_proof(clock, header={"kid": "a"})
    _, payload, signature = proof.split(".")
    key = private_key("ES256")
    other_header = b64(compact({"typ": "dpop+jwt", "alg": "ES256", "jwk": public_jwk(key)}))
    await refused(verifier, f"{other_header}.{payload}.{signature}")


@pytest.mark.parametrize("alg", ["ES256", "EdDSA", "PS256"])
async def test_signed_by_another_key(verifier: DpopVerifier, clock: FakeClock, alg: str) -> None:
    """The header names the victim's public key; the attacker signs with their own."""
    victim = public_jwk(private_key(alg))
    header = {"typ": "dpop+jwt", "alg": alg, "jwk": victim}
    await refused(verifier, sign(header, make_claims(clock), private_key(f"{alg}#attacker"), alg))


async def test_signature_mangled(verifier: DpopVerifier, clock: FakeClock) -> None:
    header, payload, signature = make_proof(clock).split(".")
    raw = urlsafe_b64decode(signature.encode())
    for mangled in (
        b64(raw[:-1]),
        b64(raw + b"\x00"),
        b64(bytes([raw[0] ^ 1]) + raw[1:]),
        b64(raw[32:] + raw[:32]),
        "",
        signature + "A",
    ):
        await refused(verifier, f"{header}.{payload}.{mangled}")


# --- shape of the header value --------------------------------------------------------------------


async def test_two_dpop_headers(verifier: DpopVerifier, clock: FakeClock) -> None:
    first = make_proof(clock)
    await refused(verifier, [first, first])
    await refused(verifier, [first, make_proof(clock)])
    await refused(verifier, [])
    with pytest.raises(DpopError):
        await verifier.verify(first, method="POST", url=URL)  # type: ignore[arg-type]
    await accepted(verifier, first)  # none of the above consumed it


@pytest.mark.parametrize(
    "value",
    ["", "a.b", "a.b.c.d", "..", "not-a-jws", "e30.e30.", "é.é.é", " " * 10, None, 12],
)
async def test_malformed_values(verifier: DpopVerifier, value: Any) -> None:
    await refused(verifier, [value])


async def test_size_bound(verifier: DpopVerifier, clock: FakeClock) -> None:
    await accepted(verifier, make_proof(clock, pad="A" * 4000))
    big = make_proof(clock, pad="A" * MAX_PROOF_BYTES)
    assert len(big) > MAX_PROOF_BYTES
    assert (await refused(verifier, big)).description == "DPoP proof too large"


async def test_proof_with_whitespace_is_refused(verifier: DpopVerifier, clock: FakeClock) -> None:
    proof = make_proof(clock)
    for value in (" " + proof, proof + "\n", proof.replace(".", ". ", 1)):
        await refused(verifier, value)


# --- duplicate member names -----------------------------------------------------------------------


def _object_text(*members: tuple[str, Any]) -> str:
    """A JSON object text with exactly these members, duplicates included."""
    return "{" + ",".join(f"{json.dumps(k)}:{compact_value(v)}" for k, v in members) + "}"


def compact_value(value: Any) -> str:
    return value if isinstance(value, RawJson) else json.dumps(value, separators=(",", ":"))


class RawJson(str):
    pass


async def test_duplicate_header_members(verifier: DpopVerifier, clock: FakeClock) -> None:
    key = private_key("ES256")
    public = public_jwk(key)
    claims = make_claims(clock)
    for header in (
        _object_text(("typ", "dpop+jwt"), ("alg", "HS256"), ("jwk", public), ("alg", "ES256")),
        _object_text(("typ", "JWT"), ("alg", "ES256"), ("jwk", public), ("typ", "dpop+jwt")),
        _object_text(
            ("typ", "dpop+jwt"), ("alg", "ES256"), ("jwk", {"kty": "oct"}), ("jwk", public)
        ),
        _object_text(
            ("typ", "dpop+jwt"),
            ("alg", "ES256"),
            ("jwk", RawJson(_object_text(*public.items(), ("x", public["x"])))),
        ),
    ):
        await refused(verifier, sign(header, claims, key, "ES256"))


async def test_duplicate_claims(verifier: DpopVerifier, clock: FakeClock) -> None:
    key = private_key("ES256")
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": public_jwk(key)}
    now = int(clock.now)
    for payload in (
        _object_text(
            ("jti", uuid.uuid4().hex),
            ("htm", "POST"),
            ("htu", "https://evil.example/"),
            ("htu", URL),
            ("iat", now),
        ),
        _object_text(
            ("jti", uuid.uuid4().hex), ("jti", "x"), ("htm", "POST"), ("htu", URL), ("iat", now)
        ),
        _object_text(
            ("jti", uuid.uuid4().hex), ("htm", "GET"), ("htm", "POST"), ("htu", URL), ("iat", now)
        ),
    ):
        await refused(verifier, sign(header, payload, key, "ES256"))


async def test_claims_must_be_an_object(verifier: DpopVerifier, clock: FakeClock) -> None:
    key = private_key("ES256")
    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": public_jwk(key)}
    for payload in ("[]", '"text"', "1", "null", "{", "not json", "\xff"):
        await refused(verifier, sign(header, payload, key, "ES256"))


# --- nonces ---------------------------------------------------------------------------------------


async def test_nonce_required_and_missing(verifier: DpopVerifier, clock: FakeClock) -> None:
    error = await refused(verifier, make_proof(clock), USE_DPOP_NONCE, require_nonce=True)
    assert error.error == "use_dpop_nonce"


async def test_valid_nonce_accepted(verifier: DpopVerifier, clock: FakeClock) -> None:
    nonce = verifier.nonce()
    await accepted(verifier, make_proof(clock, nonce=nonce), require_nonce=True)
    await accepted(verifier, make_proof(clock, nonce=nonce))  # not required, but valid


async def test_nonce_from_the_previous_window_accepted(
    verifier: DpopVerifier, clock: FakeClock
) -> None:
    clock.now = WINDOW_START + 100
    nonce = verifier.nonce()
    clock.advance(300)  # the next window
    assert verifier.nonce() != nonce
    assert verifier.nonce_valid(nonce)
    await accepted(verifier, make_proof(clock, nonce=nonce), require_nonce=True)


async def test_stale_nonce(verifier: DpopVerifier, clock: FakeClock) -> None:
    clock.now = WINDOW_START + 100
    nonce = verifier.nonce()
    clock.now = WINDOW_START + 600  # two windows later
    assert not verifier.nonce_valid(nonce)
    await refused(verifier, make_proof(clock, nonce=nonce), USE_DPOP_NONCE, require_nonce=True)
    # A stale nonce is refused even where none is required: it is not silently ignored.
    await refused(verifier, make_proof(clock, nonce=nonce), USE_DPOP_NONCE)


async def test_next_window_nonce_within_leeway(verifier: DpopVerifier, clock: FakeClock) -> None:
    """A worker whose clock is a little ahead already issues the next window's nonce."""
    clock.now = WINDOW_START + 300 - 3  # 3 s before the next window
    ahead = DpopVerifier(MemoryReplay(clock), SECRET, clock=lambda: clock.now + 4)
    assert ahead.nonce() != verifier.nonce()
    assert verifier.nonce_valid(ahead.nonce())
    far_ahead = DpopVerifier(MemoryReplay(clock), SECRET, clock=lambda: clock.now + 303)
    assert not verifier.nonce_valid(far_ahead.nonce())


async def test_forged_nonce(verifier: DpopVerifier, clock: FakeClock) -> None:
    other_server = DpopVerifier(MemoryReplay(clock), OTHER_SECRET, clock=clock)
    genuine = verifier.nonce()
    raw = urlsafe_b64decode(genuine.encode())
    for forged in (
        other_server.nonce(),  # right shape, wrong secret
        b64(bytes([raw[0] ^ 1]) + raw[1:]),
        genuine[:-1],
        genuine + "A",
        genuine.upper(),
        "",
        "x" * 300,
        12345,
        None,
        [genuine],
        "\u00e9" * 43,
    ):
        await refused(verifier, make_proof(clock, nonce=forged), USE_DPOP_NONCE, require_nonce=True)
        await refused(verifier, make_proof(clock, nonce=forged), USE_DPOP_NONCE)


def test_nonces_are_stateless_and_shared(clock: FakeClock) -> None:
    """Two workers with the same secret issue and accept the same nonces; another secret's
    nonce differs, and every window's nonce differs."""
    worker_a = DpopVerifier(MemoryReplay(clock), SECRET, clock=clock)
    worker_b = DpopVerifier(MemoryReplay(clock), SECRET, clock=clock)
    stranger = DpopVerifier(MemoryReplay(clock), OTHER_SECRET, clock=clock)
    assert worker_a.nonce() == worker_b.nonce() != stranger.nonce()
    assert worker_b.nonce_valid(worker_a.nonce())
    seen = set()
    for _ in range(10):
        seen.add(worker_a.nonce())
        clock.advance(300)
    assert len(seen) == 10
    assert all(len(n) == 43 for n in seen)  # base64url of an HMAC-SHA256


async def test_nonce_window_is_configurable(clock: FakeClock) -> None:
    verifier = DpopVerifier(MemoryReplay(clock), SECRET, clock=clock, nonce_window=10, leeway=0)
    clock.now = WINDOW_START
    nonce = verifier.nonce()
    clock.advance(19)
    assert verifier.nonce_valid(nonce)
    clock.advance(1)
    assert not verifier.nonce_valid(nonce)


# --- errors say nothing about the request ---------------------------------------------------------


async def test_error_descriptions_carry_no_request_values(
    verifier: DpopVerifier, clock: FakeClock
) -> None:
    secret_marker = "PHI-Jane-Doe-1970"
    proofs = [
        make_proof(clock, htu=f"https://api.carevault.test/{secret_marker}"),
        make_proof(clock, htm=secret_marker),
        make_proof(clock, jti=secret_marker * 20),
        make_proof(clock, nonce=secret_marker),
        make_proof(clock, header={"typ": secret_marker}),
        make_proof(clock, header={"jku": f"https://{secret_marker}.example/"}),
    ]
    for proof in proofs:
        with pytest.raises(DpopError) as caught:
            await verifier.verify(
                [proof], method="POST", url=URL, access_token=f"token-{secret_marker}"
            )
        assert caught.value.error in (INVALID_DPOP_PROOF, USE_DPOP_NONCE)
        text = f"{caught.value} {caught.value.description!r} {caught.value.args!r}"
        assert secret_marker not in text
        assert proof not in text


# --- Project Wycheproof JWK vectors ---------------------------------------------------------------


def _wycheproof_key_cases() -> list[Any]:
    """Each public key of json_web_key_test.json, as the `jwk` of a DPoP proof signed with the
    vector's private key (or, when that cannot be imported, a fresh key of the same type)."""
    data = json.loads((VECTORS / "json_web_key_test.json").read_text())
    cases = []
    for group in data["testGroups"]:
        if "public" not in group:
            continue  # symmetric keys and key sets: no DPoP proof key to take from them
        public_keys = group["public"].get("keys", [group["public"]])
        private_keys = group["private"].get("keys", [group["private"]])
        for test in group["tests"]:
            for public in public_keys:
                marks = []
                if group["comment"] == "jws_rsa_roca_key":
                    marks.append(
                        pytest.mark.xfail(
                            strict=True,
                            reason="no ROCA fingerprint check: a client's weak key endangers "
                            "only that client's own tokens",
                        )
                    )
                cases.append(
                    pytest.param(
                        public,
                        private_keys[0],
                        test["result"],
                        id=f"tc{test['tcId']}-{group['comment']}-{test['comment']}",
                        marks=marks,
                    )
                )
    return cases


@pytest.mark.filterwarnings("ignore::joserfc.errors.SecurityWarning")
@pytest.mark.parametrize(("public", "private", "result"), _wycheproof_key_cases())
async def test_wycheproof_keys_as_proof_keys(
    verifier: DpopVerifier,
    clock: FakeClock,
    public: dict[str, Any],
    private: dict[str, Any],
    result: str,
) -> None:
    alg = {"RSA": "RS256", "EC": "ES256"}[private["kty"]]
    bare = {k: v for k, v in private.items() if k not in ("alg", "use", "kid", "key_ops")}
    try:
        signing_key = jwk.import_key(bare)
    except Exception:
        signing_key = private_key(alg)
    header = {"typ": "dpop+jwt", "alg": alg, "jwk": public}
    try:
        proof = sign(header, make_claims(clock), signing_key, alg)
    except Exception:
        proof = sign(header, make_claims(clock), private_key(alg), alg)
    if result == "valid":
        await accepted(verifier, proof)
    else:
        await refused(verifier, proof)
