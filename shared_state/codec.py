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


# --- records of the shared-memory store -------------------------------------------------
# A record is one flag byte and the pickle: ``p`` for the C pickler's bytes, ``d`` for dill's
# (so a plain value is loaded by the C unpickler, ten times faster than dill). Upper case
# (``P``/``D``) adds the key, 2-byte length first, for keys too long to be LMDB keys.
PLAIN = 0x70  # b"p"
DILL = 0x64  # b"d"
_WITH_KEY = 0x20  # lower case minus this: upper case


def try_record(value: Any) -> bytes | None:
    """The record of a value of the shared tier, or ``None`` when it must stay local."""
    import io

    if _plain(value, [256]):
        return b"p" + pickle.dumps(value, protocol=5)
    buffer = io.BytesIO()
    buffer.write(b"d")
    try:
        _value_pickler_class()(buffer, protocol=5).dump(value)
    except PICKLE_ERRORS:
        return None
    return buffer.getvalue()


def record(value: Any) -> bytes:
    """``try_record`` for a value that must be stored (the result of ``update``)."""
    rec = try_record(value)
    if rec is None:
        rec = b"d" + dumps(value)  # raises the pickling error itself
    return rec


def with_key(rec: bytes, key: bytes) -> bytes:
    return bytes((rec[0] - _WITH_KEY,)) + len(key).to_bytes(2, "little") + key + rec[1:]


def record_key(rec: bytes) -> str:
    """The key stored in a record ``with_key`` made."""
    size = int.from_bytes(rec[1:3], "little")
    return rec[3 : 3 + size].decode("utf-8", "surrogatepass")


def load_record(rec: bytes) -> Any:
    flag = rec[0]
    if flag == PLAIN:
        return pickle.loads(rec[1:])
    if flag == DILL:
        return loads(rec[1:])
    payload = rec[3 + int.from_bytes(rec[1:3], "little") :]
    return pickle.loads(payload) if flag + _WITH_KEY == PLAIN else loads(payload)
