"""DPoP (RFC 9449): verify the proof of possession a client sends in the `DPoP` header.

`DpopVerifier.verify` runs the checks of RFC 9449 §4.3 and refuses with `DpopError`:

- exactly one `DPoP` header value, at most `MAX_PROOF_BYTES`, a JWS compact serialization;
- header: only `typ`, `alg`, `jwk` and `kid` (ignored); `typ` is `dpop+jwt`; `alg` one of the
  configured asymmetric algorithms (never `none`, never HMAC); `jwk` a public key (no private
  or symmetric members) of the key type and curve `alg` requires, in canonical form (RFC 7518
  full-size coordinates, no leading zeros), so that one key has one thumbprint. Keys are only
  ever taken from the proof itself: `jku`, `x5u`, `x5c`, `crit` and `b64` are refused, nothing
  is fetched. Duplicate JSON member names are refused (two parsers could read different values);
- the signature, checked with that key under that algorithm only;
- claims: `jti` (a bounded string), `htm` equal to the request method, `htu` equal to the
  request URL after RFC 3986 syntax- and scheme-based normalisation, ignoring query and
  fragment (RFC 9449 §4.3 point 9), `iat` an integer inside the acceptance window, `ath` the
  hash of the access token when one is presented, and the key the caller expects (`cnf.jkt`);
- a server nonce (`use_dpop_nonce`) when required, and whenever the proof carries one;
- last, the replay cache: a (`jkt`, `jti`) pair is accepted once, across every worker.

JOSE parsing, key import, signature checks and thumbprints are joserfc's; this module only
decides what to accept. Error descriptions are fixed strings: they never repeat a value taken
from the request (no token, no key, no URL).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from joserfc import jwk as jose_jwk
from joserfc import jws
from joserfc.errors import SecurityWarning
from joserfc.util import urlsafe_b64decode, urlsafe_b64encode

from carevault.oauth.replay import ReplayCache
from carevault.tokens.access import InvalidTokenError, _strict_json_object
from carevault.tokens.keys import full_size_jwk

INVALID_DPOP_PROOF = "invalid_dpop_proof"
USE_DPOP_NONCE = "use_dpop_nonce"

MAX_PROOF_BYTES = 8192
MAX_JTI_LENGTH = 256
MAX_NONCE_LENGTH = 256
MIN_NONCE_SECRET_BYTES = 32
RSA_MIN_BITS = 2048
RSA_MAX_BITS = 8192
RSA_MAX_EXPONENT_BITS = 32  # a huge public exponent makes every verification slow

DPOP_TYPE = "dpop+jwt"
ALLOWED_HEADER_PARAMS = frozenset({"typ", "alg", "jwk", "kid"})
# RFC 7517/7518 private and symmetric key members: none may appear in a proof's public key.
PRIVATE_KEY_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})

# alg -> the only key type (and curve) a proof key of that alg may be. Asymmetric only: there is
# no entry for "none" or HS*, so neither can be configured nor accepted.
ALGORITHM_KEY_TYPES: dict[str, tuple[str, str | None]] = {
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", "Ed25519"),
    "Ed25519": ("OKP", "Ed25519"),
    "PS256": ("RSA", None),
    "PS384": ("RSA", None),
    "PS512": ("RSA", None),
    "RS256": ("RSA", None),
    "RS384": ("RSA", None),
    "RS512": ("RSA", None),
}
DEFAULT_ALGORITHMS = ("ES256", "EdDSA", "PS256", "RS256")
# The members of each key type that RFC 7638 hashes (besides kty): the canonical public key.
_REQUIRED_MEMBERS = {"EC": ("crv", "x", "y"), "OKP": ("crv", "x"), "RSA": ("e", "n")}

_DEFAULT_PORTS = {"http": 80, "https": 443}
_PERCENT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_NONCE_CONTEXT = b"carevault dpop nonce v1\x00"


class DpopError(Exception):
    """The DPoP proof is refused. `error` is the RFC 9449 error code for the response
    (`invalid_dpop_proof` or `use_dpop_nonce`); `description` is a fixed, generic text for
    logs and clients, never containing the proof, the token or any value from the request."""

    def __init__(self, error: str, description: str) -> None:
        self.error = error
        self.description = description
        super().__init__(description)


def _invalid(description: str) -> DpopError:
    return DpopError(INVALID_DPOP_PROOF, description)


@dataclass(frozen=True)
class DpopProof:
    """A verified proof: the key's RFC 7638 thumbprint, the proof's `jti` and `iat`, and the
    public key (canonical members only: kty and the members the thumbprint covers)."""

    jkt: str
    jti: str
    jwk: dict[str, Any]
    iat: int


def jwk_thumbprint(jwk: dict[str, Any]) -> str:
    """The RFC 7638 JWK SHA-256 thumbprint, base64url without padding (joserfc computes it
    over the required members only, so `alg`, `kid`, `use` and the like do not change it).
    Raises `ValueError` for a value joserfc cannot import as a JWK."""
    try:
        return jose_jwk.import_key(jwk).thumbprint()
    except Exception as err:
        raise ValueError("not a usable JWK") from err


def access_token_hash(access_token: str) -> str:
    """The `ath` value for an access token (RFC 9449 §4.2): base64url(SHA-256(token))."""
    digest = hashlib.sha256(access_token.encode("utf-8")).digest()
    return urlsafe_b64encode(digest).decode("ascii")


def _normalize_path(path: str) -> str:
    def fix(match: re.Match[str]) -> str:
        octet = int(match.group(1), 16)
        return chr(octet) if octet in _UNRESERVED else "%" + match.group(1).upper()

    path = _PERCENT.sub(fix, path)
    # RFC 3986 §5.2.4, remove_dot_segments.
    output: list[str] = []
    segments = path.split("/")
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == ".":
            if last:
                output.append("")
        elif segment == "..":
            if len(output) > 1:
                output.pop()
            if last:
                output.append("")
        else:
            output.append(segment)
    normalized = "/".join(output)
    return normalized if normalized.startswith("/") else "/" + normalized


def normalize_htu(url: str) -> str | None:
    """`url` in the form `htu` is compared in, or None when it is not an absolute http(s) URL.

    RFC 3986 syntax-based normalisation (scheme and host lowercased, percent-encoding case and
    unreserved characters, dot segments) and scheme-based normalisation (default port dropped,
    empty path is "/"); query and fragment are removed (RFC 9449 §4.3 point 9). A URL with
    user information, whitespace, control or non-ASCII characters is refused.
    """
    if type(url) is not str or not url.isascii():
        return None
    if any(c <= " " or c == "\x7f" for c in url):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        return None
    if "@" in parts.netloc:
        return None
    host = parts.hostname
    if not host:
        return None
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host if port is None or port == _DEFAULT_PORTS[scheme] else f"{host}:{port}"
    return f"{scheme}://{netloc}{_normalize_path(parts.path or '/')}"


def _canonical_public_jwk(key: Any) -> dict[str, Any]:
    """The public JWK of a joserfc key computed from the key itself (not from the JWK it was
    imported from): kty and the RFC 7638 required members, EC coordinates at full size."""
    public = key.binding.convert_raw_key_to_dict(key.public_key, private=False)
    data = full_size_jwk({"kty": key.key_type, **public})
    return {"kty": key.key_type, **{m: data[m] for m in _REQUIRED_MEMBERS[key.key_type]}}


class DpopVerifier:
    def __init__(
        self,
        replay: ReplayCache,
        nonce_secret: bytes,
        *,
        clock: Callable[[], float] = time.time,
        max_age: int = 60,
        leeway: int = 5,
        algorithms: Iterable[str] = DEFAULT_ALGORITHMS,
        nonce_window: int = 300,
    ) -> None:
        algorithms = tuple(algorithms)
        if not algorithms:
            raise ValueError("at least one DPoP algorithm is required")
        unknown = [a for a in algorithms if a not in ALGORITHM_KEY_TYPES]
        if unknown:
            raise ValueError("DPoP algorithms must be asymmetric signature algorithms")
        if type(nonce_secret) is not bytes or len(nonce_secret) < MIN_NONCE_SECRET_BYTES:
            raise ValueError(f"nonce_secret must be at least {MIN_NONCE_SECRET_BYTES} bytes")
        if max_age <= 0 or leeway < 0 or nonce_window <= 0:
            raise ValueError("max_age and nonce_window must be positive, leeway not negative")
        self._replay = replay
        self._nonce_secret = nonce_secret
        self._clock = clock
        self._max_age = int(max_age)
        self._leeway = int(leeway)
        self._nonce_window = int(nonce_window)
        self._algorithms = algorithms
        # One registry per algorithm, allowing exactly that algorithm, with sizes fit for a
        # proof carrying its own key (joserfc's default 512-byte header is too small for RSA).
        self._registries: dict[str, jws.JWSRegistry] = {}
        self._models: dict[str, Any] = {}
        for alg in algorithms:
            registry = jws.JWSRegistry(algorithms=[alg])
            registry.max_header_length = MAX_PROOF_BYTES
            registry.max_payload_length = MAX_PROOF_BYTES
            registry.max_signature_length = MAX_PROOF_BYTES
            with warnings.catch_warnings():
                # "EdDSA is deprecated via RFC 9864" (in favour of "Ed25519"): still what
                # clients send; the algorithm is sound.
                warnings.simplefilter("ignore", SecurityWarning)
                self._models[alg] = registry.get_alg(alg)
            self._registries[alg] = registry
        self._parse_registry = jws.JWSRegistry(algorithms=list(algorithms))
        self._parse_registry.max_header_length = MAX_PROOF_BYTES
        self._parse_registry.max_payload_length = MAX_PROOF_BYTES
        self._parse_registry.max_signature_length = MAX_PROOF_BYTES

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The accepted algorithms (for `dpop_signing_alg_values_supported`)."""
        return self._algorithms

    # --- server nonces (RFC 9449 §8) ----------------------------------------------------------

    def _nonce_for(self, window: int) -> str:
        mac = hmac.new(
            self._nonce_secret,
            _NONCE_CONTEXT + window.to_bytes(8, "big", signed=True),
            hashlib.sha256,
        )
        return urlsafe_b64encode(mac.digest()).decode("ascii")

    def _window(self, at: float) -> int:
        return int(at // self._nonce_window)

    def nonce(self) -> str:
        """The current server nonce: stateless, HMAC(nonce_secret, index of the current time
        window), so every worker holding the secret issues and accepts the same values."""
        return self._nonce_for(self._window(self._clock()))

    def nonce_valid(self, value: str) -> bool:
        """True for the nonce of the current or the previous window (and of the next one when
        it starts within `leeway`, for a worker whose clock runs slightly ahead)."""
        if type(value) is not str or not value or len(value) > MAX_NONCE_LENGTH:
            return False
        if not value.isascii():
            return False
        now = self._clock()
        current = self._window(now)
        windows = {current - 1, current, self._window(now + self._leeway)}
        given = value.encode("ascii")
        valid = False
        for window in windows:  # no early exit: the time taken says nothing about the value
            valid |= hmac.compare_digest(given, self._nonce_for(window).encode("ascii"))
        return valid

    # --- proofs -------------------------------------------------------------------------------

    async def verify(
        self,
        header_values: list[str],
        *,
        method: str,
        url: str,
        access_token: str | None = None,
        require_nonce: bool = False,
        expected_jkt: str | None = None,
    ) -> DpopProof:
        """Verify the `DPoP` header values of one request; return the proof or raise
        `DpopError`. `ReplayCacheUnavailable` propagates (the caller answers 503)."""
        proof = self._check(
            header_values,
            method=method,
            url=url,
            access_token=access_token,
            require_nonce=require_nonce,
            expected_jkt=expected_jkt,
        )
        expires_at = proof.iat + self._max_age + self._leeway
        if not await self._replay.first_use(f"dpop:{proof.jkt}:{proof.jti}", expires_at):
            raise _invalid("DPoP proof replayed")
        return proof

    def _check(
        self,
        header_values: list[str],
        *,
        method: str,
        url: str,
        access_token: str | None = None,
        require_nonce: bool = False,
        expected_jkt: str | None = None,
    ) -> DpopProof:
        """Every check of `verify` but the replay cache, which runs once, after all of these."""
        if type(header_values) not in (list, tuple) or len(header_values) != 1:
            raise _invalid("exactly one DPoP header is required")
        claims, proof_jwk = self._parse(header_values[0])
        jkt = jwk_thumbprint(proof_jwk)

        jti = claims.get("jti")
        if type(jti) is not str or not jti or len(jti) > MAX_JTI_LENGTH:
            raise _invalid("jti missing or invalid")
        if type(claims.get("htm")) is not str or claims["htm"] != method:
            raise _invalid("htm does not match the request method")
        htu = normalize_htu(claims.get("htu"))  # type: ignore[arg-type]
        if htu is None or htu != normalize_htu(url):
            raise _invalid("htu does not match the request URL")
        iat = claims.get("iat")
        if type(iat) is not int:
            raise _invalid("iat missing or not an integer")
        now = self._clock()
        if iat < now - self._max_age - self._leeway:
            raise _invalid("proof too old")
        if iat > now + self._leeway:
            raise _invalid("proof issued in the future")

        if access_token is not None:
            ath = claims.get("ath")
            if type(ath) is not str or not hmac.compare_digest(
                ath.encode("utf-8"), access_token_hash(access_token).encode("ascii")
            ):
                raise _invalid("ath missing or does not match the access token")
        if expected_jkt is not None and not hmac.compare_digest(
            jkt.encode("ascii"), str(expected_jkt).encode("utf-8")
        ):
            raise _invalid("proof key does not match the bound key")

        if "nonce" in claims:
            if not self.nonce_valid(claims["nonce"]):
                raise DpopError(USE_DPOP_NONCE, "DPoP nonce invalid or expired")
        elif require_nonce:
            raise DpopError(USE_DPOP_NONCE, "DPoP nonce required")
        return DpopProof(jkt=jkt, jti=jti, jwk=proof_jwk, iat=iat)

    def _parse(self, value: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """The claims and the (canonical) public key of a well-formed, well-signed proof."""
        if type(value) is not str or not value:
            raise _invalid("DPoP header empty")
        if len(value) > MAX_PROOF_BYTES:
            raise _invalid("DPoP proof too large")
        if not value.isascii():
            raise _invalid("DPoP proof malformed")
        raw = value.encode("ascii")
        try:
            obj = jws.extract_compact(raw, registry=self._parse_registry)
            # joserfc has parsed the header; parse it again refusing duplicate member names.
            header = _strict_json_object(urlsafe_b64decode(obj.segments["header"]))
        except Exception as err:
            raise _invalid("DPoP proof malformed") from err

        if not header.keys() <= ALLOWED_HEADER_PARAMS:
            raise _invalid("header parameter not allowed")
        if header.get("typ") != DPOP_TYPE:
            raise _invalid("typ must be dpop+jwt")
        alg = header.get("alg")
        if type(alg) is not str or alg not in self._registries:
            raise _invalid("alg not allowed")
        registry = self._registries[alg]
        model = self._models[alg]
        try:
            registry.check_header(header)
        except Exception as err:
            raise _invalid("header invalid") from err

        key, proof_jwk = self._import_key(header.get("jwk"), alg)
        try:
            model.check_key(key)  # key type and curve, and the JWK's own alg/use if it names one
            signature = urlsafe_b64decode(obj.segments["signature"])
            signing_input = obj.segments["header"] + b"." + obj.segments["payload"]
            good = model.verify(signing_input, signature, key)
        except Exception as err:
            raise _invalid("DPoP proof signature invalid") from err
        if not good:
            raise _invalid("DPoP proof signature invalid")

        try:
            claims = _strict_json_object(obj.payload)
        except InvalidTokenError as err:
            raise _invalid("DPoP proof claims malformed") from err
        return claims, proof_jwk

    def _import_key(self, value: Any, alg: str) -> tuple[Any, dict[str, Any]]:
        """The joserfc key of the header's `jwk` and its canonical public JWK."""
        kty, crv = ALGORITHM_KEY_TYPES[alg]
        if type(value) is not dict:
            raise _invalid("jwk missing")
        if value.keys() & PRIVATE_KEY_MEMBERS:
            raise _invalid("jwk must be a public key")
        if value.get("kty") != kty:
            raise _invalid("jwk key type does not match alg")
        if crv is not None and value.get("crv") != crv:
            raise _invalid("jwk curve does not match alg")
        try:
            key = jose_jwk.import_key(value, kty)  # type: ignore[call-overload]
        except Exception as err:
            raise _invalid("jwk unusable") from err
        if key.is_private:
            raise _invalid("jwk must be a public key")
        if kty == "RSA":
            numbers = key.public_key.public_numbers()
            if not RSA_MIN_BITS <= numbers.n.bit_length() <= RSA_MAX_BITS:
                raise _invalid("jwk RSA modulus size not allowed")
            if numbers.e.bit_length() > RSA_MAX_EXPONENT_BITS:
                raise _invalid("jwk RSA exponent not allowed")
        canonical = _canonical_public_jwk(key)
        if any(value.get(m) != canonical[m] for m in _REQUIRED_MEMBERS[kty]):
            # Leading zeros, short coordinates or non-canonical base64url: another spelling of
            # a key would give it another thumbprint.
            raise _invalid("jwk not in canonical form")
        return key, canonical
