"""``TaskiqState``: taskiq's state class, for a process-local state and the pool's shared state.

A subclass of ``taskiq.TaskiqState`` (a ``UserDict`` with attribute access). Its ``data`` dict
is the **local tier**: the values of this process only. A shared state also has a shared
backend (the state server, or Redis); values that can be pickled live there, values that
cannot (clients, connections, locks), and values kept local on purpose with ``set_local``,
stay in the local tier of the process that set them. Every read goes through both tiers,
local first: ``UserDict``'s methods that would read ``data`` alone are overridden here.

What taskiq expects of it: ``state["k"]``, ``state.k`` (``AttributeError`` when missing),
``del state.k``, ``len``/``in``/iteration, ``get``. Where pool differs: keys are ``str`` only
(``TypeError`` otherwise), ``keys()``/``values()``/``items()`` return lists, ``update(key, fn)``
is an atomic update besides ``update(mapping)``, and a shared value is a copy.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy as _copy
import inspect
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any, overload

import taskiq

# Imported at run time, not only for type checking: dependency injection by type
# (``state: TaskiqState = TaskiqDepends()``) resolves the hints of ``__init__``, and an
# unresolvable hint makes taskiq_dependencies warn for every task that asks for a state.
from shared_state.backend import StateBackend
from shared_state.locks import LockTable, StateLock

_MISSING: Any = object()
# Instance attributes of the class itself; all live in ``__dict__`` (never set through
# ``__setattr__``, which stores state values). ``__getattr__`` must not look them up as state
# values while they do not exist yet (unpickling, copying).
_INTERNALS = frozenset({"data", "_shared", "_guard", "_local_locks", "_pinned", "_once"})
_NOT_COPIED = ("_guard", "_local_locks")  # per object: a copy or an unpickled state gets new ones
# Lock names of ``init_once``: a namespace user lock names are very unlikely to enter.
_ONCE_LOCK = "pool.init_once/"
# ``init_once`` names whose ``fn`` runs in the current context (thread or task): calling
# ``init_once`` again with one of them would wait for itself forever.
_running_once: contextvars.ContextVar[frozenset[tuple[int, str]]] = contextvars.ContextVar(
    "shared_state_running_once", default=frozenset()
)


def _check_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"state keys are str, not {type(key).__name__}: {key!r}")
    return key


def _pairs(other: Any, kwargs: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """The (key, value) pairs of ``update(other, **kwargs)``, keys checked before any write."""
    if hasattr(other, "keys"):
        pairs = [(key, other[key]) for key in other.keys()]  # noqa: SIM118 (any keys())
    else:
        pairs = [(key, value) for key, value in other]
    pairs.extend(kwargs.items())
    for key, _ in pairs:
        _check_key(key)
    return pairs


class TaskiqState(taskiq.TaskiqState):
    """taskiq's state with the seed's methods, atomic operations, locks and a shared tier.

    ``TaskiqState()`` is local to the process; ``connect_state(...)`` (or ``RedisState``)
    gives one backed by a shared store, seen by every process that connects to it.
    """

    data: dict[str, Any]
    _shared: StateBackend | None
    _guard: threading.RLock
    _local_locks: LockTable
    _pinned: set[str]
    _once: set[str]

    def __init__(self, shared: StateBackend | None = None) -> None:
        super().__init__()  # taskiq's: ``self.__dict__["data"] = {}``, the local tier here
        fields = self.__dict__
        fields["_shared"] = shared
        fields["_pinned"] = set()  # keys kept local by ``set_local``
        fields["_once"] = set()  # ``init_once`` names known to be done
        self._new_guards()

    def _new_guards(self) -> None:
        self.__dict__["_guard"] = threading.RLock()
        self.__dict__["_local_locks"] = LockTable()

    # --- the seed's methods -----------------------------------------------------------
    def set_value(self, key: str, value: Any) -> None:
        """Store ``value``; under a pool every process sees it once this returns.

        A value that cannot be pickled, or a key given to ``set_local``, stays local.
        """
        _check_key(key)
        shared = self._shared
        if shared is not None and key not in self._pinned:
            blob = shared.encode(value)
            if blob is not None:
                shared.set(key, value, blob)
                self.data.pop(key, None)
                return
        with self._guard:
            self.data[key] = value

    def get_value(self, key: str, default: Any = None) -> Any:
        _check_key(key)
        value = self.data.get(key, _MISSING)
        if value is not _MISSING:
            return value
        shared = self._shared
        if shared is not None:
            return shared.get(key, default)
        return default

    get = get_value

    def delete_value(self, key: str) -> None:
        """Remove ``key`` from both tiers; a missing key is not an error."""
        _check_key(key)
        with self._guard:
            self.data.pop(key, None)
            self._pinned.discard(key)
        if self._shared is not None:
            self._shared.delete(key)

    def clear(self) -> None:
        """Remove every value of both tiers (``init_once`` records stay: they are not values)."""
        with self._guard:
            self.data.clear()
            self._pinned.clear()
        if self._shared is not None:
            self._shared.clear()

    def keys(self) -> list[str]:  # type: ignore[override]
        local = list(self.data)
        if self._shared is None:
            return local
        seen = set(local)
        shared_keys: list[str] = self._shared.keys()
        return local + [k for k in shared_keys if k not in seen]

    def values(self) -> list[Any]:  # type: ignore[override]
        return [value for _, value in self.items()]

    def items(self) -> list[tuple[str, Any]]:  # type: ignore[override]
        local = list(self.data.items())
        if self._shared is None:
            return local
        seen = {k for k, _ in local}
        return local + [(k, v) for k, v in self._shared.items() if k not in seen]

    # --- tiers ------------------------------------------------------------------------
    def set_local(self, key: str, value: Any) -> None:
        """Keep ``value`` in this process only, even though it could be shared.

        For a per-process object that happens to be picklable (a cache, a client config, an
        id of this worker). The key stays local for later writes too (``set_value``,
        ``state[key] = ...``, ``state.key = ...``, ``incr``, ``update``) until
        ``delete_value``/``del``/``clear`` removes it; ``is_shared(key)`` is False. In this
        process it hides a shared value of the same key (deleting it deletes both).
        """
        _check_key(key)
        with self._guard:
            self._pinned.add(key)
            self.data[key] = value

    def is_shared(self, key: str) -> bool:
        """True when ``key`` lives in the shared tier (seen by every process of the pool)."""
        _check_key(key)
        if self._shared is None or key in self.data:
            return False
        return self._shared.contains(key)

    @property
    def shared(self) -> bool:
        """True when this state is backed by a shared store."""
        return self._shared is not None

    # --- atomic operations ------------------------------------------------------------
    def incr(self, key: str, amount: int | float = 1) -> Any:
        """Add ``amount`` to the number at ``key`` (0 when missing); returns the new value."""
        _check_key(key)
        if self._shared is not None and key not in self.data:
            return self._shared.incr(key, amount)
        with self._guard:
            old = self.data.get(key, 0)
            if not isinstance(old, (int, float)) or isinstance(old, bool):
                raise TypeError(f"cannot incr {key!r}: it holds a {type(old).__name__}")
            self.data[key] = new = old + amount
            return new

    @overload  # type: ignore[override]
    def update(self, key: str, /, fn: Callable[[Any], Any], default: Any = None) -> Any: ...

    @overload
    def update(self, other: Mapping[str, Any], /, **values: Any) -> None: ...

    @overload
    def update(self, other: Iterable[tuple[str, Any]], /, **values: Any) -> None: ...

    @overload
    def update(self, /, **values: Any) -> None: ...

    def update(self, /, *args: Any, **kwargs: Any) -> Any:
        """Two forms, told apart by their arguments.

        ``update(key, fn, default=None)`` (``key`` a ``str``; also ``update(key=..., fn=...)``)
        replaces the value at ``key`` with ``fn(old)`` atomically, ``fn`` running exactly once
        (``old`` is ``default`` when the key is missing), and returns the new value.

        ``update(mapping_or_pairs, **values)`` / ``update(**values)`` is ``MutableMapping``'s:
        ``set_value`` for each pair (every key checked before the first write).
        """
        if args and isinstance(args[0], str):
            return self._update_key(*args, **kwargs)
        if (
            not args
            and {"key", "fn"} <= kwargs.keys() <= {"key", "fn", "default"}
            and isinstance(kwargs["key"], str)
            and callable(kwargs["fn"])
        ):
            return self._update_key(**kwargs)
        if len(args) > 1:
            raise TypeError(f"update expected at most 1 positional argument, got {len(args)}")
        for key, value in _pairs(args[0] if args else (), kwargs):
            self.set_value(key, value)
        return None

    def _update_key(self, key: str, fn: Callable[[Any], Any], default: Any = None) -> Any:
        if not callable(fn):
            raise TypeError(f"update({key!r}, fn): fn must be callable, got {fn!r}")
        if self._shared is not None and key not in self.data:
            return self._shared.update(key, fn, default)
        with self._guard:
            self.data[key] = new = fn(self.data.get(key, default))
            return new

    def setdefault(self, key: str, default: Any = None) -> Any:
        """The value at ``key``, first storing ``default`` there if the key is missing."""
        _check_key(key)
        with self._guard:
            if key in self.data:
                return self.data[key]
            if self._shared is None:
                return self.data.setdefault(key, default)
            blob = self._shared.encode(default)
            if blob is not None:
                return self._shared.setdefault(key, blob)
            value = self._shared.get(key, _MISSING)
            if value is not _MISSING:
                return value
            return self.data.setdefault(key, default)

    def pop(self, key: str, default: Any = _MISSING) -> Any:
        """Remove ``key`` and return its value (``default``, else ``KeyError``, if missing).

        Not atomic across processes: use ``update`` or a ``lock`` for that.
        """
        value = self.get_value(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise KeyError(key)
            return default
        self.delete_value(key)
        return value

    def lock(self, name: str) -> StateLock:
        """A named lock, across every process of the pool when the state is shared.

        ``with state.lock(name):`` or ``async with state.lock(name):``; the async form waits
        in a helper thread, so the event loop keeps running other tasks meanwhile.
        """
        _check_key(name)
        return StateLock(self._shared if self._shared is not None else self._local_locks, name)

    # --- once per store ---------------------------------------------------------------
    def init_once(self, name: str, fn: Callable[[TaskiqState], Any]) -> bool:
        """Run ``fn(state)`` once per store, however many processes call this; True if this
        call ran it.

        For a shared state "once" is for the lifetime of the shared store (the pool's state
        server; with ``RedisState``, as long as its keys live): across processes and threads,
        a caller that finds ``fn`` running elsewhere waits until it finished, then skips it.
        For a local state, once per state object. Meant for a WORKER_STARTUP handler that
        initialises shared data, so that a worker added or replaced later does not reset it::

            state.init_once("counters", lambda s: s.set_value("counter", 0))

        If ``fn`` raises, nothing is recorded and the next call runs it again; if the process
        running it dies, the next caller runs it again too (with ``RedisState``, once the
        lock's ``lock_timeout`` passed; ``fn`` must finish within it). ``clear()`` does not
        forget what ran. ``fn`` must be synchronous: in async code, use
        ``await state.ainit_once(name, fn)``.
        """
        self._check_once(name, fn)
        if inspect.iscoroutinefunction(fn):
            raise TypeError(f"init_once({name!r}): fn is async; use await state.ainit_once()")
        if self._once_done(name):
            return False
        with self._running(name), self.lock(_ONCE_LOCK + name):
            if self._once_done(name):
                return False
            result = fn(self)
            if inspect.isawaitable(result):
                if inspect.iscoroutine(result):
                    result.close()
                raise TypeError(
                    f"init_once({name!r}): fn returned an awaitable; use await state.ainit_once()"
                )
            self._mark_once(name)
        return True

    async def ainit_once(
        self, name: str, fn: Callable[[TaskiqState], Awaitable[Any] | Any]
    ) -> bool:
        """``init_once`` for async code: ``fn`` may be sync or async, and waiting for another
        process's ``fn`` never blocks the event loop."""
        self._check_once(name, fn)
        if self._once_done(name):
            return False
        with self._running(name):
            async with self.lock(_ONCE_LOCK + name):
                if self._once_done(name):
                    return False
                result = fn(self)
                if inspect.isawaitable(result):
                    await result
                self._mark_once(name)
        return True

    @staticmethod
    def _check_once(name: str, fn: Any) -> None:
        _check_key(name)
        if not callable(fn):
            raise TypeError(f"init_once({name!r}, fn): fn must be callable, got {fn!r}")

    def _once_done(self, name: str) -> bool:
        if name in self._once:
            return True
        if self._shared is not None and self._shared.once_done(name):
            self._once.add(name)  # a record is never removed: no need to ask again
            return True
        return False

    def _mark_once(self, name: str) -> None:
        if self._shared is not None:
            self._shared.mark_once(name)
        self._once.add(name)

    @contextlib.contextmanager
    def _running(self, name: str) -> Iterator[None]:
        store = self._shared if self._shared is not None else self._local_locks
        mark = (id(store), name)
        running = _running_once.get()
        if mark in running:
            raise RuntimeError(f"init_once({name!r}) called from inside its own fn")
        token = _running_once.set(running | {mark})
        try:
            yield
        finally:
            _running_once.reset(token)

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
        if key in self.data:
            return True
        return self._shared is not None and self._shared.contains(key)

    def __len__(self) -> int:
        if self._shared is None:
            return len(self.data)
        if not self.data:  # nothing to de-duplicate: let the backend count
            return self._shared.length()
        return len(self.keys())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __or__(self, other: Any) -> TaskiqState:  # type: ignore[override]
        """A new local state with this state's values, then ``other``'s."""
        if not isinstance(other, Mapping):
            return NotImplemented
        merged = TaskiqState()
        merged.update(self.items())
        merged.update(other)
        return merged

    def __ror__(self, other: Any) -> TaskiqState:  # type: ignore[override]
        if not isinstance(other, Mapping):
            return NotImplemented
        merged = TaskiqState()
        merged.update(other)
        merged.update(self.items())
        return merged

    def __ior__(self, other: Any) -> TaskiqState:  # type: ignore[override]
        self.update(other)
        return self

    # --- attribute style --------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in _INTERNALS:
            raise AttributeError(name)  # protocols (copy, pickle) and unset internals
        value = self.get_value(name, _MISSING)
        if value is _MISSING:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        self.set_value(name, value)

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(
                f"'{type(self).__name__}' object has no attribute '{name}'"
            ) from None

    # --- copies and pickles -----------------------------------------------------------
    def _twin(self, local: dict[str, Any]) -> TaskiqState:
        twin = type(self).__new__(type(self))
        twin.__dict__.update(self.__dict__)
        twin.__dict__.update(data=local, _pinned=set(self._pinned), _once=set(self._once))
        twin._new_guards()
        return twin

    def __copy__(self) -> TaskiqState:
        """Another handle on the same shared tier, with a copy of the local tier."""
        return self._twin(dict(self.data))

    def __deepcopy__(self, memo: dict[int, Any]) -> TaskiqState:
        """Another handle on the same shared tier (whose values are copies anyway), with a
        deep copy of the local tier."""
        return self._twin(_copy.deepcopy(self.data, memo))

    def copy(self) -> TaskiqState:
        return self.__copy__()

    def __getstate__(self) -> dict[str, Any]:
        """The local tier and the shared backend (which decides whether it can travel)."""
        return {k: v for k, v in self.__dict__.items() if k not in _NOT_COPIED}

    def __setstate__(self, fields: dict[str, Any]) -> None:
        self.__dict__.update(fields)
        self._new_guards()

    def __repr__(self) -> str:
        return repr(dict(self.items()))

    def __str__(self) -> str:
        return f"{type(self).__name__}({self!r})"
