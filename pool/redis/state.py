"""``RedisState``: a ``TaskiqState`` whose shared tier lives in Redis, for work across machines.

Layout under ``prefix`` (default ``pool:state``):

- ``<prefix>:v:<key>``: a value, as JSON text (numbers as plain JSON numbers, so ``INCRBY``
  works on them);
- ``<prefix>:u:<key>``: the update lock of a key while ``update()`` runs its function;
- ``<prefix>:l:<name>``: a lock taken with ``state.lock(name)``;
- ``<prefix>:o:<name>``: the record that ``state.init_once(name, fn)`` ran (``clear`` keeps it).

Values are JSON by default: a value JSON cannot carry exactly (a set, bytes, an object, a dict
with non-``str`` keys) stays in the local tier of the process that set it, as unpicklable
values do with the pool's state. Tuples are stored as JSON arrays and come back as lists.
``serializer="dill"`` is an explicit opt-in that stores other values pickled with dill: only
for a Redis that nobody untrusted can write to, since reading a pickle runs code. A JSON
state never unpickles: it refuses to read a pickled value.

Atomicity across machines: ``incr`` is ``INCRBY`` (or a float addition) in a script;
``setdefault`` is ``SET NX`` then ``GET``; ``update(key, fn)`` takes the key's update lock,
reads, runs ``fn`` once here, and writes only if it still holds the lock. While a client holds
a key's update lock, every other write of that key (set, delete, incr, setdefault, clear) is
refused by its script and retried with a short backoff, so no write is lost in between. Reads
never wait: they see the last value written.

Locks and update locks expire after ``lock_timeout`` seconds, so a crashed holder does not
block the others forever; a holder that keeps a lock longer loses it (``release`` logs a
warning) and an ``update`` whose function ran longer raises ``TimeoutError`` without writing.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import redis

from pool.redis.broker import client_kwargs, safe_url
from shared_state.state import TaskiqState

logger = logging.getLogger("pool.redis")

_MISSING: Any = object()
_SERIALIZERS = ("json", "dill")
_PICKLE_MARK = b"\x80"  # every pickle of protocol 2+ starts with this byte; JSON text never does
_SCAN_COUNT = 500
_BATCH = 200

# Refuse (return {0}) while another client holds the update lock of the key. KEYS[1] is the
# value, KEYS[2] its update lock; ARGV[1] is the caller's own update-lock token ('' if none),
# so a write made by ``fn`` inside the caller's own ``update`` goes through.
_GUARD = """
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return {0} end
"""

_SET = _GUARD + "redis.call('SET', KEYS[1], ARGV[2]) return {1}"

_DELETE = _GUARD + "redis.call('DEL', KEYS[1]) return {1}"

_SETDEFAULT = (
    _GUARD + "redis.call('SET', KEYS[1], ARGV[2], 'NX') return {1, redis.call('GET', KEYS[1])}"
)

# {1, new value as JSON} | {2} the value is not a number | {3, reason} out of range.
# Integers use INCRBY (exact 64-bit); anything involving a float is added as a double and
# written the way Python's json would read it back as a float.
_INCR = (
    _GUARD
    + """
local cur = redis.call('GET', KEYS[1])
if ARGV[3] == 'i' and (not cur or string.match(cur, '^%-?%d+$')) then
  local r = redis.pcall('INCRBY', KEYS[1], ARGV[2])
  if type(r) == 'table' and r.err then return {3, r.err} end
  return {1, tostring(r)}
end
local n = 0
if cur then
  if not string.match(cur, '^[%-%d]') and cur ~= 'Infinity' and cur ~= 'NaN' then
    return {2}
  end
  if cur == 'Infinity' then n = math.huge
  elseif cur == '-Infinity' then n = -math.huge
  elseif cur == 'NaN' then n = 0/0
  else n = tonumber(cur) end
  if n == nil then return {2} end
end
local r = n + tonumber(ARGV[2])
local s
if r ~= r then s = 'NaN'
elseif r == math.huge then s = 'Infinity'
elseif r == -math.huge then s = '-Infinity'
else
  s = string.format('%.17g', r)
  if not string.find(s, '[%.eE]') then s = s .. '.0' end
