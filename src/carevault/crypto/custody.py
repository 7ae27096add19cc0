"""Key custody for data at rest: the master key, the key-encryption key (KEK) and the
blind-index key, all Google Tink keysets kept in the data directory's `keys/`.

- `master.key`: an AES256_GCM AEAD keyset in tink's cleartext JSON format (0600). Instead of the
  file, `CAREVAULT_MASTER_KEY` may carry the same JSON, base64-encoded; it then wins and no file
  is written. A master key file that users other than the owner may read is refused at load
  time, in every environment: it protects everything else.
- `kek.json`: the KEK, an AES256_GCM AEAD keyset in tink's *encrypted* keyset format (only
  `encryptedKeyset` + non-secret `keysetInfo`), encrypted under the master key. It wraps the
  per-scope data keys (see `envelope.py`). Rotation adds a new primary while older keys stay
  for unwrapping; keys are dropped only once no data key is wrapped under them.
- `index.json`: an HMAC-SHA256 PRF keyset for blind indexes (see `blind_index.py`), encrypted
  under the master key, separate from the KEK so that neither key serves two purposes.
- `audit-mac.json` (HMAC-SHA256 PRF: the audit hash chain's key) and `audit-signing.json`
  (Ed25519 with raw signatures: signs audit checkpoints), both encrypted under the master key
  and used for nothing else. Auditors verify checkpoints with the signing key's public half.

Each encrypted keyset file is bound to its role by tink's associated data, so `kek.json` and
`index.json` cannot be swapped for one another. All writes are atomic 0600 replacements done
under an exclusive lock file, so concurrent `init`s or rotations on one host cannot clobber each
other. Deployments with several hosts must give them the same `keys/` (or the same master key
and a shared `kek.json`); an HSM-backed KEK is the later alternative.

Python cannot reliably erase memory: key material lives inside tink's C++ objects and the
parsed keyset protos, and is never logged, formatted into an error or returned to callers.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import fcntl
import json
import os
import stat
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import tink
from tink import aead, prf, proto_keyset_format, secret_key_access, signature
from tink.proto import ed25519_pb2, tink_pb2

from carevault.config import Settings
from carevault.crypto.files import write_secret_json

MASTER_FILE = "master.key"
KEK_FILE = "kek.json"
INDEX_FILE = "index.json"
AUDIT_MAC_FILE = "audit-mac.json"
AUDIT_SIGNING_FILE = "audit-signing.json"
LOCK_FILE = ".custody.lock"
MASTER_ENV = "CAREVAULT_MASTER_KEY"

# Associated data for each encrypted keyset file: binds the ciphertext to its role.
KEK_FILE_AD = b"carevault-kek-keyset"
INDEX_FILE_AD = b"carevault-index-keyset"
AUDIT_MAC_FILE_AD = b"carevault-audit-mac-keyset"
AUDIT_SIGNING_FILE_AD = b"carevault-audit-signing-keyset"

AEAD_TEMPLATE = aead.aead_key_templates.AES256_GCM
PRF_TEMPLATE = prf.prf_key_templates.HMAC_SHA256
# Raw output: a checkpoint signature is a plain 64-byte Ed25519 signature that any Ed25519
# implementation verifies with the published public key, without tink's key-id prefix.
SIGNING_TEMPLATE = tink_pb2.KeyTemplate(
    type_url=signature.signature_key_templates.ED25519.type_url,
    value=signature.signature_key_templates.ED25519.value,
    output_prefix_type=tink_pb2.RAW,
)

aead.register()
prf.register()
signature.register()


class KeyCustodyError(Exception):
    """Key material is missing, unreadable or inconsistent. The message says how to fix it."""


class InsecureKeyFileError(KeyCustodyError):
    """A key file may be read by users other than its owner."""


class MasterKeyError(KeyCustodyError):
    """The master key is missing, malformed, or does not open the keyset files."""


@dataclass(frozen=True)
class KekState:
    """One loaded version of `kek.json`. `aead` unwraps under any key in it, wraps under the
    primary; `key_ids` and `primary_id` are tink key ids (uint32)."""

    handle: tink.KeysetHandle
    aead: aead.Aead
    primary_id: int
    key_ids: frozenset[int]
    stamp: tuple[int, int, int]  # (inode, mtime_ns, size) of the file it was read from


def master_key_value(settings: Settings) -> str | None:
    """CAREVAULT_MASTER_KEY's value, if set."""
    return settings.master_key.get_secret_value() if settings.master_key else None


