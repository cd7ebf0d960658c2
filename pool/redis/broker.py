"""``RedisStreamBroker``: a ``taskiq.AsyncBroker`` whose tasks live in a Redis stream.

taskiq's contract: ``kick(BrokerMessage)`` sends, ``listen()`` yields
``taskiq.AckableMessage`` objects, and taskiq's receiver calls ``ack`` when its ``--ack-type``
says (by default once the result is saved). Parameter names and units follow taskiq-redis's
``RedisStreamBroker`` where the two overlap (``consumer_group_name``, ``xread_block`` and
``idle_timeout`` in milliseconds, ``maxlen``, ``approximate``, ``xread_count``,
``unacknowledged_batch_size``, ``consumer_id``, ``mkstream``, ``max_connection_pool_size``).

Delivery is at least once. A worker reads an entry with ``XREADGROUP``; the entry stays in the
group's pending list until it is acknowledged (``XACK`` then ``XDEL``). An entry left pending
longer than ``idle_timeout`` (its consumer died) is taken over by a live consumer
(``XPENDING`` then ``XCLAIM``, in one script). While a consumer holds an entry (running it, or
read and not yet handed to the receiver) it keeps the entry's idle time fresh, so a task that
runs longer than ``idle_timeout`` is not taken over as long as its consumer lives.

Where pool goes beyond taskiq-redis:

- a message with taskiq's ``delay`` label (seconds, as ``SmartRetryMiddleware`` sets it) waits
  in the sorted set ``<queue>:delayed`` (score: the Redis server's clock at which it is due)
  and is moved into the stream by the listeners;
- the listeners reconnect, with backoff, after Redis went away, and recreate the consumer group
  when a restarted Redis lost it;
- only the culprit is blamed for a dead consumer: the entries taken over from it are
  suspects, claimed one at a time, each run alone by an idle consumer that takes nothing else
  until the suspect is done (a busy consumer stops reading to become idle, for at most
  ``suspect_wait`` seconds). A death counts against a message only when the message was the
  one entry its consumer held (counted per entry in the hash ``<queue>:blame``), so the
  messages that merely ran beside a poison one are never blamed. A message that killed
  ``max_deliveries`` consumers that way is a poison message:
  it gets a :class:`~pool.extensions.errors.WorkerCrashedError` result through the result
  backend and is dropped, instead of killing workers forever;
- nothing is ever trimmed from the stream (taskiq-redis: ``XADD MAXLEN ~``, which drops tasks
  that never ran): ``maxlen`` caps the tasks of a queue not yet acknowledged (waiting, running
  or delayed), and at the cap ``kick`` raises :class:`RedisQueueFullError`; ``approximate`` is
  accepted and ignored;
- a message whose result the result backend could not save (pool's
  :class:`~pool.redis.RedisResultBackend` marks it) is given back to the stream instead of
  acknowledged, and is no longer kept alive, so the task runs again;
- ``consumer_id`` defaults to ``"0"`` (taskiq-redis: ``"$"``), so tasks sent before the first
  worker created the group are not skipped;
- ``kiq`` returns a handle whose ``wait_result`` is woken by the result backend's push
  (:class:`~pool.extensions.handles.PoolTask`) when the backend offers one.

Limits: Redis 6.2 or newer (``XAUTOCLAIM``), a single Redis (not Redis Cluster). Entries
pending in the group, and delayed messages, survive a Redis restart only if Redis persists its
data (RDB or AOF): a restarted Redis without persistence starts empty.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import secrets
import socket
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Callable
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, NoScriptError, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError
from taskiq import AckableMessage, AsyncBroker, BrokerMessage, TaskiqResult
from taskiq.exceptions import BrokerError, ListenError, SendTaskError, TaskiqError
from taskiq.formatters.proxy_formatter import ProxyFormatter

from pool.extensions.errors import WorkerCrashedError
from pool.extensions.handles import PoolDecoratedTask
from pool.redis.batching import Batcher, Script, command

if TYPE_CHECKING:
    from pool.redis.result_backend import RedisResultBackend, Rider

logger = logging.getLogger("pool.redis")

MIN_REDIS_VERSION = (6, 2)
# Server replies (error prefixes) that mean "try again later", as after a restart or failover.
_TRANSIENT_REPLIES = ("LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "READONLY", "BUSY ")

_Entry = tuple[bytes, dict[bytes, bytes] | None]
_T = TypeVar("_T")


# --------------------------------------------------------------------------- errors
class PoolRedisError(TaskiqError):
    """Base of pool.redis's errors; each also subclasses the matching taskiq error.

    The message is the ``reason``, given positionally or by keyword (taskiq rebuilds a
    serialized exception by calling its class with the exception's args).
    """

    __template__ = "{reason}"
    reason: str = "Redis failed"

    def __init__(self, reason: str | None = None, **kwargs: Any) -> None:
        if reason is not None:
            kwargs["reason"] = reason
        super().__init__(**kwargs)


class RedisSendTaskError(PoolRedisError, SendTaskError):
    """A task could not be sent: Redis is unreachable or refused it, or a label is invalid."""


class RedisQueueFullError(RedisSendTaskError):
    """The queue holds ``maxlen`` tasks not yet acknowledged: the task was not sent."""


class RedisListenError(PoolRedisError, ListenError):
    """Redis refused to serve the stream for a reason waiting will not fix."""


class RedisVersionError(PoolRedisError, BrokerError):
    """The Redis server is older than the broker needs."""


# --------------------------------------------------------------------------- shared helpers
def safe_url(url: str) -> str:
    """``url`` with its password masked, for error messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if parts.port is not None:
            host = f"{host}:{parts.port}"
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return "<invalid redis url>"


def is_transient(exc: BaseException) -> bool:
    """True for errors a later attempt may not see: lost connections, timeouts, a loading
    or read-only server."""
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError, OSError)):
        return True
    return isinstance(exc, ResponseError) and str(exc).startswith(_TRANSIENT_REPLIES)