end
redis.call('SET', KEYS[1], s)
return {1, s}
"""
)

# The end of update(): write only if the caller still holds the update lock, then release it.
_UPDATE_WRITE = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2])
return 1
"""

# Compare-and-delete: release a lock only if the caller holds it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Delete many values (KEYS: value, lock, value, lock, ...); returns the values refused.
_DELETE_MANY = """
local refused = {}
for i = 1, #KEYS, 2 do
  local holder = redis.call('GET', KEYS[i + 1])
  if holder and holder ~= ARGV[1] then
    table.insert(refused, KEYS[i])
  else
    redis.call('DEL', KEYS[i])
  end
end
return refused
"""


def _json_exact(value: Any) -> bool:
    """True when JSON brings ``value`` back equal and of the same types (tuples as lists)."""
    kind = type(value)
    if value is None or kind in (str, int, float, bool):
        return True
    if kind in (list, tuple):
        return all(_json_exact(item) for item in value)
    if kind is dict:
        return all(type(k) is str and _json_exact(v) for k, v in value.items())
    return False


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def _rebuild(
    url: str, prefix: str, serializer: str, lock_timeout: float, kwargs: dict[str, Any]
) -> RedisStateBackend:
    return RedisStateBackend(url, prefix, serializer, lock_timeout, **kwargs)


