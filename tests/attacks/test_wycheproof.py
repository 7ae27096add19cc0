"""Project Wycheproof JWS and JWK vectors against carevault's signature layer.

The vectors carry no `typ`, no carevault `kid` and no RFC 9068 claims, so the whole verifier
would refuse all of them for those reasons alone; instead they run through the part that
decides on signatures, the way `AccessTokenVerifier.verify` does:

1. the vector's key goes into a real `KeyRing` (a `signing.json` written in a temporary
   directory), bound to the algorithm its JWK names; `SigningKey.from_record` refuses a key
   whose algorithm is outside the allowlist or does not fit the key type. A JWK that names no
   algorithm is bound in turn to every allowed algorithm of its key type (the strictest reading);
2. for each key the ring accepted: `verify_jws_signature(raw, key.key, key.alg)`, the joserfc
   `extract_compact`/`validate_compact` call with a registry allowing only that algorithm.

Expectations come from the vector files alone: `invalid` is refused; `valid` with an algorithm
we accept is verified (and yields the vector's payload); `valid` with an algorithm we refuse
(HS*, none, RS384, PS384, PS512, ES512 ...) is refused. For the refused algorithms the
signature function is also called directly with the vector's own key and the token's own `alg`
(what a verifier that trusted the header would do): it must refuse as well.

The vectors' files, with their LICENSE, are in tests/vectors/wycheproof/.
"""

from __future__ import annotations

import base64
import itertools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwk
from joserfc.errors import JoseError

from carevault.config import SIGNING_ALGORITHMS
from carevault.crypto.files import write_secret_json
from carevault.tokens.access import InvalidTokenError, verify_jws_signature
from carevault.tokens.keys import KEY_TYPES, KeyRing, SigningKey

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "wycheproof"
ACCEPTED = ("ES256", "EdDSA", "PS256", "RS256")

# Key-quality vectors of json_web_key_test.json that carevault does not check: it never imports
# a key, it generates its own (3072-bit RSA, P-256, Ed25519). Strict: fixing either fails here.
KNOWN_GAPS = {
    "rejectsKeyWithRocaVulnerability": "no ROCA fingerprint check on signing keys (keys are "
    "generated locally, never imported)",
    "rejects1024bitRsaKey": "no minimum RSA modulus size on signing keys (keys are generated "
    "locally at 3072 bits, never imported)",
}


def _b64url_decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _token_alg(raw: str) -> str | None:
    """The `alg` the token claims, read leniently (None when the header cannot be read)."""
    try:
        header = json.loads(_b64url_decode(raw.split(".")[0]))
    except ValueError:
        return None
    alg = header.get("alg") if isinstance(header, dict) else None
    return alg if isinstance(alg, str) else None


@dataclass(frozen=True)
class Vector:
    source: str  # "jws" or "jwk"
    group: int
    group_comment: str
    tc_id: int
    comment: str
    result: str
    jws: str
    keys: tuple[dict[str, Any], ...]  # the verification side's keys (public halves if given)

    @property
    def token_alg(self) -> str | None:
        return _token_alg(self.jws)

    @property
    def category(self) -> str:
        if self.result == "invalid":
            return "invalid"
        if self.result != "valid":
            return f"unexpected-result-{self.result}"
        if self.token_alg not in ACCEPTED:
            return "valid-refused-alg"
        if any(k.get("alg") == self.token_alg for k in self.keys):
            return "valid-accepted-alg"
        return "unexpected-valid-alg-mismatch"

    @property
    def id(self) -> str:
        return f"{self.source}-tc{self.tc_id:03d}-{self.group_comment}-{self.comment}"


def _load() -> tuple[dict[str, Any], list[Vector]]:
    meta: dict[str, Any] = {}
    vectors: list[Vector] = []
    for source, name in (
        ("jws", "json_web_signature_test.json"),
        ("jwk", "json_web_key_test.json"),
    ):
        data = json.loads((VECTORS / name).read_text())
        meta[source] = data
        for index, group in enumerate(data["testGroups"]):
            keys_part = group.get("public") or group["private"]
            keys = tuple(keys_part["keys"]) if "keys" in keys_part else (keys_part,)
            for test in group["tests"]:
                assert isinstance(test["jws"], str)
                vectors.append(
                    Vector(
                        source,
                        index,
                        group["comment"],
                        test["tcId"],
                        test["comment"],
                        test["result"],
                        test["jws"],
                        keys,
                    )
                )
    return meta, vectors


META, ALL = _load()


def _candidate_algs(key: dict[str, Any]) -> list[str]:
    if "alg" in key:
        return [key["alg"]]
    return [alg for alg in ACCEPTED if KEY_TYPES[alg][0] == key.get("kty")]