def client_kwargs(
    connection_kwargs: dict[str, Any], read_block: float = 0.0, retry: bool = False
) -> dict[str, Any]:
    """Connection settings with defaults that do not depend on the redis-py version.

    Every command gets a socket timeout longer than the longest blocking read we issue, so a
    silently dead connection is noticed instead of blocking forever. With ``retry`` (for an
    asyncio client whose commands may safely run twice), a command that fails on a lost
    connection, such as a pooled connection to a Redis that restarted, is tried twice more
    on a new connection, unless the caller passed its own ``retry``.
    """
    kwargs = dict(connection_kwargs)
    if retry and "retry" not in kwargs:
        from redis.asyncio.retry import Retry
        from redis.backoff import EqualJitterBackoff

        kwargs["retry"] = Retry(EqualJitterBackoff(cap=0.5, base=0.05), 2)
    kwargs.setdefault("socket_connect_timeout", 5.0)
    kwargs.setdefault("socket_keepalive", True)
    floor = read_block + 5.0
    timeout = kwargs.get("socket_timeout")
    if "socket_timeout" not in kwargs:
        kwargs["socket_timeout"] = max(5.0, floor)
    elif timeout is not None and timeout <= read_block:
        raise ValueError(
            f"socket_timeout ({timeout} s) must be longer than the blocking read ({read_block} s)"
        )
    return kwargs


def raise_if_cancelled() -> None:
    """Raise ``CancelledError`` if the current task was asked to stop.

    On Python < 3.12, redis-py's ``asyncio.wait_for`` around socket writes can swallow a
    cancellation that lands while a command completes (CPython bpo-42130), so loops that call
    Redis check after each call; otherwise a cancelled listener could run on forever.
    """
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    if cancelling is not None and cancelling():
        raise asyncio.CancelledError


_pid = [os.getpid()]  # os.getpid() is a system call, and the hot paths ask at every command
os.register_at_fork(after_in_child=lambda: _pid.__setitem__(0, os.getpid()))


def current_pid() -> int:
    """This process's id, kept up to date across forks."""
    return _pid[0]


# Clients (and subscriptions) inherited from a parent process through fork. They are kept
# referenced and never touched: garbage-collecting them would close their transports, which
# unregisters the shared sockets from the parent's (shared, inherited) epoll instance.
_INHERITED: list[Any] = []


def keep_inherited(obj: Any) -> None:
    _INHERITED.append(obj)


class _WaitingPool(aioredis.ConnectionPool):
    """redis-py's connection pool, except that a command that finds all ``max_connections``
    busy waits for one to be released, instead of failing with "Too many connections"
    (thousands of producers waiting at once must not fail). redis-py's
    ``BlockingConnectionPool`` does that too, but costs every command a lock and a timeout."""

    # how long a command waits for a free connection (seconds)
    wait_timeout = 20.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._queue: deque[asyncio.Future[None]] = deque()

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_timeout
        while True:
            try:
                return await super().get_connection(*args, **kwargs)
            except MaxConnectionsError:
                left = deadline - loop.time()
                if left <= 0:
                    raise
            freed: asyncio.Future[None] = loop.create_future()
            self._queue.append(freed)
            try:
                await asyncio.wait_for(freed, left)
            except asyncio.TimeoutError:
                pass
            finally:
                if not freed.done():
                    freed.cancel()

    async def release(self, connection: Any) -> None:
        await super().release(connection)
        while self._queue:
            freed = self._queue.popleft()
            if not freed.done():
                freed.set_result(None)
                break


class LoopClient:
    """One ``redis.asyncio`` client per process and event loop, created on first use.

    A forked worker never touches its parent's connections, and a client is never used from
    an event loop other than the one its connections were opened on.
    """

    def __init__(
        self,
        url: str,
        kwargs: dict[str, Any],
        on_create: Callable[[aioredis.Redis], None] | None = None,
    ) -> None:
        self.url = url
        self.kwargs = kwargs
        self.on_create = on_create
        self._pid = current_pid()
        self._clients: dict[asyncio.AbstractEventLoop, aioredis.Redis] = {}
        # what else belongs to one event loop (the batchers of its writes), by name
        self._locals: dict[asyncio.AbstractEventLoop, dict[str, Any]] = {}

    def _check_fork(self) -> None:
        if self._pid != current_pid():
            if self._clients:
                keep_inherited(self._clients)
            self._clients = {}
            self._locals = {}
            self._pid = current_pid()

    def local(self, name: str, make: Callable[..., _T], *args: Any) -> _T:
        """The object ``name`` of this process and event loop, made by ``make(*args)`` on
        first use."""
        loop = asyncio.get_running_loop()
        self._check_fork()
        values = self._locals.get(loop)
        if values is None:
            values = self._locals[loop] = {}
        value = values.get(name)
        if value is None:
            value = values[name] = make(*args)
        return value

    def get(self) -> aioredis.Redis:
        loop = asyncio.get_running_loop()
        self._check_fork()
        client = self._clients.get(loop)
        if client is None:
            for stale in [other for other in self._clients if other.is_closed()]:
                del self._clients[stale]  # its loop is gone, and its sockets with it
                self._locals.pop(stale, None)
            client = self._clients[loop] = aioredis.Redis.from_pool(self._pool())
            if self.on_create is not None:
                self.on_create(client)
        return client

    def _pool(self) -> aioredis.ConnectionPool:
        kwargs = dict(self.kwargs)
        kwargs.setdefault("max_connections", 100)  # redis-py's default
        return _WaitingPool.from_url(self.url, **kwargs)

    async def close(self) -> None:
        """Close the client of this process and event loop, if there is one."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._check_fork()
        self._locals.pop(loop, None)
        client = self._clients.pop(loop, None)
        if client is not None:
            try:
                await client.aclose()
            except Exception:  # closing a broken connection may fail: it is gone anyway
                logger.debug("closing the redis client failed", exc_info=True)


# --------------------------------------------------------------------------- Lua scripts
# Nothing is ever trimmed from the stream: an entry leaves it when it is acknowledged (XACK +
# XDEL). The cap (ARGV[1], 0: none) counts the tasks of a queue not yet acknowledged: the
# stream's entries (waiting or running) plus its delayed messages (KEYS[2]). At the cap, entries
# every consumer group acknowledged but did not delete (consumers that XACK without XDEL, as
# taskiq-redis's do) are trimmed first; a send that still finds the queue full is refused.
_CAP = """
local function size()
  return redis.call('XLEN', KEYS[1]) + redis.call('ZCARD', KEYS[2])
