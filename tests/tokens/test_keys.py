"""Signing key set: rotation keeps old keys for exactly as long as their tokens can live."""

from __future__ import annotations

import json
import os

import pytest

from carevault.config import Settings
from carevault.runtime import ensure_key_material
from carevault.tokens.access import AccessTokenIssuer, AccessTokenVerifier, InvalidTokenError
from carevault.tokens.keys import FILE_NAME, KeyRing, SigningKey, rotate_keyset


@pytest.fixture
def keyed(tmp_path):
    settings = Settings(
        data_dir=tmp_path, issuer_url="http://testserver", key_reload_interval_seconds=0.05
    )
    ensure_key_material(settings)
    return settings


def _issue(settings, keyring, now):
    issuer = AccessTokenIssuer(settings, keyring, clock=lambda: now)
    token, _ = issuer.issue(
        subject="u",
        session_id="s",
        client_id="c",
        scope="openid",
        roles=["nurse"],
        amr=["pwd"],
        auth_time=int(now),
    )
    return token


def test_jwks_publishes_current_and_next_without_private_parts(keyed):
    ring = KeyRing(keyed.keys_dir)
    keys = ring.jwks(0)["keys"]
    assert len(keys) == 2
    for key in keys:
        assert {"kid", "use", "alg", "kty", "crv", "x", "y"} <= set(key)
        assert "d" not in key and key["use"] == "sig" and key["alg"] == "ES256"


def test_rotation_promotes_next_and_retires_old_after_token_lifetime(keyed):
    ring = KeyRing(keyed.keys_dir)
    now = 1_800_000_000.0
    old_kid = ring.current.kid
    next_kid = [k["kid"] for k in ring.jwks(now)["keys"] if k["kid"] != old_kid][0]
    old_token = _issue(keyed, ring, now)

    retire = keyed.access_token_ttl_seconds + keyed.clock_leeway_seconds
    new_kid = rotate_keyset(keyed.keys_dir, "ES256", retire, now)
    assert new_kid == next_kid
    ring.refresh(force=True)
    assert ring.current.kid == new_kid
    assert {k["kid"] for k in ring.jwks(now)["keys"]} >= {old_kid, new_kid}

    # Until its tokens can no longer be alive, the old key still verifies them.
    verifier = AccessTokenVerifier(keyed, ring, clock=lambda: now + 300)
    assert verifier.verify(old_token).sub == "u"
    # After that the key is gone from verification and from the JWKS.
    late = now + retire + 1
    assert ring.verification_key(old_kid, late) is None
    assert old_kid not in {k["kid"] for k in ring.jwks(late)["keys"]}
    with pytest.raises(InvalidTokenError):
        AccessTokenVerifier(keyed, ring, clock=lambda: late).verify(old_token)


def test_second_rotation_drops_retired_keys_from_file(keyed):
    now = 1_800_000_000.0
    first = KeyRing(keyed.keys_dir).current.kid
    rotate_keyset(keyed.keys_dir, "ES256", 100, now)
    rotate_keyset(keyed.keys_dir, "ES256", 100, now + 1000)
    data = json.loads((keyed.keys_dir / FILE_NAME).read_text())
    assert first not in {k["kid"] for k in data["keys"]}
    assert sorted(k["state"] for k in data["keys"]) == ["current", "next", "previous"]
    assert os.stat(keyed.keys_dir / FILE_NAME).st_mode & 0o777 == 0o600


def test_key_whose_type_does_not_match_its_alg_is_refused(keyed):
    data = json.loads((keyed.keys_dir / FILE_NAME).read_text())
    record = data["keys"][0]
    record["alg"] = "RS256"  # an EC key claiming to be RSA: alg/key-type binding must hold
    with pytest.raises(ValueError):
        SigningKey.from_record(record)


def test_other_process_rotation_is_picked_up(keyed):
    ring = KeyRing(keyed.keys_dir, reload_interval=0.0)
    before = ring.current.kid
    rotate_keyset(keyed.keys_dir, "ES256", 100)
    assert ring.current.kid != before


@pytest.mark.parametrize("alg,kty", [("EdDSA", "OKP"), ("PS256", "RSA"), ("RS256", "RSA")])
def test_other_algorithms_sign_and_verify(tmp_path, alg, kty):
    settings = Settings(data_dir=tmp_path, signing_algorithm=alg, issuer_url="http://t")
    ensure_key_material(settings)
    ring = KeyRing(settings.keys_dir)
    assert ring.current.alg == alg and ring.current.key.key_type == kty
    token = _issue(settings, ring, 1_800_000_000.0)
    claims = AccessTokenVerifier(settings, ring, clock=lambda: 1_800_000_010.0).verify(token)
    assert claims.roles == ("nurse",)


def test_verified_token_cache_rechecks_time_and_key_retirement(keyed):
    """A token served from the verified cache must still expire and die with its key."""
    now = [1_800_000_000.0]
    ring = KeyRing(keyed.keys_dir, reload_interval=0.0)
    verifier = AccessTokenVerifier(keyed, ring, clock=lambda: now[0])
    token = _issue(keyed, ring, now[0])
    assert verifier.verify(token).sub == "u"
    assert verifier.verify(token).sub == "u"  # cached

    retire = 100
    rotate_keyset(keyed.keys_dir, "ES256", retire, now[0])
    assert verifier.verify(token).sub == "u"  # old key still trusted: re-verified, fine
    now[0] += retire + 1  # key retired before the token expired
    with pytest.raises(InvalidTokenError):
        verifier.verify(token)

    fresh = _issue(keyed, ring, now[0])
    assert verifier.verify(fresh).sub == "u"
    now[0] += keyed.access_token_ttl_seconds + keyed.clock_leeway_seconds + 1
    with pytest.raises(InvalidTokenError):
        verifier.verify(fresh)  # expired while cached


def test_tampered_copy_of_a_cached_token_is_still_refused(keyed):
    ring = KeyRing(keyed.keys_dir)
    verifier = AccessTokenVerifier(keyed, ring)
    import time

    token = _issue(keyed, ring, time.time())
    verifier.verify(token)
    header, payload, signature = token.split(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    with pytest.raises(InvalidTokenError):
        verifier.verify(".".join((header, payload, flipped)))


def test_ec_jwks_keep_leading_zero_octets() -> None:
    """RFC 7518 §6.2.1.2: x, y (and d) are full-size octet strings. joserfc drops leading zero
    octets (about one P-256 key in 100); PyJWT then refuses the published key."""
    import base64
    import json

    import jwt
    from joserfc import jwk

    from carevault.tokens.keys import full_size_jwk, generate_key

    def octets(value: str) -> int:
        return len(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))

    short = 0
    for _ in range(1500):
        key = generate_key("ES256")
        raw = key.as_dict(private=True)
        short += any(octets(raw[c]) != 32 for c in "xyd")
        fixed = full_size_jwk(raw)
        assert all(octets(fixed[c]) == 32 for c in "xyd")
        # the same key: it round-trips through joserfc and PyJWT reads it
        assert full_size_jwk(jwk.import_key(fixed).as_dict(private=True)) == fixed
        public = jwt.algorithms.ECAlgorithm.from_jwk(json.dumps(fixed)).public_key()
        assert public.public_numbers().x == int.from_bytes(
            base64.urlsafe_b64decode(fixed["x"] + "=" * (-len(fixed["x"]) % 4)), "big"
        )
    assert short > 0  # the case this guards against did occur in the sample
    assert full_size_jwk({"kty": "OKP", "crv": "Ed25519", "x": "AA"}) == {
        "kty": "OKP",
        "crv": "Ed25519",
        "x": "AA",
    }
