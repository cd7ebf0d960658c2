"""A table of version counters in a memory-mapped file, shared by every process of a pool.

Every write to a key stores, in the slot of that key, the id of the LMDB write transaction
that made it (see ``shm``), while it holds LMDB's writer lock; a reader compares the slot
with the version it cached and reads the store only when they differ. Several keys share a
slot, which costs an extra read now and then, never a stale one.

Slots are native 8-byte words at aligned offsets, read and written whole by one machine
instruction (``memoryview`` of format ``Q``), so a reader never sees half of a version.
"""

from __future__ import annotations

import mmap
import os
import zlib

SLOTS = 8192
_WORD = 8
# After the version slots: the lock table (see ``shm``), a header word (entries in use) and
# LOCK_SLOTS entries of two words (name hash, owner).
LOCK_SLOTS = 16384
LOCK_WORDS = 2 + 2 * LOCK_SLOTS


def slot_of(key: str) -> int:
    return zlib.crc32(key.encode("utf-8", "surrogatepass")) % SLOTS


class VersionTable:
    """The version slots of one version file.

    The state server creates it (``create=True`` zeroes it); clients map it writable
    (``writable=True``) to publish their own writes, or read-only.
    """

    def __init__(self, path: str, *, writable: bool = False, create: bool = False) -> None:
        size = (SLOTS + LOCK_WORDS) * _WORD
        if create:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        else:
            fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        try:
            if create:
                os.ftruncate(fd, size)
                # every page on disk now: a full disk later must not SIGBUS a bump
                os.posix_fallocate(fd, 0, size)
            access = mmap.ACCESS_WRITE if writable or create else mmap.ACCESS_READ
            self._map = mmap.mmap(fd, size, access=access)
        finally:
            os.close(fd)
        self._words = memoryview(self._map).cast("Q")
        self.slots = self._words[:SLOTS]
        self.locks = self._words[SLOTS:]

    def read(self, slot: int) -> int:
        return int(self.slots[slot])

    def bump(self, slot: int) -> int:
        """Increment a slot (callers serialise bumps of one table: a lock, or LMDB's)."""
        value = self.slots[slot] + 1
        self.slots[slot] = value
        return int(value)

    def close(self) -> None:
        for view in (self.slots, self.locks, self._words):
            view.release()
        self._map.close()
