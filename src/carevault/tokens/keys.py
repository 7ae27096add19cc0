"""Signing keys: a key set with current, next and previous keys, kept in `keys/signing.json`.

`next` is published in the JWKS before it signs anything, so that when `carevault keys rotate`
promotes it every verifier (any worker, any relying party with a cached JWKS) already trusts it.
The old `current` becomes `previous` and stays trusted until every token it signed has expired.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joserfc import jwk
from joserfc.jwk import ECKey, OKPKey, RSAKey
from joserfc.util import urlsafe_b64decode, urlsafe_b64encode

from carevault.crypto.files import read_json, write_secret_json

FILE_NAME = "signing.json"

# alg -> the only key type (and curve) a key of that alg may be. Binding alg to key type is
# what makes RS/HS key confusion impossible: no key here ever verifies an HMAC.
KEY_TYPES: dict[str, tuple[str, str | None]] = {
    "ES256": ("EC", "P-256"),
    "EdDSA": ("OKP", "Ed25519"),
    "PS256": ("RSA", None),
    "RS256": ("RSA", None),
}


# RFC 7518 §6.2.1.2 and §6.2.2.1: an EC JWK's x, y and d are octet strings of the curve's full
# size. joserfc drops leading zero octets (about 1 key in 100), and strict verifiers (PyJWT,
# go-jose) then refuse the key: every JWK written or published goes through `full_size_jwk`.
_COORDINATE_OCTETS = {"P-256": 32, "P-384": 48, "P-521": 66}


def full_size_jwk(data: dict[str, Any]) -> dict[str, Any]:
    size = _COORDINATE_OCTETS.get(data.get("crv", "")) if data.get("kty") == "EC" else None
    if size is None:
        return data
    padded = dict(data)
    for name in ("x", "y", "d"):
        if name in padded:
            raw = urlsafe_b64decode(padded[name].encode())
            padded[name] = urlsafe_b64encode(raw.rjust(size, b"\x00")).decode()
    return padded


def generate_key(alg: str) -> Any:
    kty, crv = KEY_TYPES[alg]
    if kty == "EC":
        return ECKey.generate_key(crv, private=True)
    if kty == "OKP":
        return OKPKey.generate_key(crv, private=True)
    return RSAKey.generate_key(3072, private=True)


@dataclass(frozen=True)
class SigningKey:
    kid: str
    alg: str
    state: str  # current | next | previous
    created_at: float
    retire_at: float | None  # previous keys only: no token it signed is alive after this
    key: Any  # joserfc key with its private half

    def public_jwk(self) -> dict[str, Any]:
        data = full_size_jwk(self.key.as_dict(private=False))
        data.update({"kid": self.kid, "use": "sig", "alg": self.alg})
        return data

    def to_record(self) -> dict[str, Any]:
        return {
            "kid": self.kid,
            "alg": self.alg,
            "state": self.state,
            "created_at": self.created_at,
            "retire_at": self.retire_at,
            "jwk": full_size_jwk(self.key.as_dict(private=True)),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> SigningKey:
        alg = record["alg"]
        if alg not in KEY_TYPES:
            raise ValueError("signing key algorithm is not allowed")
        try:
            key = jwk.import_key(record["jwk"])
        except Exception as err:  # joserfc raises its own error types for bad JWKs
            raise ValueError("signing key is not a valid JWK") from err
        kty, crv = KEY_TYPES[alg]
        if key.key_type != kty or (crv and key.as_dict().get("crv") != crv):
            raise ValueError("signing key type does not match its algorithm")
        return cls(
            kid=record["kid"],
            alg=alg,
            state=record["state"],
            created_at=record["created_at"],
            retire_at=record.get("retire_at"),
            key=key,
        )

    @classmethod
    def new(cls, alg: str, state: str, now: float) -> SigningKey:
        key = generate_key(alg)
        return cls(key.thumbprint(), alg, state, now, None, key)


def _write(path: Path, keys: list[SigningKey]) -> None:
    write_secret_json(path, {"keys": [k.to_record() for k in keys]})


def create_keyset(keys_dir: Path, alg: str, now: float | None = None) -> None:
    """Create the key set if absent: a current key and a pre-published next key."""
    path = keys_dir / FILE_NAME
    if path.exists():
        return
    now = time.time() if now is None else now
    _write(path, [SigningKey.new(alg, "current", now), SigningKey.new(alg, "next", now)])


def rotate_keyset(keys_dir: Path, alg: str, retire_after: float, now: float | None = None) -> str:
    """Promote next to current, keep the old current for `retire_after` seconds; return new kid."""
    now = time.time() if now is None else now
    path = keys_dir / FILE_NAME
    keys = [SigningKey.from_record(r) for r in read_json(path)["keys"]]
    rotated: list[SigningKey] = []
    new_current: SigningKey | None = None
    for key in keys:
        if key.state == "previous":
            if key.retire_at is not None and key.retire_at > now:
                rotated.append(key)
        elif key.state == "current":
            rotated.append(_with(key, state="previous", retire_at=now + retire_after))
        elif key.state == "next":
            new_current = _with(key, state="current")
            rotated.append(new_current)
    if new_current is None:  # a hand-edited file without a next key: make one and use it
        new_current = SigningKey.new(alg, "current", now)
        rotated.append(new_current)
    rotated.append(SigningKey.new(alg, "next", now))
    _write(path, rotated)
    return new_current.kid


def _with(key: SigningKey, **changes: Any) -> SigningKey:
    values = {**key.__dict__, **changes}
    return SigningKey(**values)


class KeyRing:
    """The process's view of the key set; re-reads the file when it changes on disk."""

    def __init__(self, keys_dir: Path, reload_interval: float = 1.0) -> None:
        self._path = keys_dir / FILE_NAME
        self._reload_interval = reload_interval
        self._lock = threading.Lock()
        self._checked_at = 0.0
        self._mtime_ns = -1
        self._current: SigningKey | None = None
        self._by_kid: dict[str, SigningKey] = {}
        self.generation = 0  # bumped on every load, so caches of verified tokens can tell
        self.reload()

    def reload(self) -> None:
        stat = os.stat(self._path)
        keys = [SigningKey.from_record(r) for r in read_json(self._path)["keys"]]
        current = [k for k in keys if k.state == "current"]
        if len(current) != 1:
            raise ValueError("the signing key set must have exactly one current key")
        if len({k.kid for k in keys}) != len(keys):
            raise ValueError("the signing key set has two keys with one kid")
        with self._lock:
            self._current = current[0]
            self._by_kid = {k.kid: k for k in keys}
            self._mtime_ns = stat.st_mtime_ns
            self._checked_at = time.monotonic()
            self.generation += 1

    def refresh(self, force: bool = False) -> None:
        """Pick up a rotation done by another process (checked at most once per interval)."""
        now = time.monotonic()
        if not force and now - self._checked_at < self._reload_interval:
            return
        self._checked_at = now
        try:
            if os.stat(self._path).st_mtime_ns != self._mtime_ns:
                self.reload()
        except (OSError, ValueError, KeyError, TypeError):
            # Keep the keys we have: a damaged or missing file must not stop verification
            # (`carevault keys rotate` writes atomically, so this is a hand edit gone wrong).
            return

    @property
    def current(self) -> SigningKey:
        self.refresh()
        assert self._current is not None
        return self._current

    def verification_key(self, kid: str, now: float) -> SigningKey | None:
        self.refresh()
        key = self._by_kid.get(kid)
        if key is None or (key.retire_at is not None and key.retire_at <= now):
            return None
        return key

    def jwks(self, now: float) -> dict[str, Any]:
        self.refresh()
        return {
            "keys": [
                k.public_jwk()
                for k in self._by_kid.values()
                if k.retire_at is None or k.retire_at > now
            ]
        }
