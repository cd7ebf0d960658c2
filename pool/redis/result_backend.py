"""``RedisResultBackend``: a ``taskiq.AsyncResultBackend`` in Redis whose waiters are pushed to.

taskiq's contract: ``set_result`` / ``get_result`` / ``is_result_ready`` carry
``taskiq.TaskiqResult`` objects, ``set_progress`` / ``get_progress`` carry
``taskiq.depends.progress_tracker.TaskProgress`` objects. They are stored the way taskiq-redis
stores them (``serializer.dumpb(result.model_dump(mode="json"))``, read back with
``TaskiqResult.model_validate``; with the default JSON serializer, pydantic's JSON, which
reads back alike: ``pool.extensions.model_json``), under the same keys
(``<prefix_str>:<task id>``, the progress under that key plus ``__progress``), so a pydantic
model comes back as the task's declared return type and an exception as the ``error``
field, exactly as with taskiq-redis. The parameters are taskiq-redis's (``redis_url``,
``keep_results``, ``result_ex_time`` in seconds, ``result_px_time`` in milliseconds,
``max_connection_pool_size``, ``serializer``, ``prefix_str``).

Where pool differs:

- the default serializer is taskiq's JSON serializer (taskiq-redis: pickle): nothing read from
  Redis is unpickled unless you pass a pickling serializer;
- ``set_result`` also publishes the task id on the channel ``<prefix_str>:done`` (a result up to
  ``INLINE_LIMIT`` bytes travels inside the notification), and :meth:`wait_ready` waits for
  that notification instead of polling: this is the ``PushedResults`` protocol of
  :mod:`pool.extensions.handles`, used by the handles that pool's brokers return from ``kiq``.
  Each backend (per process and event loop) keeps one subscription, started by the first
  wait; every waiting process receives every notification, fine for many thousands of
  results a second. A handle of taskiq's own (``AsyncKicker(...).kiq()``) polls
  ``is_result_ready``; between notifications that is answered from memory, not from Redis;
- the results saved at the same time in one process (one event-loop turn, or while the
  previous save is in flight) are saved by one script call, which publishes one notification
  for all of them (``\x01`` then, per result, the task id and the inline result or none, each
  after its length as 4 bytes, big-endian; -1 for none); a notification of an older pool
  (``<task id>`` or ``<task id>\x00<result>``) is understood too;
- a task sent by pool's stream broker from a process that already waits for results is
  known not to be finished until its notification comes: waiting for it, and reading its
  result when the notification carried it, cost no command at all;
- the awaited keys are looked up in Redis in pipelined batches, when a wait starts, after each
  (re)subscription and every ``recheck_interval`` seconds (a missed notification);
- ``set_result`` retries a failing Redis for ``save_timeout`` seconds, then marks the task
  unsaved so that pool's stream broker delivers its message again instead of acknowledging it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import struct
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from taskiq import AsyncResultBackend, TaskiqResult, TaskiqResultTimeoutError
from taskiq.abc.serializer import TaskiqSerializer
from taskiq.depends.progress_tracker import TaskProgress
from taskiq.exceptions import ResultGetError, ResultIsReadyError, ResultSetError
from taskiq.serializers import JSONSerializer

from pool.extensions import model_json
from pool.redis.batching import Batcher, Script
from pool.redis.broker import (
    LoopClient,
    PoolRedisError,
    client_kwargs,
    current_pid,
    is_transient,
    keep_inherited,
    raise_if_cancelled,
    safe_url,
)

logger = logging.getLogger("pool.redis")

_ReturnType = TypeVar("_ReturnType")

# Results up to this size travel inside the notification, so a waiting producer needs no GET.
INLINE_LIMIT = 4096
PROGRESS_KEY_SUFFIX = "__progress"  # taskiq-redis's
_SEP = b"\x00"  # an older pool's notification: <task id>[\x00<result>]
_BATCH = b"\x01"  # a notification for many results (see the module docstring)
_LENGTH = struct.Struct(">i")
_EXPECTED_KEPT = 100_000
# what set_result hands to the batch: key, result, notification part, rider
_Save = tuple[str, bytes, bytes, "Rider | None"]
_INLINE_KEPT = 10_000
_MISSING_KEPT = 100_000
_UNSAVED_KEPT = 10_000
_CHECK_BATCH = 1000


class RedisResultSetError(PoolRedisError, ResultSetError):
    """A result or a progress could not be saved (Redis failed, or the value cannot be
    serialized)."""


class RedisResultGetError(PoolRedisError, ResultGetError):
    """No result is stored for the task, or it cannot be read or decoded."""


class RedisResultIsReadyError(PoolRedisError, ResultIsReadyError):
    """Redis failed while checking whether a result is ready."""


# Save many results, announce them in one notification, then acknowledge the stream entries
# of their tasks (see ``Rider``). KEYS: the n result keys, then stream and blame hash when
# acknowledging. ARGV: channel, expiry option ('', 'EX' or 'PX'), expiry, the notification, n,
# the n results, then group, the number of entries, their ids, the blamed ones among them.
_SAVE = Script("""
local n = tonumber(ARGV[5])
for i = 1, n do
  if ARGV[2] == '' then
    redis.call('SET', KEYS[i], ARGV[i + 5])
  else
    redis.call('SET', KEYS[i], ARGV[i + 5], ARGV[2], ARGV[3])
  end
