"""The worker's side of the shared state: the shared-memory store, a version-checked read
cache, and a manager proxy to the state server for what only the server does."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any
from zlib import crc32

from shared_state import codec
from shared_state import locks as _locks
from shared_state.locks import _pid_alive
from shared_state.server import fast_dumps
from shared_state.shm import ShmStore, locate, lock_hash, owner_pid
from shared_state.state import TaskiqState
from shared_state.versions import slot_of

_MISSING = object()
# Entries kept per process before the cache starts over; a refetch is always correct.
CACHE_LIMIT = 50_000


class SharedBackend:
    """Reads and writes the shared-memory store directly; asks the state server for what
    only it may do (``update``'s function, a lock whose owner died, ``init_once`` records).

    A cache entry is ``(slot, version, value, is_object)``: immutable values are kept as
    objects, others as their record and loaded again on every read, so callers get copies as
    they would from the store. An entry is served while the version slot of its key is
    unchanged.
    """

    def __init__(
        self, store: Any, shm: ShmStore, origin: tuple[str, bytes, str] | None = None
    ) -> None:
        self._store = store
        self._shm = shm
        self._slots = shm.slots
        self._cache: dict[str, tuple[int, int, Any, bool]] = {}
        self._lock_hashes: dict[str, int] = {}  # lock name -> its hash in the lock table
        self._origin = origin  # (address, authkey, version file): how to connect again

    def __reduce__(self) -> tuple[Any, ...]:
        """Only to start a process: the recipe carries the pool's authkey (as ``multiprocess``
        does with its own authkey, for the same reason)."""
        if self._origin is None or not _spawning():
            raise TypeError(
                "a shared TaskiqState can only be pickled to start a process (it would carry "
                "the pool's authkey); in another process, call connect_state() or use "
                "broker.state there"
            )
        return (connect_backend, self._origin)

    def _call(self, method: str, args: tuple[Any, ...] = ()) -> Any:
        """``proxy._callmethod(method, args)``, with the request pickled by the C pickler."""
        proxy = self._store
        try:
            conn = proxy._tls.connection
        except AttributeError:
            proxy._connect()
            conn = proxy._tls.connection
        conn.send_bytes(fast_dumps((proxy._id, method, args, {})))
        kind, result = conn.recv()
        if kind == "#RETURN":
            return result
        from multiprocess.managers import convert_to_error

        raise convert_to_error(kind, result)

    def encode(self, value: Any) -> bytes | None:
        return codec.try_record(value)

    # --- reads ----------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        value = self._lookup(key)
        return default if value is _MISSING else value

    def contains(self, key: str) -> bool:
        return self._lookup(key) is not _MISSING

    def _lookup(self, key: str) -> Any:
        entry = self._cache.get(key)
        if entry is not None and self._slots[entry[0]] == entry[1]:
            return entry[2] if entry[3] else codec.load_record(entry[2])
        kb, slot = locate(key)
        version, rec, cacheable = self._shm.get(key, kb, slot)
        if rec is None:
            if cacheable:
                self._remember(key, slot, version, _MISSING, True)
            return _MISSING
        value = codec.load_record(rec)
        if cacheable:
            self._remember_value(key, slot, version, value, rec)
        return value

    def _remember(self, key: str, slot: int, version: int, value: Any, is_object: bool) -> None:
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = (slot, version, value, is_object)

    def _remember_value(self, key: str, slot: int, version: int, value: Any, rec: bytes) -> None:
        if codec.is_immutable(value):
            self._remember(key, slot, version, value, True)
        else:
            self._remember(key, slot, version, rec, False)

    def keys(self) -> list[str]:
        return self._shm.keys()

    def items(self) -> list[tuple[str, Any]]:
        return [(k, codec.load_record(rec)) for k, rec in self._shm.items()]

    def length(self) -> int:
        return self._shm.length()

    # --- writes ---------------------------------------------------------------------
    def set(self, key: str, value: Any, blob: bytes) -> None:
        kb, slot = locate(key)
        version = self._shm.set(key, kb, slot, blob)
        self._remember_value(key, slot, version, value, blob)

    def delete(self, key: str) -> None:
        self._cache.pop(key, None)
        self._shm.delete(key, *locate(key))

    def clear(self) -> None:
        self._cache.clear()
        self._shm.clear()

    def incr(self, key: str, amount: int | float) -> Any:
        kb, slot = locate(key)
        version, new = self._shm.incr(key, kb, slot, amount)
        self._remember(key, slot, version, new, True)
        return new

    def update(self, key: str, fn: Callable[[Any], Any], default: Any) -> Any:
        try:
            fn_blob, default_rec = codec.dumps(fn), codec.record(default)
        except Exception as exc:
            raise TypeError(f"update of {key!r}: cannot send {fn!r} to the state: {exc}") from exc
        version, rec = self._call("update", (key, fn_blob, default_rec))
        value = codec.load_record(rec)
        self._remember_value(key, slot_of(key), version, value, rec)
        return value

    def setdefault(self, key: str, blob: bytes) -> Any:
        kb, slot = locate(key)
        version, current, cacheable = self._shm.setdefault(key, kb, slot, blob)
        value = codec.load_record(current)
        if cacheable:
            self._remember_value(key, slot, version, value, current)
        return value

    # --- locks ----------------------------------------------------------------------
    def acquire(self, name: str, token: str, pid: int, timeout: float) -> bool:
        """Take lock ``name`` for ``token``, waiting up to ``timeout`` seconds.

        A held lock is polled (20 µs, doubling to 2 ms); its owner's death is the server's
        to decide: asked at once when the owner's pid is gone, else every 0.2 s of waiting.
        """
        name_hash = self._lock_hashes.get(name) or self._lock_hash(name)
        mine = (pid << 32) | (crc32(token.encode()) or 1)  # lock_owner_word, inlined
        shm = self._shm
        owner = shm.try_lock(name_hash, mine)
        if owner == 0:
            return True
        deadline = time.monotonic() + max(timeout, 0.0)
        ask_at = deadline if timeout <= 0 else time.monotonic() + 0.2
        delay = 20e-6
        while True:
            now = time.monotonic()
            if now >= ask_at or not _pid_alive(owner_pid(owner)):
                ask_at = now + 0.2
                if self._call("reap_lock", (name_hash, owner)):
                    delay = 20e-6
            elif now >= deadline:
                return False
            else:
                time.sleep(min(delay, deadline - now))
                delay = min(delay * 2, 0.002)
            owner = shm.try_lock(name_hash, mine)
            if owner == 0:
                return True
            if timeout <= 0:
                return False

    def release(self, name: str, token: str) -> bool:
        name_hash = self._lock_hashes.get(name) or self._lock_hash(name)
        return self._shm.unlock(name_hash, (_locks._pid << 32) | (crc32(token.encode()) or 1))

    def _lock_hash(self, name: str) -> int:
        if len(self._lock_hashes) >= CACHE_LIMIT:
            self._lock_hashes.clear()
        self._lock_hashes[name] = name_hash = lock_hash(name)
        return name_hash

    # --- init_once records ------------------------------------------------------------
    def once_done(self, name: str) -> bool:
        return bool(self._call("once_done", (name,)))

    def mark_once(self, name: str) -> None:
        self._call("mark_once", (name,))


def _spawning() -> bool:
    """True while ``multiprocess`` or ``multiprocessing`` pickles a new process's arguments."""
    for name in ("multiprocess.context", "multiprocessing.context"):
        module = sys.modules.get(name)
        if module is not None and module.get_spawning_popen() is not None:
            return True
    return False


def connect_backend(address: str, authkey: bytes, version_file: str) -> SharedBackend:
    """A client of the state server at ``address``."""
    from shared_state.server import manager_class

    manager = manager_class()(address=address, authkey=authkey)
    manager.connect()
    store = manager.get_store()
    return SharedBackend(store, ShmStore(version_file), (address, authkey, version_file))


def connect_state(address: str, authkey: bytes, version_file: str) -> TaskiqState:
    """A ``TaskiqState`` backed by the state server at ``address``."""
    return TaskiqState(shared=connect_backend(address, authkey, version_file))