class Rings:
    """Verification keys per vector group, each loaded through a real KeyRing."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._cache: dict[tuple[str, int], list[SigningKey]] = {}

    def keys_for(self, vector: Vector) -> list[SigningKey]:
        cache_key = (vector.source, vector.group)
        if cache_key not in self._cache:
            self._cache[cache_key] = self._load(vector)
        return self._cache[cache_key]

    def _load(self, vector: Vector) -> list[SigningKey]:
        loaded: list[SigningKey] = []
        bindings = itertools.product(*(_candidate_algs(k) for k in vector.keys))
        for number, algs in enumerate(bindings):
            keys_dir = self._root / f"{vector.source}-{vector.group}-{number}"
            records = [
                {
                    "kid": key.get("kid") or f"key-{i}",
                    "alg": alg,
                    "state": "current" if i == 0 else "next",
                    "created_at": 0.0,
                    "retire_at": None,
                    "jwk": key,
                }
                for i, (key, alg) in enumerate(zip(vector.keys, algs, strict=True))
            ]
            write_secret_json(keys_dir / "signing.json", {"keys": records})
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # joserfc warns on small RSA keys
                    ring = KeyRing(keys_dir)
            except (KeyError, ValueError, JoseError):
                continue  # the ring refuses this key set: nothing can verify with it
            for record in records:
                key = ring.verification_key(record["kid"], 0.0)
                assert key is not None
                loaded.append(key)
        return loaded


@pytest.fixture(scope="module")
def rings(tmp_path_factory: pytest.TempPathFactory) -> Rings:
    return Rings(tmp_path_factory.mktemp("wycheproof-rings"))


def _server_verifies(rings: Rings, vector: Vector) -> list[bytes]:
    """The payloads of every (configured key, bound alg) under which the vector verifies."""
    raw = vector.jws.encode("utf-8")
    verified = []
    for key in rings.keys_for(vector):
        try:
            verified.append(verify_jws_signature(raw, key.key, key.alg))
        except InvalidTokenError:
            pass
    return verified


def _param(vector: Vector) -> Any:
    marks = []
    if vector.source == "jwk" and vector.comment in KNOWN_GAPS:
        marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[vector.comment]))
    return pytest.param(vector, id=vector.id, marks=marks)


@pytest.mark.parametrize("vector", [_param(v) for v in ALL])
def test_vector(rings: Rings, vector: Vector) -> None:
    verified = _server_verifies(rings, vector)
    if vector.category == "valid-accepted-alg":
        payload = _b64url_decode(vector.jws.split(".")[1])
        assert verified == [payload], f"valid {vector.token_alg} vector not verified"
    else:
        assert verified == [], f"{vector.category} vector verified"


REFUSED_ALG_VECTORS = [v for v in ALL if v.token_alg is not None and v.token_alg not in ACCEPTED]


@pytest.mark.parametrize("vector", [pytest.param(v, id=v.id) for v in REFUSED_ALG_VECTORS])
def test_refused_algorithm_is_refused_even_with_the_right_key(vector: Vector) -> None:
    alg = vector.token_alg
    assert alg is not None
    keys: list[Any] = [None]
    for data in vector.keys:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                keys.append(jwk.import_key(data))
        except (ValueError, JoseError):
            pass
    for key in keys:
        with pytest.raises(InvalidTokenError):
            verify_jws_signature(vector.jws.encode("utf-8"), key, alg)


def test_vector_counts() -> None:
    """The tables above are what we think they are: no silent pass on zero vectors."""
    assert ACCEPTED == SIGNING_ALGORITHMS == tuple(KEY_TYPES)
    jws_vectors = [v for v in ALL if v.source == "jws"]
    jwk_vectors = [v for v in ALL if v.source == "jwk"]
    assert len(jws_vectors) == META["jws"]["numberOfTests"] == 401
    assert len(jwk_vectors) == META["jwk"]["numberOfTests"] == 26

    def counts(vectors: list[Vector]) -> dict[str, int]:
        out: dict[str, int] = {}
        for v in vectors:
            out[v.category] = out.get(v.category, 0) + 1
        return out

    assert counts(jws_vectors) == {
        "invalid": 355,
        "valid-accepted-alg": 16,
        "valid-refused-alg": 30,
    }
    assert counts(jwk_vectors) == {"invalid": 21, "valid-accepted-alg": 1, "valid-refused-alg": 4}
    accepted_by_alg: dict[str, int] = {}
    for v in ALL:
        if v.category == "valid-accepted-alg":
            accepted_by_alg[v.token_alg] = accepted_by_alg.get(v.token_alg, 0) + 1  # type: ignore[index]
    assert accepted_by_alg == {"ES256": 2, "RS256": 9, "PS256": 6}
    refused = sorted({v.token_alg for v in REFUSED_ALG_VECTORS})  # type: ignore[type-var]
    assert refused == [
        "ES512",
        "HS256",
        "HS384",
        "HS512",
        "NONE",
        "PS384",
        "PS512",
        "RS384",
        "RS512",
        "none",
    ]
    assert len(REFUSED_ALG_VECTORS) == 85


# RFC 8037 appendix A.4: the only EdDSA (Ed25519) JWS with a published answer; Wycheproof's
# JWS file has none.
RFC8037_KEY = {"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
RFC8037_JWS = (
    "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc."
    "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
)


@pytest.mark.filterwarnings("ignore:EdDSA is deprecated:joserfc.errors.SecurityWarning")
def test_rfc8037_ed25519_vector(tmp_path: Path) -> None:
    record = {
        "kid": "rfc8037",
        "alg": "EdDSA",
        "state": "current",
        "created_at": 0.0,
        "retire_at": None,
        "jwk": RFC8037_KEY,
    }
    write_secret_json(tmp_path / "signing.json", {"keys": [record]})
    key = KeyRing(tmp_path).verification_key("rfc8037", 0.0)
    assert key is not None
    assert verify_jws_signature(RFC8037_JWS.encode(), key.key, key.alg) == (
        b"Example of Ed25519 signing"
    )

    header, payload, signature = RFC8037_JWS.split(".")
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    other_payload = base64.urlsafe_b64encode(b"Example of Ed25519 signinG").rstrip(b"=").decode()
    for forged in (
        f"{header}.{payload}.{flipped}",
        f"{header}.{other_payload}.{signature}",
        f"{header}.{payload}.",
        f"{header}.{payload}.{'A' * 86}",
    ):
        with pytest.raises(InvalidTokenError):
            verify_jws_signature(forged.encode(), key.key, key.alg)
    for alg in ("ES256", "PS256", "RS256", "none", "HS256"):
        with pytest.raises(InvalidTokenError):
            verify_jws_signature(RFC8037_JWS.encode(), key.key, alg)
