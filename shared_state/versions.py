"""A table of version counters in a memory-mapped file, shared by every process of a pool.

The state server bumps the slot of a key on every write to it; a reader compares the slot
with the version it cached and only asks the server when they differ. Several keys share a
slot, which costs an extra round trip now and then, never a stale read.
"""

from __future__ import annotations

import mmap
import os
import struct
import zlib

SLOTS = 8192
_SLOT = struct.Struct("<Q")


def slot_of(key: str) -> int:
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % SLOTS


class VersionTable:
    """Read (and, in the server, bump) the version slots of one version file."""

    def __init__(self, path: str, *, writable: bool = False) -> None:
        flags = os.O_RDWR | os.O_CREAT if writable else os.O_RDONLY
        fd = os.open(path, flags, 0o600)
        try:
            if writable and os.fstat(fd).st_size != SLOTS * _SLOT.size:
                os.ftruncate(fd, SLOTS * _SLOT.size)
            if writable:  # every page on disk now: a full disk later must not SIGBUS a bump
                os.posix_fallocate(fd, 0, SLOTS * _SLOT.size)
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            self._map = mmap.mmap(fd, SLOTS * _SLOT.size, access=access)
        finally:
            os.close(fd)

    def read(self, slot: int) -> int:
        return _SLOT.unpack_from(self._map, slot * _SLOT.size)[0]

    def bump(self, slot: int) -> int:
        """Increment a slot; only the state server calls this, under its lock."""
        value = _SLOT.unpack_from(self._map, slot * _SLOT.size)[0] + 1
        _SLOT.pack_into(self._map, slot * _SLOT.size, value)
        return value

    def close(self) -> None:
        self._map.close()