end

local function parse(id)
  local sep = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, sep - 1)), tonumber(string.sub(id, sep + 1))
end

local function lower(a, b)
  local ams, aseq = parse(a)
  local bms, bseq = parse(b)
  return ams < bms or (ams == bms and aseq < bseq)
end

-- the lowest id some group has not acknowledged yet: every entry below it is acknowledged
local function acknowledged_below()
  local floor = nil
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    local name, last
    for i = 1, #group, 2 do
      if group[i] == 'name' then name = group[i + 1] end
      if group[i] == 'last-delivered-id' then last = group[i + 1] end
    end
    local first = redis.call('XPENDING', KEYS[1], name)[2]
    if not first then
      local sep = string.find(last, '-', 1, true)
      first = string.sub(last, 1, sep - 1) .. '-' .. (tonumber(string.sub(last, sep + 1)) + 1)
    end
    if floor == nil or lower(first, floor) then floor = first end
  end
  return floor
end

local function full(cap)
  if cap <= 0 or size() < cap then return false end
  if redis.call('EXISTS', KEYS[1]) == 1 then
    local floor = acknowledged_below()
    if floor then redis.call('XTRIM', KEYS[1], 'MINID', floor) end
  end
  return size() >= cap
end
"""

# Add messages to the stream, in their order, each unless its queue is full when its turn
# comes: an array of 1 (added) or 0 (refused). ARGV: cap, the messages' bytes.
_ADD_MANY_SCRIPT = Script(
    _CAP
    + """
local cap = tonumber(ARGV[1])
local added = {}
for i = 2, #ARGV do
  if full(cap) then
    added[i - 1] = 0
  else
    redis.call('XADD', KEYS[1], '*', 'data', ARGV[i])
    added[i - 1] = 1
  end
end
return added
"""
)

# Schedule a delayed message by the Redis server's clock (no skew between machines), unless
# its queue is full. KEYS: stream, delayed set. ARGV: cap, delay (seconds), member.
_SCHEDULE = (
    _CAP
    + """
if full(tonumber(ARGV[1])) then return 0 end
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
redis.call('ZADD', KEYS[2], t + tonumber(ARGV[2]), ARGV[3])
return 1
"""
)

# Move due delayed messages into the stream. Members are "<unique id>|<message bytes>". They
# were accepted when they were scheduled: they are moved even when the stream is at its cap
# (the count of the queue's tasks does not change).
# ARGV: batch size.
_MOVE_DUE = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', t, 'LIMIT', 0, tonumber(ARGV[1]))
for _, member in ipairs(due) do
  local sep = string.find(member, '|', 1, true)
  if sep then
    redis.call('XADD', KEYS[2], '*', 'data', string.sub(member, sep + 1))
  end
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""

# Refresh the idle time of entries this consumer still owns; return those it lost.
# XCLAIM ... JUSTID does not count as a delivery.
_KEEPALIVE = """
local lost = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #p > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    table.insert(lost, ARGV[i])
  end
end
return lost
"""

# Forget a consumer that owns no pending entry (DELCONSUMER would drop its pending entries).
_FORGET_CONSUMER = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #p == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
  return 1
end
return 0
"""

# Give entries back: add a copy at the end of the stream, then acknowledge and delete them.
# KEYS: stream, blame hash. ARGV: group, "keep" (the copy keeps the entry's blame: it never
# ran here) or "clear" (it ran to its end), entry ids.
_REQUEUE = """
local n = 0
for i = 3, #ARGV do
  local entry = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
  local blame = redis.call('HGET', KEYS[2], ARGV[i])
  if #entry > 0 then
    local copy = redis.call('XADD', KEYS[1], '*', unpack(entry[1][2]))
    if blame and ARGV[2] == 'keep' then redis.call('HSET', KEYS[2], copy, blame) end
    n = n + 1
  end
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  redis.call('XDEL', KEYS[1], ARGV[i])
  redis.call('HDEL', KEYS[2], ARGV[i])
end
return n
"""

# Take over one entry left pending longer than the idle timeout by a consumer that died (or
# peek whether there is one), and decide who is to blame for that death.
#
# The blame hash (KEYS[2]) holds, for each entry taken over from a dead consumer (a
# suspect), how many times it started running *alone* on a consumer and never finished.
# Only such runs count: a consumer that died running several entries says nothing about
# which of them killed it. The consumer taking a suspect over runs it alone (it is idle, and
# takes nothing else until the suspect is done): its blame goes up by one now, and its
# acknowledgement deletes it. The first take-over from a dead consumer also counts that
# death against the entry if it was the only one the consumer held, and otherwise notes
# "dead:<consumer>", so that the consumer's last entry left is not taken for its only one;
# the take-over of its last entry forgets the consumer (the group's and this note). An entry
# whose blame reached the limit is claimed but not run: the caller answers it with an error.
#
# KEYS: stream, blame hash. ARGV: group, consumer, min idle (ms), start of the scan ("-" or
# "(<id>", exclusive), scan window, limit (max_deliveries), "claim" or "peek".
# Reply: {next start} when nothing is idle in the window; with "peek", {start, id}; with
# "claim", {next start, id, fields, deaths, "run" | "poison"}, or {next start} when the
# entry had been deleted from the stream (its pending entry is cleared).
_TAKE_OVER = """
local group, me = ARGV[1], ARGV[2]
local min_idle, window, limit = tonumber(ARGV[3]), tonumber(ARGV[5]), tonumber(ARGV[6])
local rows = redis.call('XPENDING', KEYS[1], group, ARGV[4], '+', window)
local found = nil
for _, row in ipairs(rows) do
  if tonumber(row[3]) >= min_idle then
    found = row
    break
  end
end
local next_start = '-'
if found then
  next_start = '(' .. found[1]
elseif #rows == window then
  next_start = '(' .. rows[#rows][1]
end
if not found then return {next_start} end
if ARGV[7] == 'peek' then return {ARGV[4], found[1]} end

local id, owner = found[1], found[2]
local note = 'dead:' .. owner
local deaths = redis.call('HGET', KEYS[2], id)
if deaths then
  deaths = tonumber(deaths)
elseif owner == me or redis.call('HEXISTS', KEYS[2], note) == 1 then
  deaths = 0
elseif #redis.call('XPENDING', KEYS[1], group, '-', '+', 2, owner) == 1 then
  deaths = 1
else
  deaths = 0
  redis.call('HSET', KEYS[2], note, 1)
end
local claimed = redis.call('XCLAIM', KEYS[1], group, me, min_idle, id)
if #redis.call('XPENDING', KEYS[1], group, '-', '+', 1, owner) == 0 then
  redis.call('HDEL', KEYS[2], note)
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], group, owner)
end
if type(claimed[1]) ~= 'table' then
  redis.call('XACK', KEYS[1], group, id)
  redis.call('HDEL', KEYS[2], id)
  return {next_start}
end
if deaths >= limit then
  redis.call('HSET', KEYS[2], id, deaths)
  return {next_start, id, claimed[1][2], deaths, 'poison'}
end
redis.call('HSET', KEYS[2], id, deaths + 1)
return {next_start, id, claimed[1][2], deaths, 'run'}
"""

