"""Task ids as taskiq's default generator makes them (``uuid4().hex``), 256 per read of
``os.urandom``.

Building a ``UUID`` costs a producer 1.8 µs per task and a read of ``os.urandom(16)`` is a
system call each; under load, a producer's ids cost it 2.1 µs of its 35 per task
(``python -m bench.where``). Here one read of 4 KiB gives 256 ids, each with the version and
variant bits uuid4 sets, so they parse as ``uuid.UUID(task_id).version == 4``.

The ids wait in a deque: ``popleft`` hands each to one caller also when threads kick at
once, and a forked child forgets the parent's (it would otherwise hand out the same ids).
"""

from __future__ import annotations

import os
from collections import deque

_PER_READ = 256
_ids: deque[str] = deque()


def _refill() -> None:
    raw = bytearray(os.urandom(16 * _PER_READ))
    raw[6::16] = bytes((b & 0x0F) | 0x40 for b in raw[6::16])  # version 4
    raw[8::16] = bytes((b & 0x3F) | 0x80 for b in raw[8::16])  # variant RFC 4122
    digits = raw.hex()
    _ids.extend([digits[i : i + 32] for i in range(0, len(digits), 32)])


def uuid4_hex() -> str:
    """A new random task id: 32 hex digits of a version 4 UUID."""
    while True:
        try:
            return _ids.popleft()
        except IndexError:  # empty, or other threads took what the last refill gave
            _refill()


os.register_at_fork(after_in_child=_ids.clear)
