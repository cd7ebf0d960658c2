"""``RedisStreamBroker``: tasks in a Redis stream, read through a consumer group.

Delivery is at least once. A worker reads an entry with ``XREADGROUP``; the entry stays in the
group's pending list until the worker acknowledges it (``XACK`` then ``XDEL``), which the
receiver does only after the task's result is saved. An entry left pending longer than
``idle_timeout`` (its consumer died) is taken over by a live consumer with ``XAUTOCLAIM``.
While a consumer works on an entry it keeps the entry's idle time fresh, so a task that runs
longer than ``idle_timeout`` is not taken over by another consumer as long as its consumer lives.

A message with a ``delay`` label (seconds) waits in the sorted set ``<queue>:delayed`` (score:
the Redis server's clock at which it is due) and is moved into the stream by the listeners.

Limits:

- Redis 6.2 or newer (``XAUTOCLAIM``); a single Redis (not Redis Cluster).
- Entries pending in the group, and delayed messages, survive a Redis restart only if Redis
  persists its data (RDB or AOF). A restarted Redis without persistence starts empty: the
  listeners reconnect and recreate the consumer group, but messages that were queued or in
  flight at that moment are gone.
- A message that kills every consumer that takes it is delivered again after each
  ``idle_timeout``, without a limit.
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
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from pool.broker import AsyncBroker
from pool.exceptions import BrokerError, ListenError, SendTaskError, WorkerCrashedError
from pool.message import AckableMessage, BrokerMessage, RawMessage
from pool.result_backend import AsyncResultBackend

logger = logging.getLogger("pool.redis")

MIN_REDIS_VERSION = (6, 2)
# Server replies (error prefixes) that mean "try again later", as after a restart or failover.
_TRANSIENT_REPLIES = ("LOADING", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN", "READONLY", "BUSY ")


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


# Clients (and subscriptions) inherited from a parent process through fork. They are kept
# referenced and never touched: garbage-collecting them would close their transports, which
# unregisters the shared sockets from the parent's (shared, inherited) epoll instance.
_INHERITED: list[Any] = []


def keep_inherited(obj: Any) -> None:
    _INHERITED.append(obj)


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
        self._pid = os.getpid()
        self._clients: dict[asyncio.AbstractEventLoop, aioredis.Redis] = {}

    def _check_fork(self) -> None:
        if self._pid != os.getpid():
            if self._clients:
                keep_inherited(self._clients)
            self._clients = {}
            self._pid = os.getpid()

    def get(self) -> aioredis.Redis:
        loop = asyncio.get_running_loop()
        self._check_fork()
        client = self._clients.get(loop)
        if client is None:
            for stale in [other for other in self._clients if other.is_closed()]:
                del self._clients[stale]  # its loop is gone, and its sockets with it
            client = self._clients[loop] = aioredis.Redis.from_url(self.url, **self.kwargs)
            if self.on_create is not None:
                self.on_create(client)
        return client

    async def close(self) -> None:
        """Close the client of this process and event loop, if there is one."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._check_fork()
        client = self._clients.pop(loop, None)
        if client is not None:
            try:
                await client.aclose()
            except Exception:  # closing a broken connection may fail: it is gone anyway
                logger.debug("closing the redis client failed", exc_info=True)


# --------------------------------------------------------------------------- Lua scripts
# Move due delayed messages into the stream. Members are "<unique id>|<message bytes>".
_MOVE_DUE = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', t, 'LIMIT', 0, tonumber(ARGV[2]))
for _, member in ipairs(due) do
  local sep = string.find(member, '|', 1, true)
  if sep then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[1], '*', 'data', string.sub(member, sep + 1))
  end
  redis.call('ZREM', KEYS[1], member)