# Acknowledge and delete entries; forget the blame of those that had one.
# KEYS: stream, blame hash. ARGV: group, number of entries, entry ids, then the blamed ones.
_ACK = Script("""
local n = tonumber(ARGV[2])
redis.call('XACK', KEYS[1], ARGV[1], unpack(ARGV, 3, n + 2))
redis.call('XDEL', KEYS[1], unpack(ARGV, 3, n + 2))
if #ARGV > n + 2 then redis.call('HDEL', KEYS[2], unpack(ARGV, n + 3)) end
return n
""")

_DELAYED_BATCH = 100


def _default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def _delay_of(message: BrokerMessage) -> float:
    """taskiq's ``delay`` label, in seconds (labels travel as text)."""
    value = message.labels.get("delay")
    if value is None or value == "":
        return 0.0
    try:
        delay = float(value)
    except (TypeError, ValueError):
        raise RedisSendTaskError(
            reason=f"task {message.task_name!r}: the delay label must be a number of seconds, "
            f"got {value!r}"
        ) from None
    if delay != delay:  # NaN
        raise RedisSendTaskError(reason=f"task {message.task_name!r}: the delay label is NaN")
    return max(delay, 0.0)


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def _as_text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


_TASK_ID_FIRST = b'{"task_id": "'


def _leading_task_id(data: bytes) -> str | None:
    """The task id of a message that starts with it, as taskiq's JSON serializer writes
    every ``TaskiqMessage`` (``task_id`` is its first field), without parsing the rest; None
    for any other message, and for an id with an escape in it (the caller parses those)."""
    if not data.startswith(_TASK_ID_FIRST):
        return None
    end = data.find(b'"', len(_TASK_ID_FIRST))
    raw = data[len(_TASK_ID_FIRST) : end]
    if end < 0 or b"\\" in raw:
        return None
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return None