end
redis.call('PUBLISH', ARGV[1], ARGV[4])
if #KEYS > n then
  local stream, group, m = KEYS[n + 1], ARGV[n + 6], tonumber(ARGV[n + 7])
  redis.call('XACK', stream, group, unpack(ARGV, n + 8, n + 7 + m))
  redis.call('XDEL', stream, unpack(ARGV, n + 8, n + 7 + m))
  if #ARGV > n + 7 + m then redis.call('HDEL', KEYS[n + 2], unpack(ARGV, n + 8 + m)) end
end
return n
""")


class Rider:
    """The stream entry of a task whose result is being computed here: pool's stream broker
    hands it to a backend on the same Redis (:meth:`RedisResultBackend.ride`), and the script
    that saves the result acknowledges the entry too, in the same call, after the result
    (``--ack-type when_saved`` acknowledges right after the save anyway; with the other ack
    types the broker acknowledges first and takes its rider back). ``acked`` is then True and
    ``on_acked`` is called."""

    __slots__ = ("acked", "blamed", "entry_id", "group", "on_acked", "stream")

    def __init__(
        self,
        stream: str,
        group: str,
        entry_id: bytes,
        blamed: bool,
        on_acked: Callable[[bytes], None],
    ) -> None:
        self.stream, self.group, self.entry_id, self.blamed = stream, group, entry_id, blamed
        self.acked = False
        self.on_acked = on_acked


def _note(task_id: str, blob: bytes | None) -> bytes:
    """One result's part of a notification."""
    raw = task_id.encode()
    if blob is None:
        return _LENGTH.pack(len(raw)) + raw + _LENGTH.pack(-1)
    return _LENGTH.pack(len(raw)) + raw + _LENGTH.pack(len(blob)) + blob


def _notes(data: bytes) -> list[tuple[str, bytes | None]]:
    """The (task id, inline result or None) pairs of one notification, either format."""
    if not data.startswith(_BATCH):
        raw_id, sep, blob = data.partition(_SEP)
        return [(raw_id.decode(), blob if sep else None)]
    notes: list[tuple[str, bytes | None]] = []
    at, end, unpack = 1, len(data), _LENGTH.unpack_from
    while at + 8 <= end:
        (size,) = unpack(data, at)
        task_id = data[at + 4 : at + 4 + size].decode()
        at += 4 + size
        (size,) = unpack(data, at)
        at += 4
        if size < 0:
            notes.append((task_id, None))
        else:
            notes.append((task_id, data[at : at + size]))
            at += size
    return notes