end
return #due
"""

# Schedule a delayed message by the Redis server's clock (no skew between machines).
_SCHEDULE = """
local now = redis.call('TIME')
local t = tonumber(now[1]) + tonumber(now[2]) / 1000000
redis.call('ZADD', KEYS[1], t + tonumber(ARGV[1]), ARGV[2])
return 1
"""

# Refresh the idle time of entries this consumer still owns; return those it lost.
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
_REQUEUE = """
local n = 0
for i = 2, #ARGV do
  local entry = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
  if #entry > 0 then
    redis.call('XADD', KEYS[1], '*', unpack(entry[1][2]))
    n = n + 1
  end
  redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
  redis.call('XDEL', KEYS[1], ARGV[i])
end
return n
"""

_DELAYED_BATCH = 100


def _default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def _delay_of(message: BrokerMessage) -> float:
    value = message.labels.get("delay")
    if value is None or value == "":
        return 0.0
    try:
        delay = float(value)
    except (TypeError, ValueError):
        raise SendTaskError(
            f"task {message.task_name!r}: the delay label must be a number of seconds, "
            f"got {value!r}"
        ) from None
    if delay != delay:  # NaN
        raise SendTaskError(f"task {message.task_name!r}: the delay label is NaN")
    return max(delay, 0.0)


class RedisStreamBroker(AsyncBroker):
    """Tasks in the Redis stream ``queue_name``, read by the consumer group ``consumer_group``.

    ``idle_timeout`` and ``xread_block`` are seconds. ``consumer_name`` must be unique per
    listening process (leave it ``None`` for forked workers): by default it is
    ``<host>-<pid>-<random>``, chosen when ``listen()`` starts. ``check_connection()`` PINGs
    Redis and checks its version, so a runner can fail fast before spawning workers. Other
    keyword arguments go to ``redis.asyncio.Redis.from_url``; connections are opened lazily,
    per process and event loop.
    """

    def __init__(
        self,
        url: str,
        queue_name: str = "pool",
        consumer_group: str = "pool",
        consumer_name: str | None = None,
        idle_timeout: float = 600.0,
        maxlen: int | None = 100_000,
        xread_block: float = 1.0,
        xread_count: int = 10,
        result_backend: AsyncResultBackend[Any] | None = None,
        task_id_generator: Callable[[], str] | None = None,
        max_connection_pool_size: int | None = None,
        max_deliveries: int = 3,
        **connection_kwargs: Any,
    ) -> None:
        super().__init__(result_backend=result_backend, task_id_generator=task_id_generator)
        if max_deliveries < 1:
            raise ValueError("max_deliveries must be at least 1")
        # A message taken over after this many deliveries that were never acknowledged (its
        # consumers died) gets an error result instead of another run: a poison message.
        self.max_deliveries = max_deliveries
        if idle_timeout <= 0:
            raise ValueError("idle_timeout must be positive (seconds)")
        if xread_block <= 0:
            raise ValueError("xread_block must be positive (seconds)")
        if xread_count < 1:
            raise ValueError("xread_count must be at least 1")
        if maxlen is not None and maxlen < 1:
            raise ValueError("maxlen must be at least 1 (or None for no cap)")
        self.url = url
        self.queue_name = queue_name
        self.consumer_group = consumer_group
        self.consumer_name = consumer_name
        self.idle_timeout = float(idle_timeout)
        self.maxlen = maxlen
        self.xread_block = float(xread_block)
        self.xread_count = int(xread_count)
        self.delayed_key = f"{queue_name}:delayed"
        # how often listen() takes over entries abandoned by dead consumers
        self.claim_interval = max(self.idle_timeout / 4, 0.5)
        # how often a listener refreshes the idle time of the entries it is running
        self.keepalive_interval = max(self.idle_timeout / 3, 0.05)
        self.delayed_interval = 0.5
        if max_connection_pool_size is not None:
            connection_kwargs.setdefault("max_connections", max_connection_pool_size)
        self._redis = LoopClient(
            url,
            client_kwargs(connection_kwargs, self.xread_block, retry=True),
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
        }

    def _client(self) -> aioredis.Redis:
        return self._redis.get()

    async def check_connection(self) -> None:
        """PING Redis and check its version; ``SendTaskError`` naming the URL when it fails."""
        where = safe_url(self.url)
        try:
            client = self._client()
            await client.ping()
            info = await client.info("server")
        except (RedisError, OSError) as exc:
            what = "is unreachable" if is_transient(exc) else "refused the connection check"
            raise SendTaskError(f"Redis at {where} {what}: {type(exc).__name__}: {exc}") from exc
        version = str(info.get("redis_version", "0"))
        parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
        if parts and parts < MIN_REDIS_VERSION:
            raise BrokerError(
                f"Redis at {where} is version {version}; RedisStreamBroker needs "
                f"{'.'.join(map(str, MIN_REDIS_VERSION))} or newer"
            )

    async def shutdown(self) -> None:
        try:
            await super().shutdown()
        finally:
            await self._redis.close()

    # ----------------------------------------------------------------- sending
    async def kick(self, message: BrokerMessage) -> None:
        """Add the message to the stream, or to the delayed set when it has a ``delay``."""
        delay = _delay_of(message)
        try:
            client = self._client()
            if delay > 0:
                member = uuid.uuid4().hex.encode() + b"|" + message.message
                await self._scripts["schedule"](
                    keys=[self.delayed_key], args=[repr(delay), member], client=client
                )
            else:
                await client.xadd(
                    self.queue_name,
                    {b"data": message.message},
                    maxlen=self.maxlen,
                    approximate=True,
                )
        except (RedisError, OSError) as exc:
            raise SendTaskError(
                f"cannot send task {message.task_name!r} to Redis at {safe_url(self.url)}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    # ----------------------------------------------------------------- receiving
    async def listen(self) -> AsyncGenerator[RawMessage, None]:
        """Yield messages for this consumer; reconnects (with backoff) when Redis goes away."""
        consumer = self.consumer_name or _default_consumer_name()
        inflight: set[bytes] = set()
        unyielded: deque[tuple[bytes, dict[bytes, bytes] | None]] = deque()
        keepalive = asyncio.create_task(self._keepalive(consumer, inflight))
        loop = asyncio.get_running_loop()
        group_ready = False
        next_claim = next_delayed = 0.0
        claim_cursor: bytes | str = "0-0"
        backoff = 0.1
        failing_since: float | None = None
        logger.info(
            "listening to Redis stream %r at %s as %s/%s",
            self.queue_name, safe_url(self.url), self.consumer_group, consumer,
        )  # fmt: skip
        try:
            while True:
                raise_if_cancelled()
                batch: list[tuple[bytes, dict[bytes, bytes] | None]] = []
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
                        claim_cursor, batch = await self._autoclaim(client, consumer, claim_cursor)
                        # more abandoned entries behind the cursor: come back at once
                        next_claim = (
                            now
                            if claim_cursor not in ("0-0", b"0-0")
                            else (now + self.claim_interval)
                        )
                        if batch:
                            logger.info(
                                "took over %d message(s) left pending longer than %.1f s",
                                len(batch), self.idle_timeout,
                            )  # fmt: skip
                    if not batch:
                        wait = min(self.xread_block, next_delayed - now, next_claim - now)
                        batch = await self._read(client, consumer, wait)
                    raise_if_cancelled()
                except asyncio.CancelledError:
                    raise
                except ResponseError as exc:
                    if str(exc).startswith("NOGROUP"):
                        # Redis lost the stream (restart without persistence, or deleted)
                        logger.warning(
                            "consumer group %r of stream %r is missing in Redis at %s; "
                            "creating it again",
                            self.consumer_group, self.queue_name, safe_url(self.url),
                        )  # fmt: skip
                        group_ready = False
                        await asyncio.sleep(0.01)
                        continue
                    if not is_transient(exc):
                        raise ListenError(
                            f"Redis at {safe_url(self.url)} refused to serve stream "
                            f"{self.queue_name!r}: {exc}"
                        ) from exc
                    failing_since, backoff = await self._pause(exc, failing_since, backoff)
                    continue
                except Exception as exc:
                    if not is_transient(exc):
                        raise ListenError(
                            f"listening to Redis at {safe_url(self.url)} failed: "
                            f"{type(exc).__name__}: {exc}"
                        ) from exc
                    group_ready = False  # a restarted Redis may have lost the group
                    failing_since, backoff = await self._pause(exc, failing_since, backoff)
                    continue
                if failing_since is not None:
                    logger.warning(
                        "connection to Redis at %s is back after %.1f s",
                        safe_url(self.url), loop.time() - failing_since,
                    )  # fmt: skip
                    failing_since, backoff = None, 0.1
                unyielded.extend(batch)
                while unyielded:
                    entry_id, fields = unyielded.popleft()
                    data = fields.get(b"data") if fields else None
                    if data is None:
                        logger.warning(
                            "dropping stream entry %s of %r: it has no 'data' field",
                            entry_id.decode(errors="replace"), self.queue_name,
                        )  # fmt: skip
                        await self._ack(entry_id)
                        continue
                    inflight.add(entry_id)
                    yield self._ackable(entry_id, data, inflight)
        finally:
            keepalive.cancel()
            try:
                await keepalive
            except BaseException:
                pass
            if unyielded:
                # read but never handed out: back into the stream for the other consumers
                await self._requeue([eid for eid, _ in unyielded])
            if not inflight:
                await self._forget_consumer(consumer)

    async def _pause(
        self, exc: BaseException, failing_since: float | None, backoff: float
    ) -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        if failing_since is None:
            failing_since = loop.time()
        logger.warning(
            "lost the connection to Redis at %s (%s: %s); retrying in %.1f s",
            safe_url(self.url), type(exc).__name__, exc, backoff,
        )  # fmt: skip
        await asyncio.sleep(backoff * random.uniform(0.8, 1.2))
        return failing_since, min(backoff * 2, 5.0)

    async def _ensure_group(self, client: aioredis.Redis) -> None:
        try:
            await client.xgroup_create(self.queue_name, self.consumer_group, id="0", mkstream=True)
        except ResponseError as exc:
            if not str(exc).startswith("BUSYGROUP"):
                raise

    async def _move_due(self, client: aioredis.Redis) -> None:
        maxlen = self.maxlen if self.maxlen is not None else 2**62
        while True:
            moved = await self._scripts["move_due"](
                keys=[self.delayed_key, self.queue_name],
                args=[maxlen, _DELAYED_BATCH],
                client=client,
            )
            if int(moved) < _DELAYED_BATCH:
                return

    async def _autoclaim(
        self, client: aioredis.Redis, consumer: str, cursor: bytes | str
    ) -> tuple[bytes | str, list[tuple[bytes, dict[bytes, bytes] | None]]]:
        reply = await client.xautoclaim(
            self.queue_name,
            self.consumer_group,
            consumer,
            min_idle_time=int(self.idle_timeout * 1000),
            start_id=cursor,
            count=self.xread_count,
        )
        next_cursor = reply[0]
        entries = [(_as_bytes(eid), fields) for eid, fields in reply[1]]
        deleted = reply[2] if len(reply) > 2 else []
        for eid in deleted:
            # deleted from the stream while pending: nothing to run, clear the pending entry
            await client.xack(self.queue_name, self.consumer_group, eid)
        kept = []
        for eid, fields in entries:
            if await self._deliveries(client, eid) > self.max_deliveries:
                await self._give_up(client, eid, fields)
            else:
                kept.append((eid, fields))
        return next_cursor, kept

    async def _deliveries(self, client: aioredis.Redis, entry_id: bytes) -> int:
        """How often the group delivered this entry (the claim that just happened included)."""
        pending = await client.xpending_range(
            self.queue_name, self.consumer_group, min=entry_id, max=entry_id, count=1
        )
        return int(pending[0]["times_delivered"]) if pending else 0

    async def _give_up(
        self, client: aioredis.Redis, entry_id: bytes, fields: dict[bytes, bytes] | None
    ) -> None:
        """Answer a poison message with an error result, then drop it."""
        data = (fields or {}).get(b"data", b"")
        try:
            message = self.formatter.loads(data)
        except Exception:
            message = None
        name = message.task_name if message is not None else "?"
        logger.error(
            "message %s (task %s) was delivered %d times and each consumer died before "
            "acknowledging it; giving up with an error result",
            entry_id.decode(), name, self.max_deliveries,
        )  # fmt: skip
        if message is not None:
            from pool.result import TaskiqResult

            error = WorkerCrashedError(
                f"task {name!r} ({message.task_id}) was delivered {self.max_deliveries} times "
                "and each time its worker died before it finished"
            )
            result: TaskiqResult[Any] = TaskiqResult(
                is_err=True, labels=message.labels, error=error
            )
            try:
                await self.result_backend.set_result(message.task_id, result)
            except Exception:
                logger.exception("cannot save the error result of task %s", message.task_id)
                return  # stays pending: tried again at the next claim
        await self._ack(entry_id)

    async def _read(
        self, client: aioredis.Redis, consumer: str, wait: float
    ) -> list[tuple[bytes, dict[bytes, bytes] | None]]:
        block_ms = max(1, int(wait * 1000))  # BLOCK 0 would wait forever
        reply = await client.xreadgroup(
            self.consumer_group,
            consumer,
            {self.queue_name: ">"},
            count=self.xread_count,
            block=block_ms,
        )
        if not reply:
            return []
        raw: Any = reply
        streams = raw.items() if isinstance(raw, dict) else raw
        entries: list[tuple[bytes, dict[bytes, bytes] | None]] = []
        for _stream, stream_entries in streams:
            for item in stream_entries or ():
                entries.append((_as_bytes(item[0]), item[1]))
        return entries

    def _ackable(self, entry_id: bytes, data: bytes, inflight: set[bytes]) -> AckableMessage:
        async def ack() -> None:
            try:
                await self._ack(entry_id)
            finally:
                inflight.discard(entry_id)

        # rejecting drops the message, as acknowledging does
        return AckableMessage(data=data, ack=ack, reject=ack)

    async def _ack(self, entry_id: bytes) -> None:
        """``XACK`` then ``XDEL``, retried briefly; if it still fails the entry stays pending
        and is delivered again after ``idle_timeout`` (at least once)."""
        delay = 0.05
        last: BaseException | None = None
        for _ in range(5):
            try:
                client = self._client()
                async with client.pipeline(transaction=True) as pipe:
                    pipe.xack(self.queue_name, self.consumer_group, entry_id)
                    pipe.xdel(self.queue_name, entry_id)
                    await pipe.execute()
                return
            except ResponseError as exc:
                if str(exc).startswith("NOGROUP"):
                    return  # Redis lost the stream: nothing left to acknowledge
                if not is_transient(exc):
                    last = exc
                    break
                last = exc
            except (RedisError, OSError) as exc:
                last = exc
            await asyncio.sleep(delay)
            delay *= 2
        logger.error(
            "could not acknowledge stream entry %s at %s (%s); it will be delivered again "
            "after the idle timeout",
            entry_id.decode(errors="replace"), safe_url(self.url), last,
        )  # fmt: skip

    async def _keepalive(self, consumer: str, inflight: set[bytes]) -> None:
        """Keep the entries this consumer runs from looking abandoned."""
        while True:
            await asyncio.sleep(self.keepalive_interval)
            if not inflight:
                continue
            ids = list(inflight)
            try:
                client = self._client()
                for start in range(0, len(ids), 100):
                    chunk = ids[start : start + 100]
                    lost = await self._scripts["keepalive"](
                        keys=[self.queue_name],
                        args=[self.consumer_group, consumer, *chunk],
                        client=client,
                    )
                    for eid in lost or ():
                        eid = _as_bytes(eid)
                        if eid in inflight:
                            logger.warning(
                                "stream entry %s is no longer pending for %s (taken over by "
                                "another consumer, or Redis lost it)",
                                eid.decode(errors="replace"), consumer,
                            )  # fmt: skip
                            inflight.discard(eid)
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
                    keys=[self.queue_name], args=[self.consumer_group, *entry_ids], client=client
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
                    keys=[self.queue_name], args=[self.consumer_group, consumer], client=client
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
            f"consumer_group={self.consumer_group!r})"
        )


def _as_bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()