def _fields(flat: list[Any]) -> dict[bytes, bytes]:
    """A stream entry's fields from a script's reply (a flat list: name, value, ...)."""
    return {_as_bytes(flat[i]): _as_bytes(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


class _Held:
    """The entries one listener owns in the group: read or claimed, not yet acknowledged.

    ``waiting`` are those not yet handed to the receiver, ``handed`` (their data) those
    handed out. The keep-alive refreshes all of them; an entry lost to another consumer (or to
    a restarted Redis) is forgotten here and, if it was still waiting, never handed out.
    ``released`` are handed-out entries whose result could not be saved: no longer kept alive,
    and given back instead of acknowledged if the receiver still acknowledges them.
    The listener is *idle* when it holds nothing handed out (``wait_idle``). ``suspects`` are
    the entries it took over from dead consumers (each has an entry in the blame hash).
    """

    def __init__(self) -> None:
        self.ids: set[bytes] = set()
        self.waiting: deque[_Entry] = deque()
        self.handed: dict[bytes, bytes] = {}
        self.released: set[bytes] = set()
        self.suspects: set[bytes] = set()
        self._emptied = asyncio.Event()

    def forget(self, entry_id: bytes) -> None:
        self.ids.discard(entry_id)
        self.handed.pop(entry_id, None)
        self.suspects.discard(entry_id)
        if not self.handed:
            self._emptied.set()

    async def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until every entry handed out is acknowledged (or lost); False if ``timeout``
        seconds passed first."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self.handed:
            self._emptied.clear()
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= 0:
                return False
            try:
                await asyncio.wait_for(self._emptied.wait(), left)
            except asyncio.TimeoutError:
                return not self.handed
        return True

    def add(self, batch: list[_Entry]) -> None:
        self.ids.update(eid for eid, _ in batch)
        self.waiting.extend(batch)

    def next_waiting(self) -> _Entry | None:
        while self.waiting:
            entry = self.waiting.popleft()
            if entry[0] in self.ids:
                return entry
        return None

    def unhanded(self) -> list[bytes]:
        """Waiting entries still ours, removed from the held set."""
        ids = [eid for eid, _ in self.waiting if eid in self.ids]
        self.waiting.clear()
        self.ids.difference_update(ids)
        return ids


class RedisStreamBroker(AsyncBroker):
    """Tasks in the Redis stream ``queue_name``, read by the group ``consumer_group_name``.

    ``xread_block`` and ``idle_timeout`` are milliseconds, as in taskiq-redis.
    ``consumer_name`` must be unique per listening process (leave it ``None`` for forked
    workers: it is then ``<host>-<pid>-<random>``, chosen when ``listen()`` starts).
    ``max_deliveries`` is pool's poison rule, ``maxlen`` (``None``: no cap) the most tasks
    a queue holds before ``kiq`` is refused (see the module docstring). A ``queue_name``
    label sends that task to another stream, as taskiq-redis does. Other keyword arguments go
    to ``redis.asyncio.Redis.from_url``; connections are opened lazily, one client per process
    and event loop, so a forked worker never uses its parent's sockets.

    ``check_connection()`` PINGs Redis and checks its version, so a runner can fail fast
    before spawning workers. The result backend is set as with any taskiq broker:
    ``broker.with_result_backend(RedisResultBackend(url))``.
    """

    def __init__(
        self,
        url: str,
        queue_name: str = "pool",
        max_connection_pool_size: int | None = None,
        consumer_group_name: str = "pool",
        consumer_name: str | None = None,
        consumer_id: str = "0",
        mkstream: bool = True,
        xread_block: int = 1000,
        maxlen: int | None = 100_000,
        approximate: bool = True,
        idle_timeout: int = 600_000,
        unacknowledged_batch_size: int = 100,
        xread_count: int | None = 10,
        max_deliveries: int = 3,
        **connection_kwargs: Any,
    ) -> None:
        super().__init__()
        _check_positive(
            idle_timeout=idle_timeout,
            xread_block=xread_block,
            unacknowledged_batch_size=unacknowledged_batch_size,
            max_deliveries=max_deliveries,
            maxlen=maxlen,
            xread_count=xread_count,
        )
        self.decorator_class = PoolDecoratedTask
        self.url = url
        self.queue_name = queue_name
        self.consumer_group_name = consumer_group_name
        self.consumer_name = consumer_name
        self.consumer_id = consumer_id
        self.mkstream = mkstream
        self.xread_block = xread_block
        self.maxlen = maxlen
        self.approximate = approximate
        self.idle_timeout = idle_timeout
        self.unacknowledged_batch_size = unacknowledged_batch_size
        self.xread_count = xread_count
        self.max_deliveries = max_deliveries
        idle = idle_timeout / 1000
        # how often listen() takes over entries abandoned by dead consumers
        self.claim_interval = max(idle / 4, 0.5)
        # how long a listener with tasks running waits to be idle, to run a suspect alone,
        # before it reads new tasks again (and tries again after claim_interval)
        self.suspect_wait = max(idle, 10.0)
        # how often a listener refreshes the idle time of the entries it holds
        self.keepalive_interval = max(idle / 3, 0.05)
        # no take-over this soon after Redis was unreachable: every entry looks abandoned
        # then, until the live consumers refresh theirs
        self.claim_grace = 2 * self.keepalive_interval
        self.delayed_interval = 0.5
        # how long a message whose result could not be saved is offered back to the stream
        self.give_back_timeout = 30.0
        if max_connection_pool_size is not None:
            connection_kwargs.setdefault("max_connections", max_connection_pool_size)
        self._redis = LoopClient(
            url,
            client_kwargs(connection_kwargs, xread_block / 1000, retry=True),
            self._register_scripts,
        )
        self._scripts: dict[str, Any] = {}

    # ----------------------------------------------------------------- connection
    def _register_scripts(self, client: aioredis.Redis) -> None:
        self._scripts = {
            "move_due": client.register_script(_MOVE_DUE),
            "schedule": client.register_script(_SCHEDULE),
            "keepalive": client.register_script(_KEEPALIVE),
            "forget": client.register_script(_FORGET_CONSUMER),
            "requeue": client.register_script(_REQUEUE),
            "take_over": client.register_script(_TAKE_OVER),
        }

    def _client(self) -> aioredis.Redis:
        return self._redis.get()

    async def _run(self, client: aioredis.Redis, name: str, keys: list[str], *args: Any) -> Any:
        """Run a script by its hash (redis-py's ``Script`` call costs more than the command
        itself); a Redis that lost its script cache (restarted) is given the script again."""
        script = self._scripts[name]
        try:
            return await client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await script(keys=keys, args=list(args), client=client)

    async def check_connection(self) -> None:
        """PING Redis and check its version; an error naming the URL when either fails."""
        where = safe_url(self.url)
        try:
            client = self._client()
            await client.ping()
            info = await client.info("server")
        except (RedisError, OSError) as exc:
            what = "is unreachable" if is_transient(exc) else "refused the connection check"
            raise RedisSendTaskError(
                reason=f"Redis at {where} {what}: {type(exc).__name__}: {exc}"
            ) from exc
        version = str(info.get("redis_version", "0"))
        parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        if parts and parts < MIN_REDIS_VERSION:
            raise RedisVersionError(
                reason=f"Redis at {where} is version {version}; RedisStreamBroker needs "
                f"{'.'.join(map(str, MIN_REDIS_VERSION))} or newer"
            )

    async def shutdown(self) -> None:
        """taskiq's shutdown (events, middlewares, result backend), then this loop's client."""
        try:
            await super().shutdown()
        finally:
            await self._redis.close()

    # ----------------------------------------------------------------- sending
    async def kick(self, message: BrokerMessage) -> None:
        """Add the message to the stream, or to the delayed set when it has a ``delay``;
        :class:`RedisQueueFullError` when the queue holds ``maxlen`` tasks already."""
        delay = _delay_of(message)
        queue = message.labels.get("queue_name") or self.queue_name
        cap = self.maxlen or 0
        expect = getattr(self.result_backend, "expect", None)
        if expect is not None:
            expect(message.task_id)  # before it can finish: its notification is not missed
        try:
            client = self._client()
            if delay > 0:
                member = uuid.uuid4().hex.encode() + b"|" + message.message
                keys = [queue, f"{queue}:delayed"]
                added = await self._run(client, "schedule", keys, cap, repr(delay), member)
            elif cap:
                op = [message.message, False]  # [data, added]: told by its batch
                await self._redis.local(f"adds:{queue}:{cap}", self._adds, queue, cap).add(op)
                added = op[1]
            else:
                added = await command(client, "XADD", queue, "*", "data", message.message)
        except (RedisError, OSError) as exc:
            raise RedisSendTaskError(
                reason=f"cannot send task {message.task_name!r} to Redis at "
                f"{safe_url(self.url)}: {type(exc).__name__}: {exc}"
            ) from exc
        if not added:
            raise RedisQueueFullError(
                reason=f"cannot send task {message.task_name!r}: queue {queue!r} is full, "
                f"{cap} tasks are waiting, running or delayed (RedisStreamBroker "
                f"maxlen={cap}); nothing was sent. Retry later, add workers, or raise the cap "
                f"with RedisStreamBroker(..., maxlen=N) (maxlen=None: no cap)"
            )

    def _adds(self, queue: str, cap: int) -> Batcher[list[Any]]:
        """The batcher of the adds to ``queue`` under ``cap``: the kicks of one loop turn (a
        ``gather`` of ``kiq``) share one script call, each told whether it was added. A kick
        waits on its batch's future alone (no coroutine, closure or list of its own: a burst
        of 1,000 kicks holds a third fewer objects for the garbage collector to walk)."""
        keys = [queue, f"{queue}:delayed"]

        async def send(adds: list[list[Any]]) -> None:
            added = await _ADD_MANY_SCRIPT(self._client(), keys, [cap, *(op[0] for op in adds)])
            for op, one in zip(adds, added, strict=True):
                op[1] = bool(one)

        return Batcher(send)

    # ----------------------------------------------------------------- receiving
    async def listen(self) -> AsyncGenerator[AckableMessage, None]:
        """Yield messages for this consumer; reconnects (with backoff) when Redis goes away."""
        consumer = self.consumer_name or _default_consumer_name()
        held = _Held()
        keepalive = asyncio.create_task(self._keepalive(consumer, held))
        logger.info(
            "listening to Redis stream %r at %s as %s/%s",
            self.queue_name, safe_url(self.url), self.consumer_group_name, consumer,
        )  # fmt: skip
        try:
            async for batch, suspect in self._batches(consumer, held):
                held.add(batch)
                if suspect:
                    held.suspects.update(eid for eid, _ in batch)
                while (entry := held.next_waiting()) is not None:
                    message = await self._ackable(entry, held)
                    if message is not None:
                        yield message
                        if suspect:
                            # it runs alone: nothing else is taken until it is done
                            await held.wait_idle()
        finally:
            keepalive.cancel()
            try:
                await keepalive
            except BaseException:
                pass
            unhanded = held.unhanded()
            if unhanded:
                # read but never handed out: back into the stream for the other consumers
                await self._requeue(unhanded)
            if not held.ids:
                await self._forget_consumer(consumer)

    async def _batches(
        self, consumer: str, held: _Held
    ) -> AsyncGenerator[tuple[list[_Entry], bool], None]:
        """Batches of entries for this consumer, each with True for a suspect (one entry
        taken over from a dead consumer, to run alone): due delayed messages moved first,
        entries abandoned by dead consumers taken over, then new ones; Redis outages waited
        out."""
        loop = asyncio.get_running_loop()
        group_ready = False
        next_claim = next_delayed = 0.0
        cursor = "-"
        outage = _Outage(self.url)
        while True:
            raise_if_cancelled()
            batch: list[_Entry] = []
            try:
                client = self._client()
                if not group_ready:
                    await self._ensure_group(client)
                    group_ready = True
                now = loop.time()
                if now >= next_delayed:
                    await self._move_due(client)
                    next_delayed = now + self.delayed_interval
                if now >= next_claim:
                    cursor, batch = await self._take_over(client, consumer, cursor, held)
                    # more abandoned entries behind the cursor: come back at once
                    next_claim = now + self.claim_interval if cursor == "-" else now
                suspect = bool(batch)
                if not batch:
                    wait = min(self.xread_block / 1000, next_delayed - now, next_claim - now)
                    batch = await self._read(client, consumer, wait)
                raise_if_cancelled()
            except asyncio.CancelledError:
                raise
            except ResponseError as exc:
                if "NOGROUP" in str(exc):  # Redis 6 reports it inside a script error
                    # Redis lost the stream (restart without persistence, or deleted)
                    logger.warning(
                        "consumer group %r of stream %r is missing in Redis at %s; "
                        "creating it again",
                        self.consumer_group_name, self.queue_name, safe_url(self.url),
                    )  # fmt: skip
                    group_ready = False
                    await asyncio.sleep(0.01)
                    continue
                if not is_transient(exc):
                    raise RedisListenError(
                        reason=f"Redis at {safe_url(self.url)} refused to serve stream "
                        f"{self.queue_name!r}: {exc}"
                    ) from exc
                await outage.pause(exc)
                next_claim = loop.time() + self.claim_grace
                continue
            except Exception as exc:
                if not is_transient(exc):
                    raise RedisListenError(
                        reason=f"listening to Redis at {safe_url(self.url)} failed: "
                        f"{type(exc).__name__}: {exc}"
                    ) from exc
                group_ready = False  # a restarted Redis may have lost the group
                await outage.pause(exc)
                next_claim = loop.time() + self.claim_grace
                continue
            outage.over()
            if batch:
                yield batch, suspect

    async def _ensure_group(self, client: aioredis.Redis) -> None:
        try:
            await client.xgroup_create(
                self.queue_name,
                self.consumer_group_name,
                id=self.consumer_id,
                mkstream=self.mkstream,
            )
        except ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise

    async def _move_due(self, client: aioredis.Redis) -> None:
        while True:
            moved = await self._scripts["move_due"](
                keys=[f"{self.queue_name}:delayed", self.queue_name],
                args=[_DELAYED_BATCH],
                client=client,
            )
            if int(moved) < _DELAYED_BATCH:
                return

    async def _take_over(
        self, client: aioredis.Redis, consumer: str, start: str, held: _Held
    ) -> tuple[str, list[_Entry]]:
        """At most one entry abandoned by a dead consumer, claimed to run alone here (see
        ``_TAKE_OVER``), and where the scan goes on ("-": it went round). A listener with
        tasks running first looks whether there is one, then waits to be idle. A poison
        entry is answered and dropped instead."""
        if held.handed:
            peek = await self._take_over_script(client, consumer, start, "peek")
            if len(peek) < 2:
                return _as_text(peek[0]), []
            logger.debug(
                "message %s was abandoned by a dead consumer; taking nothing new until the "
                "%d task(s) running here finish, to run it alone",
                _as_text(peek[1]), len(held.handed),
            )  # fmt: skip
            if not await held.wait_idle(self.suspect_wait):
                return "-", []  # still busy: read new tasks, try again later
        reply = await self._take_over_script(client, consumer, start, "claim")
        start = _as_text(reply[0])
        if len(reply) < 5:
            return start, []
        entry_id, fields = _as_bytes(reply[1]), _fields(reply[2])
        deaths = int(reply[3])
        if _as_text(reply[4]) == "poison":
            await self._give_up(entry_id, fields, deaths)
            return start, []
        logger.info(
            "took over message %s, left pending longer than %d ms by a consumer that died; "
            "running it alone (it ran alone %d time(s) before, each time its worker died)",
            entry_id.decode(errors="replace"), self.idle_timeout, deaths,
        )  # fmt: skip
        return start, [(entry_id, fields)]

    async def _take_over_script(
        self, client: aioredis.Redis, consumer: str, start: str, mode: str
    ) -> list[Any]:
        keys = [self.queue_name, f"{self.queue_name}:blame"]
        args = (self.consumer_group_name, consumer, self.idle_timeout, start,
                self.unacknowledged_batch_size, self.max_deliveries, mode)  # fmt: skip
        return list(await self._run(client, "take_over", keys, *args))

    async def _give_up(
        self, entry_id: bytes, fields: dict[bytes, bytes] | None, deaths: int
    ) -> None:
        """Answer a poison message with a ``WorkerCrashedError`` result, then drop it."""
        data = (fields or {}).get(b"data", b"")
        try:
            message = self.formatter.loads(data)
            message.parse_labels()
        except Exception:
            message = None
        name = message.task_name if message is not None else "?"
        logger.error(
            "message %s (task %s) ran alone %d times and each time its consumer died before "
            "acknowledging it; giving up with an error result",
            entry_id.decode(), name, deaths,
        )  # fmt: skip
        if message is not None:
            error = WorkerCrashedError(
                reason=f"task {name!r} ({message.task_id}) ran alone on a worker {deaths} "
                "times and each time the worker died before it finished"
            )
            result: TaskiqResult[Any] = TaskiqResult(
                is_err=True,
                return_value=None,
                execution_time=0.0,
                labels=message.labels,
                error=error,
            )
            try:
                await self.result_backend.set_result(message.task_id, result)
            except Exception:
                logger.exception("cannot save the error result of task %s", message.task_id)
                take_unsaved = getattr(self.result_backend, "take_unsaved", None)
                if take_unsaved is not None:
                    take_unsaved(message.task_id)
                return  # stays pending: tried again at the next claim
        await self._ack(entry_id, blamed=True)

    async def _read(self, client: aioredis.Redis, consumer: str, wait: float) -> list[_Entry]:
        block_ms = max(1, int(wait * 1000))  # BLOCK 0 would wait forever
        count = ("COUNT", self.xread_count) if self.xread_count else ()
        group = ("GROUP", self.consumer_group_name, consumer)
        streams_arg = ("STREAMS", self.queue_name, ">")
        reply = await command(client, "XREADGROUP", *group, *count, "BLOCK", block_ms, *streams_arg)
        if not reply:
            return []
        entries: list[_Entry] = []
        for _stream, stream_entries in reply.items() if isinstance(reply, dict) else reply:
            for entry_id, flat in stream_entries or ():
                entries.append((_as_bytes(entry_id), _fields(flat) if flat else None))
        return entries

    async def _ackable(self, entry: _Entry, held: _Held) -> AckableMessage | None:
        """taskiq's ackable message for an entry; an entry with no data is dropped."""
        entry_id, fields = entry
        data = fields.get(b"data") if fields else None
        if data is None:
            logger.warning(
                "dropping stream entry %s of %r: it has no 'data' field",
                entry_id.decode(errors="replace"), self.queue_name,
            )  # fmt: skip
            blamed = entry_id in held.suspects
            held.forget(entry_id)
            await self._ack(entry_id, blamed)
            return None

        held.handed[entry_id] = data
        ride = self._ride(entry_id, data, held)

        async def ack() -> None:
            try:
                if ride is not None:
                    ride[0].unride(ride[1], ride[2])
                    if ride[2].acked:
                        return  # acknowledged with its result
                if entry_id in held.released or self._result_unsaved(data):
                    await self._give_back(entry_id)
                else:
                    await self._ack(entry_id, entry_id in held.suspects)
            finally:
                held.forget(entry_id)
                held.released.discard(entry_id)

        return AckableMessage(data=data, ack=ack)

    def _ride(
        self, entry_id: bytes, data: bytes, held: _Held
    ) -> tuple[RedisResultBackend[Any], str, Rider] | None:
        """Have pool's result backend acknowledge this entry with its task's result, when it
        saves results in the same Redis (same URL): one call instead of two."""
        from pool.redis.result_backend import RedisResultBackend, Rider  # it imports this module

        backend = self.result_backend
        if not isinstance(backend, RedisResultBackend) or backend.redis_url != self.url:
            return None
        task_id = _leading_task_id(data)
        if task_id is None:
            try:
                if type(self.formatter) is ProxyFormatter:  # no model: only the id is needed
                    task_id = self.formatter.broker.serializer.loadb(data)["task_id"]
                else:
                    task_id = self.formatter.loads(data).task_id
            except Exception:
                return None  # taskiq's receiver reports it; acknowledged the usual way
        if not isinstance(task_id, str):
            return None
        rider = Rider(self.queue_name, self.consumer_group_name, entry_id,
                      entry_id in held.suspects, held.ids.discard)  # fmt: skip
        backend.ride(task_id, rider)
        return backend, task_id, rider

    def _result_unsaved(self, data: bytes) -> bool:
        """True if the result backend could not save the result of this message's task (with
        ``--ack-type when_saved``, taskiq's receiver acknowledges it all the same)."""
        backend = self.result_backend
        has_unsaved = getattr(backend, "has_unsaved", None)
        if has_unsaved is None or not has_unsaved():
            return False
        try:
            task_id = self.formatter.loads(data).task_id
        except Exception:
            return False
        return bool(backend.take_unsaved(task_id))  # type: ignore[attr-defined]

    def _release_unsaved(self, held: _Held) -> None:
        """Stop keeping alive the handed-out entries whose result could not be saved, so they
        are delivered again even if the receiver never acknowledges them (taskiq's receiver
        with ``raise_err=True``)."""
        for entry_id, data in list(held.handed.items()):
            if self._result_unsaved(data):
                logger.warning(
                    "the result of stream entry %s could not be saved; it is no longer kept "
                    "alive and is delivered again after the idle timeout",
                    entry_id.decode(errors="replace"),
                )  # fmt: skip
                held.forget(entry_id)
                held.released.add(entry_id)

    async def _give_back(self, entry_id: bytes) -> None:
        """The result of this entry could not be saved: put a copy at the end of the stream
        (and drop this one) so that the task runs again; retried with backoff for
        ``give_back_timeout`` seconds, then left pending, to be taken over after
        ``idle_timeout`` (it is no longer kept alive)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.give_back_timeout
        backoff = 0.05
        while True:
            try:
                await self._scripts["requeue"](
                    keys=[self.queue_name, f"{self.queue_name}:blame"],
                    args=[self.consumer_group_name, "clear", entry_id],
                    client=self._client(),
                )
                logger.warning(
                    "the result of stream entry %s could not be saved: the message is "
                    "delivered again",
                    entry_id.decode(errors="replace"),
                )  # fmt: skip
                return
            except (RedisError, OSError) as exc:
                if loop.time() + backoff > deadline:
                    logger.error(
                        "the result of stream entry %s could not be saved, nor the message "
                        "given back (%s); it is delivered again after the idle timeout",
                        entry_id.decode(errors="replace"), exc,
                    )  # fmt: skip
                    return
            await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
            backoff = min(backoff * 2, 2.0)

    async def _ack(self, entry_id: bytes, blamed: bool = False) -> None:
        """``XACK`` then ``XDEL`` (and, for an entry taken over from a dead consumer, its
        blame), with the other acknowledgements of this moment in one call (see
        :mod:`pool.redis.batching`), retried briefly; if it still fails the entry stays
        pending and is delivered again after ``idle_timeout`` (at least once)."""
        delay = 0.05
        last: BaseException | None = None
        for _ in range(5):
            try:
                await self._redis.local("acks", self._acks).submit((entry_id, blamed))
                return
            except ResponseError as exc:
                last = exc
                if not is_transient(exc):
                    break
            except (RedisError, OSError) as exc:
                last = exc
            await asyncio.sleep(delay)
            delay *= 2
        logger.error(
            "could not acknowledge stream entry %s at %s (%s); it will be delivered again "
            "after the idle timeout",
            entry_id.decode(errors="replace"), safe_url(self.url), last,
        )  # fmt: skip

    def _acks(self) -> Batcher[tuple[bytes, bool]]:
        return Batcher(self._ack_batch)

    async def _ack_batch(self, acks: list[tuple[bytes, bool]]) -> None:
        """Acknowledge and delete (entry id, blamed) pairs, in one call."""
        args: list[Any] = [self.consumer_group_name, len(acks)]
        args += [entry_id for entry_id, _ in acks]
        args += [entry_id for entry_id, blamed in acks if blamed]
        await _ACK(self._client(), [self.queue_name, f"{self.queue_name}:blame"], args)

    async def _keepalive(self, consumer: str, held: _Held) -> None:
        """Keep the entries this consumer holds from looking abandoned, except those whose
        result could not be saved."""
        while True:
            await asyncio.sleep(self.keepalive_interval)
            self._release_unsaved(held)
            if not held.ids:
                continue
            ids = list(held.ids)
            try:
                client = self._client()
                for start in range(0, len(ids), 100):
                    lost = await self._scripts["keepalive"](
                        keys=[self.queue_name],
                        args=[self.consumer_group_name, consumer, *ids[start : start + 100]],
                        client=client,
                    )
                    for eid in map(_as_bytes, lost or ()):
                        if eid in held.ids:
                            logger.warning(
                                "stream entry %s is no longer pending for %s (taken over by "
                                "another consumer, or Redis lost it)",
                                eid.decode(errors="replace"), consumer,
                            )  # fmt: skip
                            held.forget(eid)
                raise_if_cancelled()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.debug("keepalive of pending entries failed: %s", exc)

    async def _requeue(self, entry_ids: list[bytes]) -> None:
        """Put entries this consumer read but did not hand out back at the end of the stream,
        so another consumer takes them now instead of after the idle timeout (best effort)."""
        try:
            client = self._client()
            await asyncio.wait_for(
                self._scripts["requeue"](
                    keys=[self.queue_name, f"{self.queue_name}:blame"],
                    args=[self.consumer_group_name, "keep", *entry_ids],
                    client=client,
                ),
                timeout=5.0,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning(
                "could not give back %d unread message(s) (%s); they will be delivered again "
                "after the idle timeout",
                len(entry_ids), exc,
            )  # fmt: skip

    async def _forget_consumer(self, consumer: str) -> None:
        """Remove this consumer from the group if it owns no pending entry (best effort)."""
        try:
            client = self._client()
            await asyncio.wait_for(
                self._scripts["forget"](
                    keys=[self.queue_name], args=[self.consumer_group_name, consumer], client=client
                ),
                timeout=2.0,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.debug("could not remove consumer %s from the group: %s", consumer, exc)

    def __repr__(self) -> str:
        return (
            f"RedisStreamBroker(url={safe_url(self.url)!r}, queue_name={self.queue_name!r}, "
            f"consumer_group_name={self.consumer_group_name!r})"
        )


class _Outage:
    """Backoff while Redis is unreachable, and one log line when it is back."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.since: float | None = None
        self.backoff = 0.1

    async def pause(self, exc: BaseException) -> None:
        loop = asyncio.get_running_loop()
        if self.since is None:
            self.since = loop.time()
        logger.warning(
            "lost the connection to Redis at %s (%s: %s); retrying in %.1f s",
            safe_url(self.url), type(exc).__name__, exc, self.backoff,
        )  # fmt: skip
        await asyncio.sleep(self.backoff * random.uniform(0.8, 1.2))
        self.backoff = min(self.backoff * 2, 5.0)

    def over(self) -> None:
        if self.since is not None:
            logger.warning(
                "connection to Redis at %s is back after %.1f s",
                safe_url(self.url), asyncio.get_running_loop().time() - self.since,
            )  # fmt: skip
            self.since, self.backoff = None, 0.1


def _check_positive(**values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value!r}")
