"""How shared values cross processes: dill bytes, with immutable values cached as objects."""

from __future__ import annotations

import pickle
from typing import Any

# Values of these types cannot be changed in place, so a cached object can be handed out
# again without breaking the copy semantics of the shared state.
_PLAIN_SCALARS: tuple[type, ...] = (int, float, complex, str, bytes, bool, type(None))
IMMUTABLE_TYPES: tuple[type, ...] = (*_PLAIN_SCALARS, frozenset)

PICKLE_ERRORS: tuple[type[BaseException], ...] = (
    TypeError,
    AttributeError,
    ValueError,
    NotImplementedError,
    RecursionError,
    pickle.PicklingError,
)


def dumps(value: Any) -> bytes:
    """Serialise ``value`` with dill (lambdas and closures included)."""
    import dill

    return dill.dumps(value, protocol=5)


def loads(blob: bytes) -> Any:
    import dill

    return dill.loads(blob)


_value_pickler: Any = None


def _value_pickler_class() -> Any:
    """dill, minus its tricks for locks and open files.

    dill would "copy" a thread lock or a file by making a new one, which is never what a
    user storing a lock or a file in the shared state means: those stay in the local tier.
    """
    global _value_pickler
    if _value_pickler is None:
        import _pyio
        import io
        import threading

        import dill

        local_only = {type(threading.Lock()), type(threading.RLock())}
        for module in (io, _pyio):
            local_only.update(
                getattr(module, name)
                for name in (
                    "TextIOWrapper",
                    "BufferedWriter",
                    "BufferedReader",
                    "BufferedRandom",
                    "FileIO",
                )
                if hasattr(module, name)
            )

        class ValuePickler(dill.Pickler):
            dispatch = {k: v for k, v in dill.Pickler.dispatch.items() if k not in local_only}

        _value_pickler = ValuePickler
    return _value_pickler


_PLAIN_CONTAINERS = (list, tuple, dict, set, frozenset)


def _plain(value: Any, budget: list[int]) -> bool:
    """True for builtin data only (bounded walk): the C pickler is exact and much faster."""
    budget[0] -= 1
    if budget[0] < 0:
        return False
    kind = type(value)
    if kind in _PLAIN_SCALARS:
        return True
    if kind is dict:
        return all(_plain(k, budget) and _plain(v, budget) for k, v in value.items())
    if kind in _PLAIN_CONTAINERS:
        return all(_plain(item, budget) for item in value)
    return False


def try_dumps(value: Any) -> bytes | None:
    """Bytes for a value of the shared tier, or ``None`` when it must stay local."""
    import io

    if _plain(value, [256]):
        return pickle.dumps(value, protocol=5)
    buffer = io.BytesIO()
    try:
        _value_pickler_class()(buffer, protocol=5).dump(value)
    except PICKLE_ERRORS:
        return None
    return buffer.getvalue()


def is_immutable(value: Any) -> bool:
    if isinstance(value, tuple):
        return all(is_immutable(item) for item in value)
    return type(value) in IMMUTABLE_TYPES
