"""Forged and invalid access tokens, sent to GET /auth/me over HTTP: every one gets the same 401.

Each row of the table starts from a real token (POST /auth/login) and breaks exactly one
property. Rows that need a valid signature are signed with the server's own private key (read
from keys/signing.json) by the test's own code, so the property under test is the only thing
wrong; `test_server_signed_control_is_accepted` shows the same code making an acceptable token.
The second half calls `AccessTokenVerifier.verify` directly and checks which layer refuses.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from carevault.config import Settings
from carevault.tokens.access import (
    AccessTokenIssuer,
    AccessTokenVerifier,
    InvalidTokenError,
    verify_jws_signature,
)
from carevault.tokens.keys import KeyRing, create_keyset, rotate_keyset
from tests.attacks.conftest import DROP, USERNAME, Victim, new_id
from tests.attacks.jose_forge import (
    attacker_certificate_der,
    attacker_ec_key,
    attacker_rsa_key,
    b64url,
    decode_part,
    hmac_sign,
    public_jwk,
    segment,
    server_key,
    server_keys,
    sign,
    split,
)
from tests.conftest import FakeClock

GENERIC_401 = {
    "type": "about:blank",
    "title": "Unauthorized",
    "status": 401,
    "detail": "Authentication is required.",
}

Forgery = Callable[[Victim], Awaitable[str]]
CASES: list[Any] = []


def case(case_id: str) -> Callable[[Forgery], Forgery]:
    def register(forge: Forgery) -> Forgery:
        CASES.append(pytest.param(forge, id=case_id))
        return forge

    return register


def assert_invalid_token(response: Any) -> None:
    assert response.status_code == 401, response.text
    challenge = response.headers.get("www-authenticate", "")
    assert challenge.startswith("Bearer "), challenge
    assert 'error="invalid_token"' in challenge, challenge
    assert "error_description" not in challenge, challenge
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.headers.get("cache-control") == "no-store"
    assert response.json() == GENERIC_401  # the reason is logged, never sent


# --- algorithm and key confusion --------------------------------------------------------------


@case("alg-none-empty-signature")
async def _(v: Victim) -> str:
    _, payload, _ = split(v.token)
    return f"{segment({**v.header, 'alg': 'none'})}.{payload}."


@case("alg-NONE-uppercase")
async def _(v: Victim) -> str:
    _, payload, _ = split(v.token)
    return f"{segment({**v.header, 'alg': 'NONE'})}.{payload}."


@case("alg-none-keeping-original-signature")
async def _(v: Victim) -> str:
    _, payload, signature = split(v.token)
    return f"{segment({**v.header, 'alg': 'none'})}.{payload}.{signature}"


@case("hs256-keyed-with-server-public-key-pem")
async def _(v: Victim) -> str:
    return hmac_sign({**v.header, "alg": "HS256"}, v.claims, v.key.public_pem())


@case("hs256-keyed-with-server-public-jwk-json")
async def _(v: Victim) -> str:
    jwks = (await v.harness.client.get("/.well-known/jwks.json")).json()
    (published,) = [k for k in jwks["keys"] if k["kid"] == v.key.kid]
    secret = json.dumps(published, separators=(",", ":")).encode()
    return hmac_sign({**v.header, "alg": "HS256"}, v.claims, secret)


@case("hs256-keyed-with-jwks-document-bytes")
async def _(v: Victim) -> str:
    secret = (await v.harness.client.get("/.well-known/jwks.json")).content
    return hmac_sign({**v.header, "alg": "HS256"}, v.claims, secret)


@case("rs256-attacker-rsa-key-with-server-kid")
async def _(v: Victim) -> str:
    return sign({**v.header, "alg": "RS256"}, v.claims, "RS256", attacker_rsa_key())


@case("fresh-ec-key-never-ours-with-server-kid")
async def _(v: Victim) -> str:
    return sign(v.header, v.claims, "ES256", attacker_ec_key())


@case("kid-of-next-key-signed-by-current-key")
async def _(v: Victim) -> str:
    nxt = server_key(v.settings.keys_dir, "next")
    return v.server_token(kid=nxt.kid)


@case("es256-psychic-signature-all-zero-CVE-2022-21449")
async def _(v: Victim) -> str:
    header, payload, _ = split(v.token)
    return f"{header}.{payload}.{b64url(bytes(64))}"


# --- header parameters that would make the verifier trust an attacker's key -----------------


@case("jku-pointing-at-attacker-jwks")
async def _(v: Victim) -> str:
    header = {**v.header, "jku": "https://attacker.example/.well-known/jwks.json"}
    return sign(header, v.claims, "ES256", attacker_ec_key())


@case("x5u-pointing-at-attacker-certificate")
async def _(v: Victim) -> str:
    header = {**v.header, "x5u": "https://attacker.example/cert.pem"}
    return sign(header, v.claims, "ES256", attacker_ec_key())


@case("jwk-header-embedding-attacker-key")
async def _(v: Victim) -> str:
    embedded = {**public_jwk(attacker_ec_key(), "ES256"), "kid": v.key.kid}
    return sign({**v.header, "jwk": embedded}, v.claims, "ES256", attacker_ec_key())


@case("x5c-header-with-attacker-self-signed-certificate")
async def _(v: Victim) -> str:
    chain = [base64.b64encode(attacker_certificate_der()).decode("ascii")]
    return sign({**v.header, "x5c": chain}, v.claims, "ES256", attacker_ec_key())


@case("crit-header-with-unknown-extension-server-signed")
async def _(v: Victim) -> str:
    return v.server_token(crit=["urn:example:policy"], **{"urn:example:policy": "audit-only"})


@case("b64-false-header-server-signed")
async def _(v: Victim) -> str:
    return v.server_token(b64=False, crit=["b64"])


@case("typ-JWT-instead-of-at+jwt-server-signed")
async def _(v: Victim) -> str:
    return v.server_token(typ="JWT")


@case("typ-missing-server-signed")
async def _(v: Victim) -> str:
    return v.server_token(typ=DROP)


@case("unknown-kid-server-signed")
async def _(v: Victim) -> str:
    return v.server_token(kid="attacker-chosen-kid")


@case("no-kid-server-signed")
async def _(v: Victim) -> str:
    return v.server_token(kid=DROP)


@case("duplicate-header-member-typ-server-signed")
async def _(v: Victim) -> str:
    # A parser that keeps the last member would see typ at+jwt; the first says JWT.
    header = f'{{"alg":"{v.key.alg}","kid":"{v.key.kid}","typ":"JWT","typ":"at+jwt"}}'
    return sign(header, v.claims, v.key.alg, v.key.private_key)


# --- claims ---------------------------------------------------------------------------------


@case("tampered-payload-roles-admin-original-signature")
async def _(v: Victim) -> str:
    header, _, signature = split(v.token)
    return f"{header}.{segment(v.claims_with(roles=['admin']))}.{signature}"


@case("expired-real-token-after-fake-clock-advance")
async def _(v: Victim) -> str:
    s = v.settings
    v.clock.advance(s.access_token_ttl_seconds + s.clock_leeway_seconds + 1)
    return v.token


@case("expired-server-signed")
async def _(v: Victim) -> str:
    now = int(v.clock.now)
    leeway = v.settings.clock_leeway_seconds
    exp = now - leeway - 1
    return v.server_token(v.claims_with(iat=exp - 600, nbf=exp - 600, exp=exp))


@case("nbf-in-the-future-server-signed")
async def _(v: Victim) -> str:
    return v.server_token(v.fresh_claims(nbf=int(v.clock.now) + 300))


@case("iat-in-the-future-server-signed")
async def _(v: Victim) -> str:
    later = int(v.clock.now) + 300
    return v.server_token(v.fresh_claims(iat=later, exp=later + 600))


@case("lifetime-over-one-hour-server-signed")
async def _(v: Victim) -> str:
    return v.server_token(v.fresh_claims(exp=int(v.clock.now) + 7200))


@case("wrong-aud-server-signed")
async def _(v: Victim) -> str:
    return v.server_token(v.claims_with(aud="https://fhir.elsewhere.example"))


@case("aud-list-without-us-server-signed")
async def _(v: Victim) -> str:
    return v.server_token(v.claims_with(aud=["billing-api", "https://other.example"]))


@case("wrong-iss-server-signed")
async def _(v: Victim) -> str:
    return v.server_token(v.claims_with(iss="https://attacker.example"))


@case("missing-jti-server-signed")
async def _(v: Victim) -> str:
    return v.server_token(v.claims_with(jti=DROP))


@case("exp-not-an-integer-server-signed")
async def _(v: Victim) -> str:
    return v.server_token(v.claims_with(exp=v.claims["exp"] + 0.5))


@case("duplicate-sub-claim-server-signed")
async def _(v: Victim) -> str:
    # Two "sub" members; a parser that keeps the last one sees the real user and would accept.
    text = json.dumps(v.claims, separators=(",", ":"))
    assert text.startswith("{") and f'"sub":"{v.user_id}"' in text
    return v.server_token(f'{{"sub":"{new_id()}",' + text[1:])


# --- key lifetime and revocation ----------------------------------------------------------


def _retire_after(v: Victim) -> int:
    return v.settings.access_token_ttl_seconds + v.settings.clock_leeway_seconds


def _rotate(v: Victim) -> None:
    rotate_keyset(
        v.settings.keys_dir, v.settings.signing_algorithm, _retire_after(v), now=v.clock.now
    )
    # What every process does within key_reload_interval_seconds; done now so nothing sleeps.
    v.harness.services.keyring.reload()


@case("retired-key-removed-by-second-rotation")
async def _(v: Victim) -> str:
    old = v.key
    _rotate(v)
    v.clock.advance(_retire_after(v) + 1)
    _rotate(v)
    assert old.kid not in {k.kid for k in server_keys(v.settings.keys_dir)}
    return v.server_token(v.fresh_claims(), key=old)


@case("previous-key-past-its-retire-at")
async def _(v: Victim) -> str:
    old = v.key
    _rotate(v)
    v.clock.advance(_retire_after(v) + 1)
    (kept,) = [k for k in server_keys(v.settings.keys_dir) if k.kid == old.kid]
    assert kept.state == "previous"  # still in the file: only retire_at refuses it
    return v.server_token(v.fresh_claims(), key=old)


@case("revoked-after-logout")
async def _(v: Victim) -> str:
    response = await v.harness.client.post(
        "/auth/logout", headers={"Authorization": f"Bearer {v.token}"}
    )
    assert response.status_code == 204
    return v.token


@case("revoked-jti-in-a-new-session-server-signed")
async def _(v: Victim) -> str:
    response = await v.harness.client.post(
        "/auth/logout", headers={"Authorization": f"Bearer {v.token}"}
    )
    assert response.status_code == 204
    # Same jti, unrevoked session id: only the jti denial can refuse it.
    return v.server_token(v.claims_with(sid=new_id()))


async def _logout_all_from_second_login(v: Victim) -> None:
    v.clock.advance(2)
    second = (await v.harness.login(USERNAME))["access_token"]
    response = await v.harness.client.post(
        "/auth/logout-all", headers={"Authorization": f"Bearer {second}"}
    )
    assert response.status_code == 204


@case("issued-before-logout-all")
async def _(v: Victim) -> str:
    await _logout_all_from_second_login(v)
    return v.token


@case("issued-before-logout-all-new-session-server-signed")
async def _(v: Victim) -> str:
    await _logout_all_from_second_login(v)
    before = int(v.clock.now) - 1
    # New jti and session id: only the user-wide cut-off can refuse it.
    return v.server_token(v.fresh_claims(iat=before, nbf=before, jti=new_id(), sid=new_id()))


# --- serialization and size ---------------------------------------------------------------


@case("stripped-signature-empty-third-segment")
async def _(v: Victim) -> str:
    header, payload, _ = split(v.token)
    return f"{header}.{payload}."


@case("two-segments-no-signature")
async def _(v: Victim) -> str:
    header, payload, _ = split(v.token)
    return f"{header}.{payload}"


@case("space-inside-signature")
async def _(v: Victim) -> str:
    header, payload, signature = split(v.token)
    return f"{header}.{payload}.{signature[:20]} {signature[20:]}"


@case("tab-inside-payload")
async def _(v: Victim) -> str:
    header, payload, signature = split(v.token)
    return f"{header}.{payload[:16]}\t{payload[16:]}.{signature}"


@case("five-segments-jwe-shaped")
async def _(v: Victim) -> str:
    header = {"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": v.key.kid, "typ": "at+jwt"}
    parts = [segment(header)] + [b64url(os.urandom(n)) for n in (256, 12, 300, 16)]
    return ".".join(parts)


@case("real-token-plus-fourth-segment")
async def _(v: Victim) -> str:
    return f"{v.token}.{split(v.token)[2]}"


@case("jws-json-flattened-serialization")
async def _(v: Victim) -> str:
    header, payload, signature = split(v.token)
    obj = {"protected": header, "payload": payload, "signature": signature}
    return json.dumps(obj, separators=(",", ":"))


@case("jws-json-general-serialization")
async def _(v: Victim) -> str:
    header, payload, signature = split(v.token)
    obj = {"payload": payload, "signatures": [{"protected": header, "signature": signature}]}
    return json.dumps(obj, separators=(",", ":"))


@case("oversized-10-KiB-server-signed")
async def _(v: Victim) -> str:
    # Over the token cap (max_token_bytes, 8 KiB), under the edge's header limit (16 KiB, a
    # 431 tested in tests/edge): the bearer check itself must refuse it.
    token = v.server_token(v.claims_with(padding="A" * 10 * 1024))
    assert 10 * 1024 < len(token) < 16 * 1024 - 100
    return token


@pytest.mark.parametrize("forge", CASES)
async def test_forged_token_is_refused_with_generic_401(victim: Victim, forge: Forgery) -> None:
    token = await forge(victim)
    assert_invalid_token(await victim.me(token))


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 20
    assert len({p.id for p in CASES}) == len(CASES)


# --- controls: the same machinery accepts what it should ---------------------------------


async def test_server_signed_control_is_accepted(victim: Victim) -> None:
    for token in (victim.server_token(), victim.server_token(victim.fresh_claims())):
        response = await victim.me(token)
        assert response.status_code == 200, response.text
        assert response.json()["username"] == USERNAME
    # And a one-byte change of that control is not.
    header, payload, signature = split(victim.server_token())
    flipped = ("B" if signature[5] == "A" else "A").join((signature[:5], signature[6:]))
    assert_invalid_token(await victim.me(f"{header}.{payload}.{flipped}"))


async def test_lowercase_bearer_scheme_is_accepted(victim: Victim) -> None:
    response = await victim.harness.client.get(
        "/auth/me", headers={"Authorization": f"bearer {victim.token}"}
    )
    assert response.status_code == 200


async def test_basic_scheme_is_refused_even_with_a_valid_token(victim: Victim) -> None:
    basic = base64.b64encode(f"{USERNAME}:correct-Horse-battery-staple-91".encode()).decode()
    for value in (f"Basic {basic}", f"Basic {victim.token}", victim.token):
        response = await victim.harness.client.get("/auth/me", headers={"Authorization": value})
        assert response.status_code == 401
        assert response.headers["www-authenticate"].startswith("Bearer ")
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json() == GENERIC_401


async def test_previous_key_verifies_until_retired(victim: Victim) -> None:
    """Control for the rotation rows: the old key is refused because it retired, not before."""
    old = victim.key
    _rotate(victim)
    new = server_key(victim.settings.keys_dir)
    assert new.kid != old.kid
    assert (await victim.me(victim.server_token(victim.fresh_claims(), key=old))).status_code == 200
    fresh = (await victim.harness.login(USERNAME))["access_token"]
    assert decode_part(split(fresh)[0])["kid"] == new.kid
    assert (await victim.me(fresh)).status_code == 200

    victim.clock.advance(_retire_after(victim) - 5)
    assert (await victim.me(victim.server_token(victim.fresh_claims(), key=old))).status_code == 200
    victim.clock.advance(6)
    assert_invalid_token(await victim.me(victim.server_token(victim.fresh_claims(), key=old)))
    assert (await victim.me(victim.server_token(victim.fresh_claims(), key=new))).status_code == 200


async def test_revocation_rows_isolate_one_denial(victim: Victim) -> None:
    """Control for the revocation rows: new jti + new sid after logout, or iat at/after the
    logout-all cut-off, is accepted; so each row is refused by the denial it names."""
    await victim.harness.client.post(
        "/auth/logout", headers={"Authorization": f"Bearer {victim.token}"}
    )
    other_session = victim.server_token(victim.claims_with(sid=new_id(), jti=new_id()))
    assert (await victim.me(other_session)).status_code == 200

    await _logout_all_from_second_login(victim)
    before = int(victim.clock.now) - 1
    assert_invalid_token(
        await victim.me(
            victim.server_token(
                victim.fresh_claims(iat=before, nbf=before, jti=new_id(), sid=new_id())
            )
        )
    )
    victim.clock.advance(1)
    after = victim.server_token(victim.fresh_claims(jti=new_id(), sid=new_id()))
    assert (await victim.me(after)).status_code == 200


# --- unit tests: AccessTokenVerifier.verify, no HTTP, no database ------------------------


class Unit:
    def __init__(self, data_dir: Path) -> None:
        self.settings = Settings(
            data_dir=data_dir, issuer_url="http://issuer.test", key_reload_interval_seconds=0.05
        )
        create_keyset(self.settings.keys_dir, "ES256")
        self.clock = FakeClock(float(int(time.time())))
        self.keyring = KeyRing(self.settings.keys_dir, 0.05)
        self.issuer = AccessTokenIssuer(self.settings, self.keyring, self.clock)
        self.verifier = AccessTokenVerifier(self.settings, self.keyring, self.clock)
        self.key = server_key(self.settings.keys_dir)
        self.token, self.claims = self.issuer.issue(
            subject=new_id(),
            session_id=new_id(),
            client_id="carevault-web",
            scope="openid",
            roles=["nurse"],
            amr=["pwd"],
            auth_time=int(self.clock.now),
        )

    def payload(self, **changes: Any) -> dict[str, Any]:
        claims = decode_part(split(self.token)[1])
        claims.update(changes)
        return claims

    def header(self, **changes: Any) -> dict[str, Any]:
        return {"alg": "ES256", "kid": self.key.kid, "typ": "at+jwt", **changes}

    def signed(
        self,
        header: dict[str, Any] | str | None = None,
        payload: dict[str, Any] | str | None = None,
    ) -> str:
        return sign(
            self.header() if header is None else header,
            self.payload() if payload is None else payload,
            "ES256",
            self.key.private_key,
        )

    def refusal(self, token: str) -> str:
        with pytest.raises(InvalidTokenError) as caught:
            self.verifier.verify(token)
        return caught.value.reason


@pytest.fixture
def unit(tmp_path: Path) -> Unit:
    return Unit(tmp_path / "var")


def test_unit_control_issued_and_test_signed_tokens_verify(unit: Unit) -> None:
    assert unit.verifier.verify(unit.token) == unit.claims
    assert unit.verifier.verify(unit.signed()) == unit.claims


def test_unit_alg_none_is_refused_by_key_binding(unit: Unit) -> None:
    header, payload, _ = split(unit.token)
    token = f"{segment(unit.header(alg='none'))}.{payload}."
    assert unit.refusal(token) == "algorithm not allowed for this key"


def test_unit_hmac_with_public_key_is_refused_by_key_binding(unit: Unit) -> None:
    token = hmac_sign(unit.header(alg="HS256"), unit.payload(), unit.key.public_pem())
    assert unit.refusal(token) == "algorithm not allowed for this key"


@pytest.mark.parametrize("member", ["jku", "x5u", "jwk", "x5c", "crit", "b64", "cty", "zip"])
def test_unit_header_members_outside_the_allowlist_are_refused(unit: Unit, member: str) -> None:
    value: Any = {
        "jku": "https://a.example/jwks",
        "x5u": "https://a.example/c.pem",
        "jwk": public_jwk(attacker_ec_key(), "ES256"),
        "x5c": ["MIIB"],
        "crit": ["exp"],
        "b64": False,
        "cty": "JWT",
        "zip": "DEF",
    }[member]
    token = unit.signed(unit.header(**{member: value}))
    assert unit.refusal(token) == "header parameter not allowed"


def test_unit_psychic_signature_is_a_bad_signature(unit: Unit) -> None:
    header, payload, _ = split(unit.token)
    assert unit.refusal(f"{header}.{payload}.{b64url(bytes(64))}") == "bad signature"


def test_unit_foreign_key_is_a_bad_signature(unit: Unit) -> None:
    token = sign(unit.header(), unit.payload(), "ES256", attacker_ec_key())
    assert unit.refusal(token) == "bad signature"


def test_unit_duplicate_members_are_refused(unit: Unit) -> None:
    text = json.dumps(unit.payload(), separators=(",", ":"))
    assert unit.refusal(unit.signed(payload=text[:-1] + ',"sub":"someone-else"}')) == (
        "duplicate member name"
    )
    header = f'{{"alg":"ES256","kid":"{unit.key.kid}","kid":"other","typ":"at+jwt"}}'
    assert unit.refusal(unit.signed(header=header)) == "duplicate member name"


def test_unit_unknown_kid_and_missing_typ(unit: Unit) -> None:
    assert unit.refusal(unit.signed(unit.header(kid="nope"))) == "unknown kid"
    header = unit.header()
    del header["typ"]
    assert unit.refusal(unit.signed(header)) == "wrong typ"


def test_unit_expiry_follows_the_injected_clock(unit: Unit) -> None:
    unit.clock.advance(
        unit.settings.access_token_ttl_seconds + unit.settings.clock_leeway_seconds - 1
    )
    assert unit.verifier.verify(unit.token) == unit.claims  # within the leeway: still accepted
    unit.clock.advance(2)
    assert unit.refusal(unit.token) == "expired"  # the cached verification is not reused


def test_unit_size_and_shape_are_checked_before_parsing(unit: Unit) -> None:
    assert unit.refusal(unit.signed(payload=unit.payload(pad="A" * 9000))) == "token too large"
    assert unit.refusal(unit.token + ".e30.e30") == "not a three-part JWS compact serialization"
    assert unit.refusal(unit.token.replace(".", "é", 1)) == "non-ASCII token"


def test_unit_verify_jws_signature_binds_the_algorithm(unit: Unit) -> None:
    raw = unit.token.encode()
    assert json.loads(verify_jws_signature(raw, unit.keyring.current.key, "ES256")) == (
        unit.payload()
    )
    for alg in ("none", "HS256", "ES384", "RS256", "PS256", "EdDSA"):
        with pytest.raises(InvalidTokenError):
            verify_jws_signature(raw, unit.keyring.current.key, alg)