class _Notifier:
    """The subscription of one backend in one process and event loop, its waiters, and the
    batched existence checks that stand in for notifications missed or never sent."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.pid = current_pid()
        self.waiters: dict[str, set[asyncio.Future[None]]] = {}
        # Results that came inside notifications, for tasks a waiter of this process awaits.
        self.inline: OrderedDict[str, bytes] = OrderedDict()
        self.subscribed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        self.checker: asyncio.Task[None] | None = None
        # task ids to look up in Redis, with the futures of the is_result_ready calls asking
        self.to_check: dict[str, list[asyncio.Future[bool]]] = {}
        self.check_wanted = asyncio.Event()
        self.checking: set[str] = set()
        self.notified_while_checking: set[str] = set()
        # task ids found missing while subscribed (loop time of the check): until a
        # notification names them they are not ready, and is_result_ready needs no Redis
        self.missing: OrderedDict[str, float] = OrderedDict()
        # tasks sent from here while subscribed: False until their notification came
        self.expected: OrderedDict[str, bool] = OrderedDict()

    def expect(self, task_id: str) -> None:
        """``task_id`` is being sent now (not yet finished): its notification will say when
        it is. Only while subscribed, so that no notification can be missed."""
        if not self.subscribed.is_set():
            return
        self.inline.pop(task_id, None)
        self.expected[task_id] = False
        self.expected.move_to_end(task_id)
        while len(self.expected) > _EXPECTED_KEPT:
            self.expected.popitem(last=False)
        self.found_missing(task_id, self.loop.time())

    def arrived(self, task_id: str) -> bool:
        """True if ``task_id`` was sent from here and its notification came."""
        return self.expected.get(task_id, False)

    def register(self, task_id: str) -> asyncio.Future[None]:
        future: asyncio.Future[None] = self.loop.create_future()
        self.waiters.setdefault(task_id, set()).add(future)
        return future

    def unregister(self, task_id: str, future: asyncio.Future[None]) -> None:
        futures = self.waiters.get(task_id)
        if futures is not None:
            futures.discard(future)
            if not futures:
                del self.waiters[task_id]

    def check(self, task_id: str, answer: asyncio.Future[bool] | None = None) -> None:
        """Have the checker look ``task_id`` up in Redis (soon, batched with the others)."""
        answers = self.to_check.setdefault(task_id, [])
        if answer is not None:
            answers.append(answer)
        self.check_wanted.set()

    def check_all(self) -> None:
        """Look up every awaited task (after a (re)subscription, and as the fallback)."""
        for task_id in self.waiters:
            self.to_check.setdefault(task_id, [])
        if self.to_check:
            self.check_wanted.set()

    def notified(self, task_id: str, blob: bytes | None) -> None:
        """A notification: the result of ``task_id`` is saved (``blob``: the result itself)."""
        polled = self.missing.pop(task_id, None) is not None
        if task_id in self.checking:
            self.notified_while_checking.add(task_id)
        if task_id in self.expected:
            self.expected[task_id] = True
        if blob is not None and (polled or task_id in self.waiters):
            self.inline[task_id] = blob
            while len(self.inline) > _INLINE_KEPT:
                self.inline.popitem(last=False)
        self.ready(task_id)

    def ready(self, task_id: str) -> None:
        for future in self.waiters.get(task_id, ()):
            if not future.done():
                future.set_result(None)

    def lost(self) -> None:
        """The subscription is gone: notifications may be missed until it is back."""
        self.subscribed.clear()
        self.missing.clear()
        for task_id in [t for t, came in self.expected.items() if not came]:
            del self.expected[task_id]

    def known_missing(self, task_id: str, fresh: float) -> bool:
        """True if a check made while subscribed found no result for ``task_id`` less than
        ``fresh`` seconds ago, and no notification named it since."""
        checked = self.missing.get(task_id)
        if checked is None or not self.subscribed.is_set():
            return False
        if self.loop.time() - checked > fresh:
            del self.missing[task_id]
            return False
        return True

    def found_missing(self, task_id: str, when: float) -> None:
        self.missing[task_id] = when
        self.missing.move_to_end(task_id)
        while len(self.missing) > _MISSING_KEPT:
            self.missing.popitem(last=False)


class RedisResultBackend(AsyncResultBackend[_ReturnType]):
    """Results in Redis under ``<prefix_str>:<task id>`` (just ``<task id>`` when
    ``prefix_str`` is ``None``), with an optional time to live; with ``keep_results=False`` a
    result (and its progress) is deleted once it has been read. Other keyword arguments go to
    ``redis.asyncio.Redis.from_url``; connections are opened lazily, per process and event loop.

    ``set_result`` retries a Redis failure (a restart, a lost connection) with backoff for up
    to ``save_timeout`` seconds. If the result still cannot be saved, the task is marked
    unsaved (:meth:`take_unsaved`): pool's :class:`~pool.redis.RedisStreamBroker` then gives
    its message back instead of acknowledging it, so the task runs again.
    """

    # How often the results awaited in this process are looked up in Redis, in one batch, in
    # case a notification was missed (or never sent: taskiq-redis's backend does not publish).
    recheck_interval = 10.0

    def __init__(
        self,
        redis_url: str,
        keep_results: bool = True,
        result_ex_time: int | None = None,
        result_px_time: int | None = None,
        max_connection_pool_size: int | None = None,
        serializer: TaskiqSerializer | None = None,
        prefix_str: str | None = "pool:result",
        save_timeout: float = 30.0,
        **connection_kwargs: Any,
    ) -> None:
        if result_ex_time is not None and result_px_time is not None:
            raise ValueError("choose either result_ex_time or result_px_time, not both")
        for name, value in (("result_ex_time", result_ex_time), ("result_px_time", result_px_time)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if save_timeout < 0:
            raise ValueError(f"save_timeout must not be negative, got {save_timeout!r}")
        self.save_timeout = save_timeout
        self.redis_url = redis_url
        self.keep_results = keep_results
        self.result_ex_time = result_ex_time
        self.result_px_time = result_px_time
        self.serializer: TaskiqSerializer = serializer or JSONSerializer()
        self.prefix_str = prefix_str
        self.channel = f"{prefix_str or 'pool:result'}:done"
        if max_connection_pool_size is not None:
            connection_kwargs.setdefault("max_connections", max_connection_pool_size)
        # pub/sub reads wait at most 1 s at a time
        self._redis = LoopClient(redis_url, client_kwargs(connection_kwargs, 1.0, retry=True))
        self._notifier: _Notifier | None = None
        # tasks whose result could not be saved, until their broker takes them (bounded)
        self._unsaved: OrderedDict[str, None] = OrderedDict()

    # ----------------------------------------------------------------- keys
    def result_key(self, task_id: str) -> str:
        return task_id if self.prefix_str is None else f"{self.prefix_str}:{task_id}"

    def progress_key(self, task_id: str) -> str:
        return self.result_key(task_id) + PROGRESS_KEY_SUFFIX

    def _client(self) -> aioredis.Redis:
        return self._redis.get()

    def _expiry(self) -> dict[str, Any]:
        if self.result_ex_time is not None:
            return {"ex": int(self.result_ex_time)}
        if self.result_px_time is not None:
            return {"px": int(self.result_px_time)}
        return {}

    def _where(self) -> str:
        return f"Redis at {safe_url(self.redis_url)}"

    # ----------------------------------------------------------------- lifecycle
    async def shutdown(self) -> None:
        """Stop this loop's subscription and close its client (both reopen on use)."""
        notifier = self._here()
        if notifier is not None:
            self._notifier = None
            for task in (notifier.task, notifier.checker):
                if task is not None:
                    task.cancel()
                    try:
                        await task
                    except BaseException:
                        pass
        await self._redis.close()
        await super().shutdown()

    def _here(self) -> _Notifier | None:
        """The notifier, if it belongs to this process and running event loop."""
        notifier = self._notifier
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        if notifier is None or notifier.pid != current_pid() or notifier.loop is not loop:
            return None
        return notifier

    # ----------------------------------------------------------------- results
    async def set_result(self, task_id: str, result: TaskiqResult[_ReturnType]) -> None:
        """Store the result, then announce it (with the result inside when it is small).

        A Redis failure that waiting may cure is retried with backoff for up to
        ``save_timeout`` seconds; then the task is marked unsaved and the error raised."""
        blob = self._dump(task_id, "result", result)
        inline = self.keep_results and len(blob) <= INLINE_LIMIT
        rider = self._riders().pop(task_id, None)
        note = _note(task_id, blob if inline else None)
        save = (self.result_key(task_id), blob, note, rider)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.save_timeout
        backoff = 0.05
        while True:
            try:
                await self._redis.local("saves", self._saves).submit(save)
                return
            except (RedisError, OSError) as exc:
                left = deadline - loop.time()
                if not is_transient(exc) or left <= 0:
                    self._mark_unsaved(task_id)
                    raise RedisResultSetError(
                        reason=f"cannot save the result of task {task_id} to {self._where()}: {exc}"
                    ) from exc
                logger.warning(
                    "saving the result of task %s to %s failed (%s); retrying for %.0f s more",
                    task_id, self._where(), exc, left,
                )  # fmt: skip
                await asyncio.sleep(min(backoff * random.uniform(0.8, 1.2), left))
                backoff = min(backoff * 2, 2.0)

    def _saves(self) -> Batcher[_Save]:
        return Batcher(self._save_batch)

    def _riders(self) -> dict[str, Rider]:
        return self._redis.local("riders", dict)

    def ride(self, task_id: str, rider: Rider) -> None:
        """Acknowledge ``rider``'s entry with the result of ``task_id``, if it is saved from
        this process and event loop before the broker acknowledges it (:meth:`unride`)."""
        self._riders()[task_id] = rider

    def unride(self, task_id: str, rider: Rider) -> None:
        riders = self._riders()
        if riders.get(task_id) is rider:
            del riders[task_id]

    async def _save_batch(self, saves: list[_Save]) -> None:
        """Save (key, result, notification part, rider) tuples, announce them, and
        acknowledge their riders (those of one stream), in one call."""
        expiry = self._expiry()
        option, value = next(iter(expiry.items())) if expiry else ("", 0)
        note = _BATCH + b"".join(save[2] for save in saves)
        keys = [save[0] for save in saves]
        args: list[Any] = [self.channel, option.upper(), value, note, len(saves)]
        args += [save[1] for save in saves]
        riders = [save[3] for save in saves if save[3] is not None]
        if riders:
            first = riders[0]
            riders = [r for r in riders if (r.stream, r.group) == (first.stream, first.group)]
            keys += [first.stream, f"{first.stream}:blame"]
            args += [first.group, len(riders), *(r.entry_id for r in riders)]
            args += [r.entry_id for r in riders if r.blamed]
        await _SAVE(self._client(), keys, args)
        for rider in riders:
            rider.acked = True
            rider.on_acked(rider.entry_id)

    def expect(self, task_id: str) -> None:
        """Called by pool's stream broker just before it sends ``task_id``: if this process
        is subscribed, the wait for it needs no look-up (see the module docstring)."""
        notifier = self._here()
        if notifier is not None:
            notifier.expect(task_id)

    def _mark_unsaved(self, task_id: str) -> None:
        self._unsaved[task_id] = None
        while len(self._unsaved) > _UNSAVED_KEPT:
            self._unsaved.popitem(last=False)

    def has_unsaved(self) -> bool:
        """True if the result of some task run in this process could not be saved."""
        return bool(self._unsaved)

    def take_unsaved(self, task_id: str) -> bool:
        """True (once) if the result of ``task_id`` could not be saved: its message must be
        delivered again rather than acknowledged."""
        return self._unsaved.pop(task_id, 0) is None

    async def is_result_ready(self, task_id: str) -> bool:
        """Whether the result is stored. Answered without asking Redis when a check made while
        subscribed found it missing less than ``recheck_interval`` ago and no notification
        named it since, so a handle polling this (taskiq's ``wait_result``) costs Redis
        nothing between notifications; concurrent calls share one pipelined round trip."""
        notifier = self._ensure_notifier()
        if notifier.arrived(task_id):
            return True
        if notifier.known_missing(task_id, self.recheck_interval):
            return False
        answer: asyncio.Future[bool] = notifier.loop.create_future()
        notifier.check(task_id, answer)
        return await answer

    async def get_result(self, task_id: str, with_logs: bool = False) -> TaskiqResult[_ReturnType]:
        notifier = self._here()
        blob = None
        if notifier is not None:
            blob = notifier.inline.pop(task_id, None)
            notifier.expected.pop(task_id, None)
        if blob is None:
            blob = await self._read(task_id)
        if blob is None:
            raise RedisResultGetError(
                reason=f"no result stored for task {task_id} in {self._where()}"
            )
        result = self._load(task_id, blob)
        if not with_logs:
            result.log = None
        return result

    async def _read(self, task_id: str) -> bytes | None:
        """The stored result (deleted as it is read unless ``keep_results``), or ``None``."""
        key = self.result_key(task_id)
        try:
            client = self._client()
            if self.keep_results:
                return _bytes(await client.get(key))
            async with client.pipeline(transaction=True) as pipe:
                pipe.get(key)
                pipe.delete(key, self.progress_key(task_id))
                raw, _ = await pipe.execute()
                return _bytes(raw)
        except (RedisError, OSError) as exc:
            raise RedisResultGetError(
                reason=f"cannot read the result of task {task_id} from {self._where()}: {exc}"
            ) from exc

    def _dump(self, task_id: str, what: str, value: TaskiqResult[Any] | TaskProgress[Any]) -> bytes:
        try:
            return model_json.dump(value, self.serializer)
        except Exception as exc:
            raise RedisResultSetError(
                reason=f"the {what} of task {task_id} cannot be serialized with "
                f"{type(self.serializer).__name__}: {type(exc).__name__}: {exc}"
            ) from exc

    def _load(self, task_id: str, blob: bytes) -> TaskiqResult[_ReturnType]:
        try:
            return model_json.load(TaskiqResult[_ReturnType], blob, self.serializer)
        except Exception as exc:
            raise RedisResultGetError(
                reason=f"the stored result of task {task_id} cannot be decoded with "
                f"{type(self.serializer).__name__}: {type(exc).__name__}: {exc}"
            ) from exc

    # ----------------------------------------------------------------- waiting
    async def wait_ready(self, task_id: str, timeout: float | None) -> None:
        """Return once the result of ``task_id`` is stored; ``TaskiqResultTimeoutError`` after
        ``timeout`` seconds (``None``: no limit).

        The waiter sleeps until the notification of ``set_result`` wakes it. The key is looked
        up once when the wait starts, again for every waiter once the subscription is
        confirmed (a result saved in between), and every ``recheck_interval`` seconds, in
        batches shared by every waiter of this process. Redis errors while waiting are
        logged and waited out until the timeout.
        """
        notifier = self._ensure_notifier()
        if notifier.arrived(task_id):
            return  # sent from here, and its notification came
        if not notifier.known_missing(task_id, self.recheck_interval):
            notifier.inline.pop(task_id, None)  # left by an earlier wait that never read it
            notifier.check(task_id)
        future = notifier.register(task_id)
        try:
            done, _ = await asyncio.wait({future}, timeout=timeout)
            if not done:
                raise TaskiqResultTimeoutError(timeout=timeout)
        finally:
            notifier.unregister(task_id, future)

    def _ensure_notifier(self) -> _Notifier:
        notifier = self._here()
        if notifier is None:
            if self._notifier is not None and self._notifier.pid != current_pid():
                keep_inherited(self._notifier)  # its subscription belongs to the parent process
            notifier = self._notifier = _Notifier()
        if notifier.task is None or notifier.task.done():
            notifier.task = asyncio.create_task(
                self._subscribe(notifier), name=f"pool-redis-results:{self.channel}"
            )
        if notifier.checker is None or notifier.checker.done():
            notifier.checker = asyncio.create_task(
                self._check(notifier), name=f"pool-redis-checks:{self.channel}"
            )
        return notifier

    async def _check(self, notifier: _Notifier) -> None:
        """Look up the requested task ids in batches; every ``recheck_interval``, all of them."""
        loop = notifier.loop
        backoff = 0.1
        next_sweep = loop.time() + self.recheck_interval
        while True:
            if not notifier.to_check:
                try:
                    await asyncio.wait_for(
                        notifier.check_wanted.wait(), max(0.0, next_sweep - loop.time())
                    )
                except asyncio.TimeoutError:
                    pass
            notifier.check_wanted.clear()
            if loop.time() >= next_sweep:
                notifier.check_all()
                next_sweep = loop.time() + self.recheck_interval
            batch = list(notifier.to_check)[:_CHECK_BATCH]
            if not batch:
                continue
            subscribed = notifier.subscribed.is_set()
            started = loop.time()
            notifier.checking = set(batch)
            notifier.notified_while_checking = set()
            try:
                async with self._client().pipeline(transaction=False) as pipe:
                    for task_id in batch:
                        pipe.exists(self.result_key(task_id))
                    found = await pipe.execute()
                raise_if_cancelled()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = RedisResultIsReadyError(
                    reason=f"cannot check the results of {len(batch)} task(s) in "
                    f"{self._where()}: {exc}"
                )
                for task_id in batch:
                    for answer in notifier.to_check.pop(task_id, []):
                        if not answer.done():
                            answer.set_exception(error)
                    if task_id in notifier.waiters:
                        notifier.to_check.setdefault(task_id, [])  # waiters keep waiting
                if notifier.to_check:
                    logger.warning("%s; retrying in %.1f s", error, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 5.0)
                continue
            finally:
                notifier.checking = set()
            backoff = 0.1
            for task_id, exists in zip(batch, found, strict=True):
                ready = bool(exists)
                if not ready and subscribed and task_id not in notifier.notified_while_checking:
                    notifier.found_missing(task_id, started)
                for answer in notifier.to_check.pop(task_id, []):
                    if not answer.done():
                        answer.set_result(ready)
                if ready:
                    notifier.ready(task_id)

    async def _subscribe(self, notifier: _Notifier) -> None:
        backoff = 0.1
        while True:
            pubsub = None
            try:
                pubsub = self._client().pubsub()
                await pubsub.subscribe(self.channel)
                await self._confirmed(pubsub)
                notifier.subscribed.set()
                notifier.check_all()  # anything saved while we were not subscribed
                if backoff > 0.1:
                    logger.warning("result notifications from %s are back", self._where())
                backoff = 0.1
                await self._dispatch(pubsub, notifier)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                notifier.lost()
                logger.warning(
                    "result notifications from %s lost (%s: %s); resubscribing in %.1f s",
                    self._where(), type(exc).__name__, exc, backoff,
                )  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                if pubsub is not None:
                    try:
                        await asyncio.shield(pubsub.aclose())
                    except BaseException:
                        pass

    @staticmethod
    async def _confirmed(pubsub: Any) -> None:
        """Wait until Redis confirmed the subscription: from then on no result is missed."""
        while True:
            message = await pubsub.get_message(timeout=1.0)
            raise_if_cancelled()
            if message is not None and message.get("type") == "subscribe":
                return

    @staticmethod
    async def _dispatch(pubsub: Any, notifier: _Notifier) -> None:
        """Read the notifications straight from the subscription's connection (redis-py's
        ``get_message`` costs more than the message); a lost connection ends the loop, and
        ``_subscribe`` subscribes again."""
        conn = pubsub.connection
        while True:
            response = await conn.read_response(timeout=1.0, push_request=True)
            raise_if_cancelled()
            if not isinstance(response, list) or len(response) != 3:
                continue
            kind, _, data = response
            if kind not in (b"message", "message"):
                continue
            data = data if isinstance(data, bytes) else str(data).encode()
            for task_id, blob in _notes(data):
                notifier.notified(task_id, blob)

    # ----------------------------------------------------------------- progress
    async def set_progress(self, task_id: str, progress: TaskProgress[Any]) -> None:
        blob = self._dump(task_id, "progress", progress)
        try:
            await self._client().set(self.progress_key(task_id), blob, **self._expiry())
        except (RedisError, OSError) as exc:
            raise RedisResultSetError(
                reason=f"cannot save the progress of task {task_id} to {self._where()}: {exc}"
            ) from exc

    async def get_progress(self, task_id: str) -> TaskProgress[Any] | None:
        try:
            blob = _bytes(await self._client().get(self.progress_key(task_id)))
        except (RedisError, OSError) as exc:
            raise RedisResultGetError(
                reason=f"cannot read the progress of task {task_id} from {self._where()}: {exc}"
            ) from exc
        if blob is None:
            return None
        try:
            return model_json.load(TaskProgress[Any], blob, self.serializer)
        except Exception as exc:
            raise RedisResultGetError(
                reason=f"the stored progress of task {task_id} cannot be decoded: {exc}"
            ) from exc

    def __repr__(self) -> str:
        return (
            f"RedisResultBackend(redis_url={safe_url(self.redis_url)!r}, "
            f"prefix_str={self.prefix_str!r})"
        )


def _bytes(value: bytes | str | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value