def generate_master_key_json() -> str:
    """A fresh master keyset in tink's cleartext JSON format (what `master.key` holds)."""
    handle = tink.new_keyset_handle(AEAD_TEMPLATE)
    return tink.json_proto_keyset_format.serialize(handle, secret_key_access.TOKEN)


def encode_master_key_env(keyset_json: str) -> str:
    """The value for `CAREVAULT_MASTER_KEY` that carries `keyset_json`."""
    return base64.b64encode(keyset_json.encode()).decode()


def ensure_keys(keys_dir: Path, master_key: str | None = None) -> None:
    """Create whatever of master.key, kek.json, index.json and the audit keys is missing
    (idempotent).

    `master_key` is the base64 value of CAREVAULT_MASTER_KEY, if set; then no master.key file
    is created. Existing files are only read, which also checks that they open.
    """
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with _locked(keys_dir):
        master = _load_or_create_master(keys_dir, master_key)
        for name, template, ad in (
            (KEK_FILE, AEAD_TEMPLATE, KEK_FILE_AD),
            (INDEX_FILE, PRF_TEMPLATE, INDEX_FILE_AD),
            (AUDIT_MAC_FILE, PRF_TEMPLATE, AUDIT_MAC_FILE_AD),
            (AUDIT_SIGNING_FILE, SIGNING_TEMPLATE, AUDIT_SIGNING_FILE_AD),
        ):
            path = keys_dir / name
            if path.exists():
                _read_encrypted(path, master, ad)
            else:
                _write_encrypted(path, tink.new_keyset_handle(template), master, ad)


class KeyCustody:
    """The loaded keys of one process. Thread-safe; cheap to query on hot paths."""

    def __init__(self, keys_dir: Path, master_key: str | None = None) -> None:
        self._dir = keys_dir
        self._master = load_master_aead(keys_dir, master_key)
        self._lock = threading.Lock()
        self._kek = self._read_kek()
        index_handle = _read_encrypted(keys_dir / INDEX_FILE, self._master, INDEX_FILE_AD)
        try:
            self._index_prf = index_handle.primitive(prf.PrfSet).primary()
        except tink.TinkError:
            raise KeyCustodyError(f"{keys_dir / INDEX_FILE} is not a tink PRF keyset") from None
        self._audit_keys: AuditKeys | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyCustody:
        return cls(settings.keys_dir, master_key_value(settings))

    @property
    def keys_dir(self) -> Path:
        return self._dir

    def kek(self) -> KekState:
        """The KEK as last loaded (no file system access): for unwrapping known key ids."""
        return self._kek

    def current_kek(self) -> KekState:
        """The KEK as the file holds it now (one stat; re-read only when it changed).

        Wrapping must use this, so that a process started before a rotation wraps new data keys
        under the new primary, not under a key the rotation is about to drop.
        """
        try:
            stamp = _stamp(self._dir / KEK_FILE)
        except FileNotFoundError:
            raise KeyCustodyError(f"{self._dir / KEK_FILE} is missing") from None
        if stamp != self._kek.stamp:
            with self._lock:
                if stamp != self._kek.stamp:
                    self._kek = self._read_kek()
        return self._kek

    def index_prf(self) -> prf.Prf:
        """The blind-index PRF (the primary of `index.json`)."""
        return self._index_prf

    def audit_keys(self) -> AuditKeys:
        """The audit chain's MAC key and checkpoint signing key (loaded on first use)."""
        if self._audit_keys is None:
            with self._lock:
                if self._audit_keys is None:
                    self._audit_keys = _load_audit_keys(self._dir, self._master)
        return self._audit_keys

    def rotate_kek(self) -> int:
        """Add a fresh AES256_GCM key to the KEK and make it primary; return its key id.

        Older keys stay (enabled) so that data keys wrapped under them still unwrap until
        `EnvelopeCipher.rewrap_all` has moved them to the new primary.
        """
        with _locked(self._dir):
            keyset = _keyset_proto(self._read_kek().handle)
            new_key = _fresh_key({key.key_id for key in keyset.key})
            keyset.key.append(new_key)
            keyset.primary_key_id = new_key.key_id
            self._replace_kek(keyset)
            return new_key.key_id

    def drop_kek_keys(self, key_ids: Iterable[int]) -> list[int]:
        """Remove non-primary KEK keys (only once no data key is wrapped under them: the
        caller checks that). Returns the ids actually removed; refuses to remove the primary."""
        wanted = set(key_ids)
        with _locked(self._dir):
            keyset = _keyset_proto(self._read_kek().handle)
            if keyset.primary_key_id in wanted:
                raise KeyCustodyError("refusing to drop the primary KEK key")
            dropped = [key.key_id for key in keyset.key if key.key_id in wanted]
            if dropped:
                self._replace_kek(
                    tink_pb2.Keyset(
                        primary_key_id=keyset.primary_key_id,
                        key=[key for key in keyset.key if key.key_id not in wanted],
                    )
                )
            return dropped

    # -- internals ---------------------------------------------------------------------------

    def _read_kek(self) -> KekState:
        path = self._dir / KEK_FILE
        try:
            # stat before reading: if the file is replaced in between, the next
            # `current_kek` sees a changed stamp and reads it again.
            stamp = _stamp(path)
        except FileNotFoundError:
            raise KeyCustodyError(f"{path} is missing. Fix: run `carevault init`") from None
        return _state_of(_read_encrypted(path, self._master, KEK_FILE_AD), stamp)

    def _replace_kek(self, keyset: tink_pb2.Keyset) -> None:
        handle = tink.proto_keyset_format.parse(keyset.SerializeToString(), secret_key_access.TOKEN)
        _write_encrypted(self._dir / KEK_FILE, handle, self._master, KEK_FILE_AD)
        with self._lock:
            self._kek = self._read_kek()


