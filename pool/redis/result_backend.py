"""``RedisResultBackend``: a ``taskiq.AsyncResultBackend`` in Redis whose waiters are pushed to.

taskiq's contract: ``set_result`` / ``get_result`` / ``is_result_ready`` carry
``taskiq.TaskiqResult`` objects, ``set_progress`` / ``get_progress`` carry
``taskiq.depends.progress_tracker.TaskProgress`` objects. They are stored the way taskiq-redis
stores them (``serializer.dumpb(result.model_dump(mode="json"))``, read back with
``TaskiqResult.model_validate``), under the same keys (``<prefix_str>:<task id>``, the progress
under that key plus ``__progress``), so a pydantic model comes back as the task's declared
return type and an exception as the ``error`` field, exactly as with taskiq-redis. The
parameters are taskiq-redis's (``redis_url``, ``keep_results``, ``result_ex_time`` in seconds,
``result_px_time`` in milliseconds, ``max_connection_pool_size``, ``serializer``,
``prefix_str``).

Where pool differs:

- the default serializer is taskiq's JSON serializer (taskiq-redis: pickle): nothing read from
  Redis is unpickled unless you pass a pickling serializer;
- ``set_result`` also publishes the task id on the channel ``<prefix_str>:done`` (a result up to
  ``INLINE_LIMIT`` bytes travels inside the notification), and :meth:`wait_ready` waits for
  that notification instead of polling: this is the ``PushedResults`` protocol of
  :mod:`pool.extensions.handles`, used by the handles that pool's brokers return from ``kiq``.
  Each backend (per process and event loop) keeps one subscription, started by the first
  wait; every waiting process receives every notification, fine for many thousands of
  results a second.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import OrderedDict
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from taskiq import AsyncResultBackend, TaskiqResult, TaskiqResultTimeoutError
from taskiq.abc.serializer import TaskiqSerializer
from taskiq.depends.progress_tracker import TaskProgress
from taskiq.exceptions import ResultGetError, ResultIsReadyError, ResultSetError
from taskiq.serializers import JSONSerializer

from pool.redis.broker import (
    LoopClient,
    PoolRedisError,
    client_kwargs,
    keep_inherited,
    raise_if_cancelled,
    safe_url,
)

logger = logging.getLogger("pool.redis")

_ReturnType = TypeVar("_ReturnType")

# Results up to this size travel inside the notification, so a waiting producer needs no GET.
INLINE_LIMIT = 4096
PROGRESS_KEY_SUFFIX = "__progress"  # taskiq-redis's
_SEP = b"\x00"
_INLINE_KEPT = 10_000


class RedisResultSetError(PoolRedisError, ResultSetError):
    """A result or a progress could not be saved (Redis failed, or the value cannot be
    serialized)."""


class RedisResultGetError(PoolRedisError, ResultGetError):
    """No result is stored for the task, or it cannot be read or decoded."""


class RedisResultIsReadyError(PoolRedisError, ResultIsReadyError):
    """Redis failed while checking whether a result is ready."""


class _Notifier:
    """The subscription of one backend in one process and event loop, and its waiters."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.pid = os.getpid()
        self.waiters: dict[str, set[asyncio.Future[None]]] = {}
        # Results that came inside notifications, for tasks a waiter of this process awaits.
        self.inline: OrderedDict[str, bytes] = OrderedDict()
        self.subscribed = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

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

    def deliver(self, task_id: str, blob: bytes) -> None:
        """A notification that carried the result itself."""
        if task_id in self.waiters:
            self.inline[task_id] = blob
            while len(self.inline) > _INLINE_KEPT:
                self.inline.popitem(last=False)
        self.wake(task_id)

    def wake(self, task_id: str) -> None:
        for future in self.waiters.get(task_id, ()):
            if not future.done():
                future.set_result(None)

    def wake_all(self) -> None:
        for task_id in list(self.waiters):
            self.wake(task_id)


