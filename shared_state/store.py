"""The object that holds the shared state inside the state server process.

Values are kept as dill bytes exactly as clients sent them, so the server never has to
import a user's classes just to store them; only ``incr`` and ``update`` look inside.
"""

from __future__ import annotations

import threading
from typing import Any

from shared_state import codec
from shared_state.locks import LockTable
from shared_state.versions import VersionTable, slot_of

Blob = bytes
Versioned = tuple[int, Any]


class StateStore:
    """Key -> blob map with atomic read-modify-write operations and named locks."""

    def __init__(self, versions: VersionTable) -> None:
        self._data: dict[str, Blob] = {}
        self._mutex = threading.Lock()
        self._versions = versions
        self._locks = LockTable()
        self._once: set[str] = set()

    # --- plain access -------------------------------------------------------------------
    def get(self, key: str) -> tuple[int, Blob | None]:
        with self._mutex:
            return self._versions.read(slot_of(key)), self._data.get(key)

    def set(self, key: str, blob: Blob) -> int:
        with self._mutex:
            self._data[key] = blob
            return self._versions.bump(slot_of(key))

    def delete(self, key: str) -> int:
        with self._mutex:
            self._data.pop(key, None)
            return self._versions.bump(slot_of(key))

    def clear(self) -> None:
        with self._mutex:
            for key in self._data:
                self._versions.bump(slot_of(key))
            self._data.clear()

    def keys(self) -> list[str]:
        with self._mutex:
            return list(self._data)

    def items(self) -> list[tuple[str, Blob]]:
        with self._mutex:
            return list(self._data.items())

    def length(self) -> int:
        return len(self._data)

    def contains(self, key: str) -> bool:
        return key in self._data

    # --- atomic read-modify-write -------------------------------------------------------
    def incr(self, key: str, amount: int | float) -> Versioned:
        with self._mutex:
            blob = self._data.get(key)
            old = 0 if blob is None else codec.loads(blob)
            if not isinstance(old, (int, float)) or isinstance(old, bool):
                raise TypeError(f"cannot incr {key!r}: it holds a {type(old).__name__}")
            new = old + amount
            self._data[key] = codec.dumps(new)
            return self._versions.bump(slot_of(key)), new

    def update(self, key: str, fn_blob: Blob, default_blob: Blob) -> tuple[int, Blob]:
        """Apply a dill-pickled ``fn`` to the value, once, while no other write can happen."""
        fn = codec.loads(fn_blob)
        with self._mutex:
            blob = self._data.get(key)
            old = codec.loads(default_blob if blob is None else blob)
            new_blob = codec.dumps(fn(old))
            self._data[key] = new_blob
            return self._versions.bump(slot_of(key)), new_blob

    def setdefault(self, key: str, blob: Blob) -> tuple[int, Blob]:
        with self._mutex:
            current = self._data.get(key)
            if current is None:
                self._data[key] = current = blob
                self._versions.bump(slot_of(key))
            return self._versions.read(slot_of(key)), current

    # --- named locks --------------------------------------------------------------------
    def acquire(self, name: str, token: str, pid: int, timeout: float) -> bool:
        return self._locks.acquire(name, token, pid, timeout)

    def release(self, name: str, token: str) -> bool:
        return self._locks.release(name, token)

    # --- init_once records --------------------------------------------------------------
    def once_done(self, name: str) -> bool:
        return name in self._once

    def mark_once(self, name: str) -> None:
        self._once.add(name)
