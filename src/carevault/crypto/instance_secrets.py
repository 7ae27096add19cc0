"""Per-instance symmetric secrets kept in `keys/instance.json` (0600).

- `refresh_successor`: derives the successor of a refresh token, so that a retry inside the
  grace window gets the same rotated token without the server ever storing a token in the clear.
- `subject_hash`: keyed hash of attempted usernames for throttling and security events, so
  neither table holds a name.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path

from carevault.crypto.files import read_json, write_secret_json

FILE_NAME = "instance.json"
KEY_BYTES = 32


@dataclass(frozen=True)
class InstanceSecrets:
    refresh_successor: bytes
    subject_hash: bytes

    @classmethod
    def generate(cls) -> InstanceSecrets:
        return cls(secrets.token_bytes(KEY_BYTES), secrets.token_bytes(KEY_BYTES))

    def keyed_hash(self, value: str) -> str:
        return hmac.new(self.subject_hash, value.encode(), hashlib.sha256).hexdigest()


def load_or_create(keys_dir: Path) -> InstanceSecrets:
    path = keys_dir / FILE_NAME
    if not path.exists():
        created = InstanceSecrets.generate()
        write_secret_json(
            path,
            {
                "refresh_successor": base64.b64encode(created.refresh_successor).decode(),
                "subject_hash": base64.b64encode(created.subject_hash).decode(),
            },
        )
    data = read_json(path)
    return InstanceSecrets(
        refresh_successor=base64.b64decode(data["refresh_successor"]),
        subject_hash=base64.b64decode(data["subject_hash"]),
    )