@dataclass(frozen=True)
class AuditKeys:
    mac: prf.Prf  # HMAC-SHA256
    signer: signature.PublicKeySign  # Ed25519, raw 64-byte signatures
    key_id: str  # names the signing key in checkpoints and the published key set
    public_key: bytes  # raw 32-byte Ed25519 public key


def _load_audit_keys(keys_dir: Path, master: aead.Aead) -> AuditKeys:
    mac_handle = _read_encrypted(keys_dir / AUDIT_MAC_FILE, master, AUDIT_MAC_FILE_AD)
    signing = _read_encrypted(keys_dir / AUDIT_SIGNING_FILE, master, AUDIT_SIGNING_FILE_AD)
    try:
        mac = mac_handle.primitive(prf.PrfSet).primary()
        signer = signing.primitive(signature.PublicKeySign)
        public = tink_pb2.Keyset.FromString(
            proto_keyset_format.serialize_without_secret(signing.public_keyset_handle())
        )
    except tink.TinkError:
        raise KeyCustodyError(f"the audit keysets in {keys_dir} are not usable") from None
    primary = next(k for k in public.key if k.key_id == public.primary_key_id)
    raw = ed25519_pb2.Ed25519PublicKey.FromString(primary.key_data.value).key_value
    return AuditKeys(mac, signer, f"audit-{primary.key_id:08x}", raw)


def _keyset_proto(handle: tink.KeysetHandle) -> tink_pb2.Keyset:
    # tink-py has no public keyset manager; editing a copy of the keyset proto under secret-key
    # access is how tink's own KeysetBuilder does it, and tink re-validates it on parse.
    return tink_pb2.Keyset.FromString(
        tink.proto_keyset_format.serialize(handle, secret_key_access.TOKEN)
    )


def _fresh_key(taken: set[int]) -> tink_pb2.Keyset.Key:
    """A new AES256_GCM key (generated by tink) whose key id is not in `taken`."""
    while True:
        (key,) = _keyset_proto(tink.new_keyset_handle(AEAD_TEMPLATE)).key
        if key.key_id not in taken:
            return key