class RedisStateBackend:
    """The shared tier of a :class:`RedisState` (the ``StateBackend`` protocol), over the
    synchronous redis-py client. Safe to use from threads and after ``fork``: redis-py's
    connection pool notices a new process and opens new connections there."""

    def __init__(
        self,
        url: str,
        prefix: str = "pool:state",
        serializer: str = "json",
        lock_timeout: float = 60.0,
        **connection_kwargs: Any,
    ) -> None:
        if serializer not in _SERIALIZERS:
            raise ValueError(f"serializer must be one of {_SERIALIZERS}, got {serializer!r}")
        if lock_timeout <= 0:
            raise ValueError("lock_timeout must be positive (seconds)")
        self.url = url
        self.prefix = prefix
        self.serializer = serializer
        self.lock_timeout = float(lock_timeout)
        self._connection_kwargs = dict(connection_kwargs)
        self._lock_ms = max(1, int(self.lock_timeout * 1000))
        self._client: redis.Redis = redis.Redis.from_url(url, **client_kwargs(connection_kwargs))
        # how long a write waits for another client's update of the same key
        self._write_patience = 2 * self.lock_timeout + 5.0
        self._held = threading.local()  # update-lock tokens held by this thread, per key
        scripts = {
            "set": _SET,
            "delete": _DELETE,
            "setdefault": _SETDEFAULT,
            "incr": _INCR,
            "update_write": _UPDATE_WRITE,
            "release": _RELEASE,
            "delete_many": _DELETE_MANY,
        }
        self._scripts = {name: self._client.register_script(src) for name, src in scripts.items()}

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild,
            (self.url, self.prefix, self.serializer, self.lock_timeout, self._connection_kwargs),
        )

    def close(self) -> None:
        """Close this process's connections (they reopen on the next use)."""
        self._client.close()

    # --- keys -------------------------------------------------------------------------
    def _vkey(self, key: str) -> str:
        return f"{self.prefix}:v:{key}"

    def _ukey(self, key: str) -> str:
        return f"{self.prefix}:u:{key}"

    def _lkey(self, name: str) -> str:
        return f"{self.prefix}:l:{name}"

    def _okey(self, name: str) -> str:
        return f"{self.prefix}:o:{name}"

    def _token_for(self, key: str) -> str:
        tokens: dict[str, str] | None = getattr(self._held, "tokens", None)
        return (tokens or {}).get(key, "")

    def _where(self) -> str:
        return f"Redis at {safe_url(self.url)}"

    # --- encoding ---------------------------------------------------------------------
    def encode(self, value: Any) -> bytes | None:
        """JSON text for a value JSON carries exactly; with ``serializer="dill"`` a pickle
        for other picklable values; ``None`` (stay local) otherwise."""
        if (
            type(value) in (int, float, bool, str)
            or value is None
            or (self.serializer == "json" and _json_exact(value))
        ):
            try:
                return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
            except (TypeError, ValueError, RecursionError):
                return None
        if self.serializer == "json":
            return None
        from shared_state import codec

        return codec.try_dumps(value)

    def decode(self, blob: bytes | str, key: str = "?") -> Any:
        if isinstance(blob, str):
            blob = blob.encode()
        if blob[:1] == _PICKLE_MARK:
            if self.serializer != "dill":
                raise ValueError(
                    f"state value {key!r} in {self._where()} was stored pickled (by a "
                    "serializer='dill' state); this state uses JSON and does not unpickle it"
                )
            from shared_state import codec

            return codec.loads(blob)
        return json.loads(blob)

    # --- retries ----------------------------------------------------------------------
    def _guarded(self, script: str, key: str, *args: Any) -> list[Any]:
        """Run a write script; while another client updates ``key``, retry with backoff."""
        deadline = time.monotonic() + self._write_patience
        delay = 0.0005
        while True:
            reply = self._run(
                script, [self._vkey(key), self._ukey(key)], [self._token_for(key), *args]
            )
            if int(reply[0]) != 0:
                return list(reply)
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"state key {key!r}: another client held its update lock for more than "
                    f"{self._write_patience:.0f} s"
                )
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 0.02)

    def _run(self, script: str, keys: list[str], args: list[Any]) -> Any:
        return self._scripts[script](keys=keys, args=args)

    # --- reads ------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        blob = self._client.get(self._vkey(key))
        if blob is None:
            return default
        return self.decode(blob, key)

    def contains(self, key: str) -> bool:
        return bool(self._client.exists(self._vkey(key)))

    def _scan(self) -> Iterator[str]:
        start = len(self.prefix) + 3  # "<prefix>:v:"
        pattern = _glob_escape(self.prefix) + ":v:*"
        for raw in self._client.scan_iter(match=pattern, count=_SCAN_COUNT):
            name = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
            yield name[start:]

    def keys(self) -> list[str]:
        return list(dict.fromkeys(self._scan()))  # SCAN may return a key twice

    def items(self) -> list[tuple[str, Any]]:
        keys = self.keys()
        out: list[tuple[str, Any]] = []
        for start in range(0, len(keys), _BATCH):
            chunk = keys[start : start + _BATCH]
            blobs = self._client.mget([self._vkey(k) for k in chunk])
            for key, blob in zip(chunk, blobs, strict=True):
                if blob is not None:  # deleted since the scan
                    out.append((key, self.decode(blob, key)))
        return out

    def length(self) -> int:
        return len(self.keys())

    # --- writes -----------------------------------------------------------------------
    def set(self, key: str, value: Any, blob: bytes) -> None:
        self._guarded("set", key, blob)

    def delete(self, key: str) -> None:
        self._guarded("delete", key)

    def clear(self) -> None:
        """Delete every value under this prefix (locks are kept); never ``FLUSHDB``."""
        pending = self.keys()
        deadline = time.monotonic() + self._write_patience
        delay = 0.0005
        while pending:
            refused: list[str] = []
            for start in range(0, len(pending), _BATCH):
                chunk = pending[start : start + _BATCH]
                keys = [k for key in chunk for k in (self._vkey(key), self._ukey(key))]
                offset = len(self.prefix) + 3
                for raw in self._run("delete_many", keys, [""]) or ():
                    name = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else raw
                    refused.append(name[offset:])
            pending = refused
            if pending:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"clear: state keys {pending[:5]!r} stayed locked")
                time.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, 0.02)

    def incr(self, key: str, amount: int | float) -> Any:
        if type(amount) not in (int, float):
            raise TypeError(
                f"incr of {key!r}: the amount must be an int or a float, got {amount!r}"
            )
        kind = "i" if type(amount) is int else "f"
        reply = self._guarded("incr", key, repr(amount) if kind == "f" else str(amount), kind)
        status = int(reply[0])
        if status == 2:
            raise TypeError(f"cannot incr {key!r}: it does not hold a number")
        if status == 3:
            reason = reply[1].decode() if isinstance(reply[1], bytes) else reply[1]
            raise OverflowError(f"cannot incr {key!r}: {reason}")
        return json.loads(reply[1])

    def setdefault(self, key: str, blob: bytes) -> Any:
        reply = self._guarded("setdefault", key, blob)
        return self.decode(reply[1], key)

    def update(self, key: str, fn: Callable[[Any], Any], default: Any) -> Any:
        """Store ``fn(old)`` atomically; ``fn`` runs exactly once, here, under the key's lock."""
        tokens: dict[str, str] | None = getattr(self._held, "tokens", None)
        if tokens is None:
            tokens = self._held.tokens = {}
        if key in tokens:
            raise RuntimeError(f"update of {key!r} called from inside an update of the same key")
        token = uuid.uuid4().hex
        ukey = self._ukey(key)
        self._take(ukey, token, key)
        tokens[key] = token
        written = False
        try:
            blob = self._client.get(self._vkey(key))
            old = default if blob is None else self.decode(blob, key)
            new = fn(old)
            new_blob = self.encode(new)
            if new_blob is None:
                raise TypeError(
                    f"update of {key!r}: {type(new).__name__} value cannot be stored in the "
                    f"shared state (serializer={self.serializer!r}); the value is unchanged"
                )
            written = bool(self._run("update_write", [self._vkey(key), ukey], [token, new_blob]))
            if not written:
                raise TimeoutError(
                    f"update of {key!r}: the function ran longer than lock_timeout "
                    f"({self.lock_timeout} s), its lock expired; the update was not applied"
                )
            return new
        finally:
            del tokens[key]
            if not written:
                try:
                    self._run("release", [ukey], [token])
                except Exception:
                    logger.warning("could not release the update lock of %r", key, exc_info=True)

    def _take(self, lock_key: str, token: str, key: str) -> None:
        deadline = time.monotonic() + self._write_patience
        delay = 0.0005
        while not self._client.set(lock_key, token, nx=True, px=self._lock_ms):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"update of {key!r}: its update lock stayed taken")
            time.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, 0.02)

    # --- locks ------------------------------------------------------------------------
    def acquire(self, name: str, token: str, pid: int, timeout: float) -> bool:
        """Take lock ``name`` for ``token``, trying for up to ``timeout`` seconds."""
        deadline = time.monotonic() + max(timeout, 0.0)
        delay = 0.001
        key = self._lkey(name)
        while True:
            if self._client.set(key, token, nx=True, px=self._lock_ms):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(remaining, delay * random.uniform(0.5, 1.5)))
            delay = min(delay * 2, 0.05)

    def release(self, name: str, token: str) -> bool:
        released = bool(self._run("release", [self._lkey(name)], [token]))
        if not released:
            logger.warning(
                "lock %r was no longer held when released: it was held longer than "
                "lock_timeout (%.1f s) and expired",
                name, self.lock_timeout,
            )  # fmt: skip
        return released

    # --- init_once records ------------------------------------------------------------
    def once_done(self, name: str) -> bool:
        return bool(self._client.exists(self._okey(name)))

    def mark_once(self, name: str) -> None:
        self._client.set(self._okey(name), b"1")

    def __repr__(self) -> str:
        return f"RedisStateBackend(url={safe_url(self.url)!r}, prefix={self.prefix!r})"


class RedisState(TaskiqState):
    """A ``TaskiqState`` shared through Redis by every process that opens it with the same
    ``url`` and ``prefix``, on any machine. Other keyword arguments go to
    ``redis.Redis.from_url``."""

    __slots__ = ()

    def __init__(
        self,
        url: str,
        prefix: str = "pool:state",
        serializer: str = "json",
        lock_timeout: float = 60.0,
        **connection_kwargs: Any,
    ) -> None:
        super().__init__(
            shared=RedisStateBackend(
                url,
                prefix=prefix,
                serializer=serializer,
                lock_timeout=lock_timeout,
                **connection_kwargs,
            )
        )
