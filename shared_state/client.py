"""The worker's side of the shared state: a manager proxy plus a version-checked read cache."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from shared_state import codec
from shared_state.server import fast_dumps
from shared_state.state import TaskiqState
from shared_state.versions import VersionTable, slot_of

_MISSING = object()
# Entries kept per process before the cache starts over; a refetch is always correct.
CACHE_LIMIT = 50_000


class SharedBackend:
    """Talks to the state server; serves unchanged keys from a per-process cache.

    A cache entry is ``(slot version, value, is_object)``: immutable values are kept as
    objects, others as bytes and copied on every read, so callers get copies as they would
    from the server.
    """

    def __init__(
        self, store: Any, versions: VersionTable, origin: tuple[str, bytes, str] | None = None
    ) -> None:
        self._store = store
        self._versions = versions
        self._cache: dict[str, tuple[int, Any, bool]] = {}
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
        return codec.try_dumps(value)

    # --- reads ----------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        value = self._lookup(key)
        return default if value is _MISSING else value

    def contains(self, key: str) -> bool:
        return self._lookup(key) is not _MISSING

    def _lookup(self, key: str) -> Any:
        entry = self._cache.get(key)
        if entry is not None and self._versions.read(slot_of(key)) == entry[0]:
            return entry[1] if entry[2] else codec.loads(entry[1])
        version, blob = self._call("get", (key,))
        if blob is None:
            self._remember(key, version, _MISSING, True)
            return _MISSING
        value = codec.loads(blob)
        self._remember_value(key, version, value, blob)
        return value

    def _remember(self, key: str, version: int, value: Any, is_object: bool) -> None:
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.clear()
        self._cache[key] = (version, value, is_object)

    def _remember_value(self, key: str, version: int, value: Any, blob: bytes) -> None:
        if codec.is_immutable(value):
            self._remember(key, version, value, True)
        else:
            self._remember(key, version, blob, False)

    def keys(self) -> list[str]:
        return list(self._call("keys"))

    def items(self) -> list[tuple[str, Any]]:
        return [(k, codec.loads(b)) for k, b in self._call("items")]

    def length(self) -> int:
        return int(self._call("length"))

    # --- writes ---------------------------------------------------------------------
    def set(self, key: str, value: Any, blob: bytes) -> None:
        version = self._call("set", (key, blob))
        self._remember_value(key, version, value, blob)

    def delete(self, key: str) -> None:
        self._cache.pop(key, None)
        self._call("delete", (key,))

    def clear(self) -> None:
        self._cache.clear()
        self._call("clear")

    def incr(self, key: str, amount: int | float) -> Any:
        version, new = self._call("incr", (key, amount))
        self._remember(key, version, new, True)
        return new

    def update(self, key: str, fn: Callable[[Any], Any], default: Any) -> Any:
        try:
            fn_blob, default_blob = codec.dumps(fn), codec.dumps(default)
        except Exception as exc:
            raise TypeError(f"update of {key!r}: cannot send {fn!r} to the state: {exc}") from exc
        version, blob = self._call("update", (key, fn_blob, default_blob))
        value = codec.loads(blob)
        self._remember_value(key, version, value, blob)
        return value

    def setdefault(self, key: str, blob: bytes) -> Any:
        version, current = self._call("setdefault", (key, blob))
        value = codec.loads(current)
        self._remember_value(key, version, value, current)
        return value

    # --- locks ----------------------------------------------------------------------
    def acquire(self, name: str, token: str, pid: int, timeout: float) -> bool:
        return bool(self._call("acquire", (name, token, pid, timeout)))

    def release(self, name: str, token: str) -> bool:
        return bool(self._call("release", (name, token)))

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
    return SharedBackend(store, VersionTable(version_file), (address, authkey, version_file))


def connect_state(address: str, authkey: bytes, version_file: str) -> TaskiqState:
    """A ``TaskiqState`` backed by the state server at ``address``."""
    return TaskiqState(shared=connect_backend(address, authkey, version_file))
