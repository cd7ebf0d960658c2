"""``TaskiqState``: one class for a process-local state and for the pool's shared state.

A state always has a local tier (a dict). A shared state also has a shared backend (the
state server); values that can be pickled live there, values that cannot (clients,
connections, locks) stay in the local tier of the process that set them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

# Imported at run time, not only for type checking: dependency injection by type
# (``state: TaskiqState = TaskiqDepends()``) resolves the hints of ``__init__``, and an
# unresolvable hint makes taskiq_dependencies warn for every task that asks for a state.
from shared_state.backend import StateBackend
from shared_state.locks import LockTable, StateLock

_MISSING: Any = object()


def _check_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"state keys are str, not {type(key).__name__}: {key!r}")
    return key


class TaskiqState:
    """Key-value state with taskiq's dict/attribute style, the seed's methods and atomics."""

    __slots__ = ("_guard", "_local", "_local_locks", "_shared")

    def __init__(self, shared: StateBackend | None = None) -> None:
        object.__setattr__(self, "_local", {})
        object.__setattr__(self, "_guard", threading.RLock())
        object.__setattr__(self, "_local_locks", LockTable())
        object.__setattr__(self, "_shared", shared)
        self._local: dict[str, Any]
        self._guard: threading.RLock
        self._local_locks: LockTable
        self._shared: StateBackend | None

    # --- the seed's methods -----------------------------------------------------------
    def set_value(self, key: str, value: Any) -> None:
        """Store ``value``; under a pool every process sees it once this returns."""
        _check_key(key)
        shared = self._shared
        if shared is not None:
            blob = shared.encode(value)
            if blob is not None:
                shared.set(key, value, blob)
                self._local.pop(key, None)
                return
        with self._guard:
            self._local[key] = value

    def get_value(self, key: str, default: Any = None) -> Any:
        _check_key(key)
        value = self._local.get(key, _MISSING)
        if value is not _MISSING:
            return value
        if self._shared is not None:
            return self._shared.get(key, default)
        return default

    get = get_value

    def delete_value(self, key: str) -> None:
        """Remove ``key`` from both tiers; a missing key is not an error."""
        _check_key(key)
        with self._guard:
            self._local.pop(key, None)
        if self._shared is not None:
            self._shared.delete(key)

    def clear(self) -> None:
        with self._guard:
            self._local.clear()
        if self._shared is not None:
            self._shared.clear()

    def keys(self) -> list[str]:
        local = list(self._local)
        if self._shared is None:
            return local
        seen = set(local)
        shared_keys: list[str] = self._shared.keys()
        return local + [k for k in shared_keys if k not in seen]

    def values(self) -> list[Any]:
        return [value for _, value in self.items()]

    def items(self) -> list[tuple[str, Any]]:
        local = list(self._local.items())
        if self._shared is None:
            return local
        seen = {k for k, _ in local}
        return local + [(k, v) for k, v in self._shared.items() if k not in seen]

    # --- tiers ------------------------------------------------------------------------
    def is_shared(self, key: str) -> bool:
        """True when ``key`` lives in the shared tier (seen by every process of the pool)."""
        _check_key(key)
        if self._shared is None or key in self._local:
            return False
        return self._shared.contains(key)

    @property
    def shared(self) -> bool:
        """True when this state is backed by a state server."""
        return self._shared is not None

    # --- atomic operations ------------------------------------------------------------
    def incr(self, key: str, amount: int | float = 1) -> Any:
        """Add ``amount`` to the number at ``key`` (0 when missing); returns the new value."""
        _check_key(key)
        if self._shared is not None and key not in self._local:
            return self._shared.incr(key, amount)
        with self._guard:
            old = self._local.get(key, 0)
            if not isinstance(old, (int, float)) or isinstance(old, bool):
                raise TypeError(f"cannot incr {key!r}: it holds a {type(old).__name__}")
            self._local[key] = new = old + amount
            return new

    def update(self, key: str, fn: Callable[[Any], Any], default: Any = None) -> Any:
        """Replace the value with ``fn(old)`` atomically (``fn`` runs once); returns it."""
        _check_key(key)
        if self._shared is not None and key not in self._local:
            return self._shared.update(key, fn, default)
        with self._guard:
            self._local[key] = new = fn(self._local.get(key, default))
            return new

    def setdefault(self, key: str, default: Any = None) -> Any:
        """The value at ``key``, first storing ``default`` there if the key is missing."""
        _check_key(key)
        with self._guard:
            if key in self._local:
                return self._local[key]
            if self._shared is None:
                return self._local.setdefault(key, default)
            blob = self._shared.encode(default)
            if blob is not None:
                return self._shared.setdefault(key, blob)
            value = self._shared.get(key, _MISSING)
            if value is not _MISSING:
                return value
            return self._local.setdefault(key, default)

    def lock(self, name: str) -> StateLock:
        """A named lock, across every process of the pool when the state is shared."""
        _check_key(name)
        return StateLock(self._shared if self._shared is not None else self._local_locks, name)

    # --- dict style -------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        value = self.get_value(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        self.set_value(key, value)

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        self.delete_value(key)

    def __contains__(self, key: object) -> bool:
        _check_key(key)
        assert isinstance(key, str)
        if key in self._local:
            return True
        return self._shared is not None and self._shared.contains(key)

    def __len__(self) -> int:
        if self._shared is None:
            return len(self._local)
        if not self._local:  # nothing to de-duplicate: let the backend count
            return self._shared.length()
        return len(self.keys())

    def __iter__(self) -> Any:
        return iter(self.keys())

    # --- attribute style --------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in TaskiqState.__slots__:
            raise AttributeError(name)  # protocols (copy, pickle) and unset internals
        value = self.get_value(name, _MISSING)
        if value is _MISSING:
            raise AttributeError(f"state has no value {name!r}")
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        self.set_value(name, value)

    def __delattr__(self, name: str) -> None:
        if name not in self:
            raise AttributeError(f"state has no value {name!r}")
        self.delete_value(name)

    def __copy__(self) -> TaskiqState:
        """Another handle on the same shared tier, with a copy of the local tier."""
        twin = TaskiqState(self._shared)
        twin._local.update(self._local)
        return twin

    def __repr__(self) -> str:
        kind = "shared" if self._shared is not None else "local"
        return f"<TaskiqState {kind} keys={self.keys()!r}>"
