"""A change counter shared by the worker processes of one host (a memory-mapped 8-byte file).

Revocations are written to the database; this counter tells the other workers, at the cost of
one memory read per request, that they should re-read them. It carries no data, only "changed".
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from pathlib import Path

_FORMAT = "<Q"


class ChangeSignal:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size < 8:
                os.ftruncate(fd, 8)
            self._fd = fd
            self._map = mmap.mmap(fd, 8)
        except BaseException:
            os.close(fd)
            raise

    def read(self) -> int:
        return struct.unpack_from(_FORMAT, self._map)[0]

    def bump(self) -> int:
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            value = self.read() + 1
            struct.pack_into(_FORMAT, self._map, 0, value)
            return value
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)