def load_master_aead(keys_dir: Path, master_key: str | None = None) -> aead.Aead:
    """The master AEAD from `master_key` (CAREVAULT_MASTER_KEY's base64 value) or master.key."""
    if master_key:
        try:
            keyset_json = base64.b64decode(master_key.strip(), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            raise MasterKeyError(
                f"{MASTER_ENV} is not base64. Fix: set it to the base64 encoding of the master "
                "keyset JSON (e.g. `base64 -w0 master.key`)"
            ) from None
        return _master_primitive(keyset_json, MASTER_ENV)
    path = keys_dir / MASTER_FILE
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise MasterKeyError(
            f"{path} is missing. Fix: restore it from backup, or set {MASTER_ENV}"
        ) from None
    except OSError as err:
        raise MasterKeyError(f"{path} cannot be opened ({err.strerror})") from None
    with os.fdopen(fd) as handle:
        # Checked on the open descriptor, so the file we read is the file we checked.
        mode = stat.S_IMODE(os.fstat(handle.fileno()).st_mode)
        if mode & 0o077:
            raise InsecureKeyFileError(
                f"{path} is readable by other users (mode {mode:04o}); refusing to use the "
                f"master key. Fix: chmod 600 {path}"
            )
        keyset_json = handle.read()
    return _master_primitive(keyset_json, str(path))


def _master_primitive(keyset_json: str, source: str) -> aead.Aead:
    try:
        handle = tink.json_proto_keyset_format.parse(keyset_json, secret_key_access.TOKEN)
        return handle.primitive(aead.Aead)
    except (tink.TinkError, ValueError, json.JSONDecodeError):
        # tink's parse errors can quote the input; never repeat them.
        raise MasterKeyError(f"{source} is not a tink AEAD keyset in JSON format") from None


def _load_or_create_master(keys_dir: Path, master_key: str | None) -> aead.Aead:
    path = keys_dir / MASTER_FILE
    if master_key or path.exists():
        return load_master_aead(keys_dir, master_key)
    orphans = [name for name in (KEK_FILE, INDEX_FILE) if (keys_dir / name).exists()]
    if orphans:
        # A new master key could never open them: stop instead of silently starting over.
        raise MasterKeyError(
            f"{', '.join(orphans)} exist in {keys_dir} but {path} is missing. Fix: restore "
            f"master.key from backup, or set {MASTER_ENV}"
        )
    write_secret_json(path, json.loads(generate_master_key_json()))
    return load_master_aead(keys_dir)


def _read_encrypted(path: Path, master: aead.Aead, associated_data: bytes) -> tink.KeysetHandle:
    try:
        text = path.read_text()
    except OSError as err:
        raise KeyCustodyError(f"{path} cannot be read ({err.strerror})") from None
    try:
        return tink.json_proto_keyset_format.parse_encrypted(text, master, associated_data)
    except (tink.TinkError, ValueError):
        raise MasterKeyError(
            f"{path} cannot be decrypted with the master key. Fix: use the master.key (or "
            f"{MASTER_ENV}) it was created with"
        ) from None


def _write_encrypted(
    path: Path, handle: tink.KeysetHandle, master: aead.Aead, associated_data: bytes
) -> None:
    text = tink.json_proto_keyset_format.serialize_encrypted(handle, master, associated_data)
    write_secret_json(path, json.loads(text))


def _state_of(handle: tink.KeysetHandle, stamp: tuple[int, int, int]) -> KekState:
    info = handle.keyset_info()
    try:
        primitive = handle.primitive(aead.Aead)
    except tink.TinkError:
        raise KeyCustodyError("the KEK keyset is not a tink AEAD keyset") from None
    return KekState(
        handle=handle,
        aead=primitive,
        primary_id=info.primary_key_id,
        key_ids=frozenset(key.key_id for key in info.key_info),
        stamp=stamp,
    )


def _stamp(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return (st.st_ino, st.st_mtime_ns, st.st_size)


@contextlib.contextmanager
def _locked(keys_dir: Path) -> Iterator[None]:
    """Exclusive across processes on this host: creation and rotation are read-modify-write."""
    fd = os.open(keys_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
