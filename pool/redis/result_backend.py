"""``RedisResultBackend``: results as JSON strings in Redis, waiters woken by pub/sub.

``set_result`` stores the result under ``<prefix>:<task id>`` and publishes the task id on the
channel ``<prefix>:done``. Each backend instance (per process and event loop) keeps one
subscription to that channel, started by the first ``wait_result``, and wakes the waiters of
the announced task; a waiter reads the key after it registered, so a result saved just before
is not missed, and re-reads it every ``check_interval`` seconds as a fallback (a notification
lost while the subscription was reconnecting). Every waiting process receives every
notification (a task id per result): fine for many thousands of results a second.

Data read from Redis goes through the JSON serializer unless another ``serializer`` is passed;
nothing is unpickled by default.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections import OrderedDict
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pool.exceptions import (
    ResultGetError,
    ResultIsReadyError,
    ResultSetError,
    TaskiqResultTimeoutError,
)
from pool.redis.broker import (
    LoopClient,
    client_kwargs,
    keep_inherited,
    raise_if_cancelled,
    safe_url,
)
from pool.result import TaskiqResult
from pool.result_backend import AsyncResultBackend
from pool.serializers import JSONSerializer, TaskiqSerializer

logger = logging.getLogger("pool.redis")

_ReturnType = TypeVar("_ReturnType")

_MISSING: Any = object()

# Results up to this size travel inside the notification, so a waiting producer needs no GET.
INLINE_LIMIT = 4096
_SEP = b"\x00"


class _Notifier:
    """The subscription of one backend in one process and event loop, and its waiters."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.pid = os.getpid()
        self.waiters: dict[str, set[asyncio.Future[None]]] = {}
        # Results that came inside notifications, for tasks this process holds a handle of.
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

    def deliver(self, task_id: str, blob: bytes, wanted: bool) -> None:
        """A notification that carried the result itself."""
        if wanted:
            self.inline[task_id] = blob
            while len(self.inline) > 10_000:
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
    """Results in Redis under ``<prefix>:<task id>``, progress under ``<prefix>:progress:<id>``.

    ``result_ex_time`` (seconds) or ``result_px_time`` (milliseconds) give results a time to
    live; with ``keep_results=False`` a result is deleted once it has been read. Other keyword
    arguments go to ``redis.asyncio.Redis.from_url``.
    """

    def __init__(
        self,
        url: str,
        result_ex_time: int | None = None,
        result_px_time: int | None = None,
        keep_results: bool = True,
        prefix: str = "pool:result",
        serializer: TaskiqSerializer | None = None,
        max_connection_pool_size: int | None = None,
        **connection_kwargs: Any,
    ) -> None:
        if result_ex_time is not None and result_px_time is not None:
            raise ValueError("choose either result_ex_time or result_px_time, not both")
        for name, value in (("result_ex_time", result_ex_time), ("result_px_time", result_px_time)):
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        self.url = url
        self.result_ex_time = result_ex_time
        self.result_px_time = result_px_time
        self.keep_results = keep_results
        self.prefix = prefix
        self.channel = f"{prefix}:done"
        self.serializer: TaskiqSerializer = serializer or JSONSerializer()
        if max_connection_pool_size is not None:
            connection_kwargs.setdefault("max_connections", max_connection_pool_size)
        # pub/sub reads wait at most 1 s at a time
        self._redis = LoopClient(url, client_kwargs(connection_kwargs, 1.0, retry=True))
        self._notifier: _Notifier | None = None
        self._handles: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()

    def track(self, handle: Any) -> None:
        """Results of tasks whose handle is alive are kept when they come inline."""
        self._handles[handle.task_id] = handle

    # ----------------------------------------------------------------- keys
    def result_key(self, task_id: str) -> str:
        return f"{self.prefix}:{task_id}"

    def progress_key(self, task_id: str) -> str:
        return f"{self.prefix}:progress:{task_id}"

    def _client(self) -> aioredis.Redis:
        return self._redis.get()

    def _expiry(self) -> dict[str, Any]:
        if self.result_ex_time is not None:
            return {"ex": int(self.result_ex_time)}
        if self.result_px_time is not None:
            return {"px": int(self.result_px_time)}
        return {}

    def _where(self) -> str:
        return f"Redis at {safe_url(self.url)}"

    # ----------------------------------------------------------------- lifecycle
    async def shutdown(self) -> None:
        notifier, self._notifier = self._notifier, None
        if notifier is not None and notifier.task is not None and self._is_here(notifier):
            notifier.task.cancel()
            try:
                await notifier.task
            except BaseException:
                pass
        await self._redis.close()

    @staticmethod
    def _is_here(notifier: _Notifier) -> bool:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        return notifier.pid == os.getpid() and notifier.loop is loop

    # ----------------------------------------------------------------- results
    async def set_result(self, task_id: str, result: TaskiqResult[_ReturnType]) -> None:
        # a value JSON cannot encode raises here (TypeError): the receiver then saves an
        # error result that says so
        blob = self.serializer.dumpb(result.to_dict())
        try:
            client = self._client()
            async with client.pipeline(transaction=True) as pipe:
                pipe.set(self.result_key(task_id), blob, **self._expiry())
                inline = len(blob) <= INLINE_LIMIT and self.keep_results
                pipe.publish(self.channel, task_id.encode() + _SEP + blob if inline else task_id)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            raise ResultSetError(
                f"cannot save the result of task {task_id} to {self._where()}: {exc}"
            ) from exc

    async def is_result_ready(self, task_id: str) -> bool:
        try:
            return bool(await self._client().exists(self.result_key(task_id)))
        except (RedisError, OSError) as exc:
            raise ResultIsReadyError(
                f"cannot check the result of task {task_id} in {self._where()}: {exc}"
            ) from exc

    async def get_result(self, task_id: str, with_logs: bool = False) -> TaskiqResult[_ReturnType]:
        blob = await self._read(task_id)
        if blob is None:
            raise ResultGetError(f"no result stored for task {task_id} in {self._where()}")
        return self._decode(task_id, blob, with_logs)

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
            raise ResultGetError(
                f"cannot read the result of task {task_id} from {self._where()}: {exc}"
            ) from exc

    def _decode(self, task_id: str, blob: bytes, with_logs: bool) -> TaskiqResult[_ReturnType]:
        try:
            data = self.serializer.loadb(blob)
            if not isinstance(data, dict):
                raise ValueError(f"expected a mapping, got {type(data).__name__}")
            result: TaskiqResult[Any] = TaskiqResult.from_dict(data)
        except Exception as exc:
            raise ResultGetError(
                f"the stored result of task {task_id} cannot be decoded with "
                f"{type(self.serializer).__name__}: {exc}"
            ) from exc
        if not with_logs:
            result.log = None
        return result

    async def wait_result(
        self,
        task_id: str,
        check_interval: float = 0.2,
        timeout: float = -1,
        with_logs: bool = False,
    ) -> TaskiqResult[_ReturnType]:
        """Wait for the result, woken by the ``set_result`` notification.

        ``check_interval`` is only how often the key is read again in case a notification was
        lost; a negative ``timeout`` waits forever. Redis errors while waiting are logged and
        waited out until the timeout.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout is not None and timeout >= 0 else None
        period = check_interval if check_interval and check_interval > 0 else 0.2
        notifier = self._ensure_notifier()
        blob = notifier.inline.pop(task_id, None)
        if blob is not None:
            return self._decode(task_id, blob, with_logs)
        future = notifier.register(task_id)
        last_error: BaseException | None = None
        try:
            if not notifier.subscribed.is_set():
                # results saved before the subscription is up would only be seen by the
                # fallback re-read: wait for it (briefly) first
                limit = 2.0 if deadline is None else max(0.0, min(2.0, deadline - loop.time()))
                try:
                    await asyncio.wait_for(notifier.subscribed.wait(), limit)
                except asyncio.TimeoutError:
                    pass
            while True:
                blob = notifier.inline.pop(task_id, None)
                if blob is not None:
                    return self._decode(task_id, blob, with_logs)
                try:
                    blob = await self._read(task_id)
                    if blob is not None:
                        return self._decode(task_id, blob, with_logs)
                    last_error = None
                except ResultGetError as exc:
                    if last_error is None:
                        logger.warning("waiting for task %s: %s", task_id, exc)
                    last_error = exc
                raise_if_cancelled()
                wait = period
                if deadline is not None:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        extra = f" (last error: {last_error})" if last_error else ""
                        raise TaskiqResultTimeoutError(
                            f"no result for task {task_id} in {timeout} s{extra}"
                        )
                    wait = min(wait, remaining)
                await asyncio.wait({future}, timeout=wait)
                if future.done():
                    notifier.unregister(task_id, future)
                    future = notifier.register(task_id)
        finally:
            notifier.unregister(task_id, future)

    # ----------------------------------------------------------------- notifications
    def _ensure_notifier(self) -> _Notifier:
        notifier = self._notifier
        if notifier is None or not self._is_here(notifier):
            if notifier is not None and notifier.pid != os.getpid():
                keep_inherited(notifier)  # its subscription belongs to the parent process
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
                # wait until Redis confirmed the subscription: from then on no result is missed
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    raise_if_cancelled()
                    if message is not None and message.get("type") == "subscribe":
                        break
                notifier.subscribed.set()
                notifier.wake_all()  # anything saved while we were not subscribed
                if backoff > 0.1:
                    logger.warning("result notifications from %s are back", self._where())
                backoff = 0.1
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    raise_if_cancelled()
                    if message is not None and message.get("type") == "message":
                        data = message.get("data")
                        data = data if isinstance(data, bytes) else str(data).encode()
                        raw_id, sep, blob = data.partition(_SEP)
                        task_id = raw_id.decode()
                        if sep:
                            notifier.deliver(task_id, blob, task_id in self._handles)
                        else:
                            notifier.wake(task_id)
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

    # ----------------------------------------------------------------- progress
    async def set_progress(self, task_id: str, progress: Any) -> None:
        blob = self.serializer.dumpb(progress)
        try:
            await self._client().set(self.progress_key(task_id), blob, **self._expiry())
        except (RedisError, OSError) as exc:
            raise ResultSetError(
                f"cannot save the progress of task {task_id} to {self._where()}: {exc}"
            ) from exc

    async def get_progress(self, task_id: str) -> Any:
        try:
            blob = _bytes(await self._client().get(self.progress_key(task_id)))
        except (RedisError, OSError) as exc:
            raise ResultGetError(
                f"cannot read the progress of task {task_id} from {self._where()}: {exc}"
            ) from exc
        if blob is None:
            return None
        try:
            return self.serializer.loadb(blob)
        except Exception as exc:
            raise ResultGetError(
                f"the stored progress of task {task_id} cannot be decoded: {exc}"
            ) from exc

    def __repr__(self) -> str:
        return f"RedisResultBackend(url={safe_url(self.url)!r}, prefix={self.prefix!r})"


def _bytes(value: bytes | str | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value