class RedisResultBackend(AsyncResultBackend[_ReturnType]):
    """Results in Redis under ``<prefix_str>:<task id>`` (just ``<task id>`` when
    ``prefix_str`` is ``None``), with an optional time to live; with ``keep_results=False`` a
    result (and its progress) is deleted once it has been read. Other keyword arguments go to
    ``redis.asyncio.Redis.from_url``; connections are opened lazily, per process and event loop.
    """

    # how often a waiter reads the key again in case a notification was lost (seconds)
    recheck_interval = 1.0

    def __init__(
        self,
        redis_url: str,
        keep_results: bool = True,
        result_ex_time: int | None = None,
        result_px_time: int | None = None,
        max_connection_pool_size: int | None = None,
        serializer: TaskiqSerializer | None = None,
        prefix_str: str | None = "pool:result",
        **connection_kwargs: Any,
    ) -> None:
        if result_ex_time is not None and result_px_time is not None:
            raise ValueError("choose either result_ex_time or result_px_time, not both")
        for name, value in (("result_ex_time", result_ex_time), ("result_px_time", result_px_time)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
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
            if notifier.task is not None:
                notifier.task.cancel()
                try:
                    await notifier.task
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
        if notifier is None or notifier.pid != os.getpid() or notifier.loop is not loop:
            return None
        return notifier

    # ----------------------------------------------------------------- results
    async def set_result(self, task_id: str, result: TaskiqResult[_ReturnType]) -> None:
        """Store the result, then announce it (with the result inside when it is small)."""
        blob = self._dump(task_id, "result", result)
        inline = self.keep_results and len(blob) <= INLINE_LIMIT
        try:
            async with self._client().pipeline(transaction=True) as pipe:
                pipe.set(self.result_key(task_id), blob, **self._expiry())
                pipe.publish(self.channel, task_id.encode() + _SEP + blob if inline else task_id)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise RedisResultSetError(
                reason=f"cannot save the result of task {task_id} to {self._where()}: {exc}"
            ) from exc

    async def is_result_ready(self, task_id: str) -> bool:
        try:
            return bool(await self._client().exists(self.result_key(task_id)))
        except (RedisError, OSError) as exc:
            raise RedisResultIsReadyError(
                reason=f"cannot check the result of task {task_id} in {self._where()}: {exc}"
            ) from exc

    async def get_result(self, task_id: str, with_logs: bool = False) -> TaskiqResult[_ReturnType]:
        notifier = self._here()
        blob = notifier.inline.pop(task_id, None) if notifier is not None else None
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
            return self.serializer.dumpb(value.model_dump(mode="json"))
        except Exception as exc:
            raise RedisResultSetError(
                reason=f"the {what} of task {task_id} cannot be serialized with "
                f"{type(self.serializer).__name__}: {type(exc).__name__}: {exc}"
            ) from exc

    def _load(self, task_id: str, blob: bytes) -> TaskiqResult[_ReturnType]:
        try:
            return TaskiqResult[_ReturnType].model_validate(self.serializer.loadb(blob))
        except Exception as exc:
            raise RedisResultGetError(
                reason=f"the stored result of task {task_id} cannot be decoded with "
                f"{type(self.serializer).__name__}: {type(exc).__name__}: {exc}"
            ) from exc

    # ----------------------------------------------------------------- waiting
    async def wait_ready(self, task_id: str, timeout: float | None) -> None:
        """Return once the result of ``task_id`` is stored; ``TaskiqResultTimeoutError`` after
        ``timeout`` seconds (``None``: no limit).

        Woken by the notification of ``set_result``; the key is read once the subscription is
        up (so a result saved just before is not missed) and again every
        ``recheck_interval`` seconds (a notification lost while resubscribing). Redis errors
        while waiting are logged and waited out until the timeout.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        notifier = self._ensure_notifier()
        notifier.inline.pop(task_id, None)  # left by an earlier wait that never read it
        future = notifier.register(task_id)
        try:
            if not notifier.subscribed.is_set():
                # results saved before the subscription is up would only be seen by the
                # re-check: wait for it (briefly) first
                limit = 2.0 if deadline is None else max(0.0, min(2.0, deadline - loop.time()))
                try:
                    await asyncio.wait_for(notifier.subscribed.wait(), limit)
                except asyncio.TimeoutError:
                    pass
            failing = False
            while task_id not in notifier.inline:
                try:
                    if await self.is_result_ready(task_id):
                        return
                    failing = False
                except RedisResultIsReadyError as exc:
                    if not failing:
                        logger.warning("waiting for task %s: %s", task_id, exc)
                    failing = True
                raise_if_cancelled()
                wait = self.recheck_interval
                if deadline is not None:
                    wait = min(wait, deadline - loop.time())
                    if wait <= 0:
                        raise TaskiqResultTimeoutError(timeout=timeout)
                await asyncio.wait({future}, timeout=wait)
                if future.done():
                    notifier.unregister(task_id, future)
                    future = notifier.register(task_id)
        finally:
            notifier.unregister(task_id, future)

    def _ensure_notifier(self) -> _Notifier:
        notifier = self._here()
        if notifier is None:
            if self._notifier is not None and self._notifier.pid != os.getpid():
                keep_inherited(self._notifier)  # its subscription belongs to the parent process
            notifier = self._notifier = _Notifier()
        if notifier.task is None or notifier.task.done():
            notifier.task = asyncio.create_task(
                self._subscribe(notifier), name=f"pool-redis-results:{self.channel}"
            )
        return notifier

    async def _subscribe(self, notifier: _Notifier) -> None:
        backoff = 0.1
        while True:
            pubsub = None
            try:
                pubsub = self._client().pubsub()
                await pubsub.subscribe(self.channel)
                await self._confirmed(pubsub)
                notifier.subscribed.set()
                notifier.wake_all()  # anything saved while we were not subscribed
                if backoff > 0.1:
                    logger.warning("result notifications from %s are back", self._where())
                backoff = 0.1
                await self._dispatch(pubsub, notifier)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                notifier.subscribed.clear()
                notifier.wake_all()  # waiters read the key again; they keep waiting
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
        while True:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            raise_if_cancelled()
            if message is None or message.get("type") != "message":
                continue
            data = message.get("data")
            data = data if isinstance(data, bytes) else str(data).encode()
            raw_id, sep, blob = data.partition(_SEP)
            task_id = raw_id.decode()
            if sep:
                notifier.deliver(task_id, blob)
            else:
                notifier.wake(task_id)

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
            return TaskProgress[Any].model_validate(self.serializer.loadb(blob))
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
