"""What the state server does for the shared state, beside the shared-memory store it owns.

The values themselves live in the shared-memory store (``shm``), which every process reads
and writes directly; the server creates it empty, and keeps for itself what only it may
do: run the function of ``update`` (once, under LMDB's writer mutex), decide that the owner
of a lock died, and keep the ``init_once`` records.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from shared_state import codec
from shared_state.shm import ShmStore, locate, owner_pid

REAP_EVERY = 1.0  # seconds between two rounds of the server's reaper


def owner_dead(pid: int) -> bool:
    """True when process ``pid`` is gone, or a zombie (it will never release anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] in (b"Z", b"X")
    except (OSError, IndexError):
        return False


class StateStore:
    """The server's side: ``update`` functions, dead lock owners, ``init_once`` records."""

    def __init__(self, shm: ShmStore) -> None:
        self._shm = shm
        self._once: set[str] = set()

    def update(self, key: str, fn_blob: bytes, default_rec: bytes) -> tuple[int, bytes]:
        """Apply a dill-pickled ``fn`` to the value, once, while no other write can happen."""
        fn = codec.loads(fn_blob)
        kb, slot = locate(key)
        return self._shm.update(key, kb, slot, fn, default_rec)

    def reap(self) -> int:
        """Release every lock whose owner died, free dead readers' slots; the count released.

        The server runs this every ``REAP_EVERY`` seconds; a waiter also asks for its own
        lock (``reap_lock``) as soon as it sees the owner's pid gone.
        """
        self._shm.reader_check()
        released = 0
        for name_hash, owner in self._shm.held_locks():
            if owner_dead(owner_pid(owner)) and self._shm.unlock(name_hash, owner):
                released += 1
        return released

    def start_reaper(self) -> threading.Thread:
        def reap_forever() -> None:
            while not threading.Event().wait(REAP_EVERY):
                try:
                    self.reap()
                except Exception:  # never the reaper's end: the next round tries again
                    logging.getLogger(__name__).exception("state reaper")

        reaper = threading.Thread(target=reap_forever, name="state-reaper", daemon=True)
        reaper.start()
        return reaper

    def reap_lock(self, name_hash: int, owner: int) -> bool:
        """Release a lock if ``owner`` still holds it and that process died."""
        if self._shm.lock_owner(name_hash) != owner or not owner_dead(owner_pid(owner)):
            return False
        return self._shm.unlock(name_hash, owner)

    def length(self) -> int:
        return self._shm.length()

    def once_done(self, name: str) -> bool:
        return name in self._once

    def mark_once(self, name: str) -> None:
        self._once.add(name)

    def info(self) -> dict[str, Any]:
        return {"path": self._shm.path, "pid": os.getpid()}
