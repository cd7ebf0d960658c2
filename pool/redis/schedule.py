"""Schedules kept in Redis, and run claims that let several schedulers run at once.

:class:`RedisScheduleSource` is a ``taskiq.ScheduleSource`` keeping taskiq ``ScheduledTask``
objects in one Redis hash (``<prefix>``: schedule id -> the schedule, serialized as
taskiq-redis does: ``serializer.dumpb(schedule.model_dump(mode="json"))``), so schedules added
at run time (``task.kicker().schedule_by_cron(source, ...)`` and friends) outlive the
scheduler process and are seen by every scheduler using the same hash. As in taskiq-redis, a
one-shot ``time`` schedule is deleted once sent (``post_send``). Unlike taskiq-redis, the
default serializer is JSON (nothing is unpickled), and all schedules are one ``HGETALL``.

:class:`RedisRunClaim` is pool's run claim (:mod:`pool.extensions.scheduler`): the scheduler
that sets ``<prefix>:<schedule id>:<occurrence>`` first (``SET NX PX``) sends the run. A
``PoolScheduler`` (or ``python -m pool scheduler``) given a ``RedisScheduleSource`` uses the
source's :meth:`~RedisScheduleSource.run_claim` by itself.
"""

from __future__ import annotations

import logging
import math
import uuid
from typing import Any

import redis.asyncio as aioredis
from taskiq import ScheduledTask, ScheduleSource
from taskiq.abc.serializer import TaskiqSerializer
from taskiq.serializers import JSONSerializer

from pool.redis.broker import LoopClient, client_kwargs, safe_url

logger = logging.getLogger("pool.redis")

# Delete a claim only while it is still ours (it may have expired and been taken since).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class RedisRunClaim:
    """Run claims in Redis: ``claim`` succeeds for one caller per run while the claim lasts.

    A claim is the key ``<prefix>:<schedule id>:<occurrence>``, set with ``SET NX PX`` for the
    ``ttl`` the scheduler asks. Other keyword arguments go to ``redis.asyncio.Redis.from_url``;
    the connection is opened on first use, one per process and event loop.
    """

    def __init__(
        self, url: str, prefix: str = "pool:schedule-claims", **connection_kwargs: Any
    ) -> None:
        self.url = url
        self.prefix = prefix
        self._redis = LoopClient(url, client_kwargs(connection_kwargs))
        # (schedule id, occurrence) -> token of a claim this object won, for release()
        self._won: dict[tuple[str, str], str] = {}

    def key(self, schedule_id: str, occurrence: str) -> str:
        return f"{self.prefix}:{schedule_id}:{occurrence}"

    async def claim(self, schedule_id: str, occurrence: str, ttl: float) -> bool:
        """True if this call claimed the run; False if someone holds it already."""
        if not math.isfinite(ttl) or ttl <= 0:
            raise ValueError(f"a claim needs a positive ttl in seconds, got {ttl!r}")
        token = uuid.uuid4().hex
        won = await self._redis.get().set(
            self.key(schedule_id, occurrence), token, nx=True, px=max(1, math.ceil(ttl * 1000))
        )
        if won:
            self._won[(schedule_id, occurrence)] = token
            while len(self._won) > 10_000:  # only the latest claims are ever released
                del self._won[next(iter(self._won))]
        return bool(won)

    async def release(self, schedule_id: str, occurrence: str) -> None:
        """Give up a claim this object won (its run could not be sent), so it can be retried."""
        token = self._won.pop((schedule_id, occurrence), None)
        if token is not None:
            await self._redis.get().eval(_RELEASE, 1, self.key(schedule_id, occurrence), token)

    async def shutdown(self) -> None:
        """Close this process's connection (it is reopened if the claim is used again)."""
        await self._redis.close()

    def __repr__(self) -> str:
        return f"RedisRunClaim(url={safe_url(self.url)!r}, prefix={self.prefix!r})"


class RedisScheduleSource(ScheduleSource):
    """Schedules in the Redis hash ``prefix``, shared by every scheduler that reads it.

    ``add_schedule`` stores a schedule (replacing one with the same id), ``delete_schedule``
    removes it (a missing id is not an error), ``get_schedules`` reads them all. A stored entry
    that cannot be read back is logged once and skipped. ``serializer`` defaults to taskiq's
    JSON serializer. Other keyword arguments go to ``redis.asyncio.Redis.from_url``; the
    connection is opened on first use, one per process and event loop.
    """

    def __init__(
        self,
        url: str,
        prefix: str = "pool:schedules",
        max_connection_pool_size: int | None = None,
        serializer: TaskiqSerializer | None = None,
        **connection_kwargs: Any,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.serializer: TaskiqSerializer = serializer or JSONSerializer()
        if max_connection_pool_size is not None:
            connection_kwargs.setdefault("max_connections", max_connection_pool_size)
        self._connection_kwargs = dict(connection_kwargs)
        self._redis = LoopClient(url, client_kwargs(connection_kwargs))
        self._reported: dict[str, bytes] = {}  # unreadable entries already logged

    def _client(self) -> aioredis.Redis:
        return self._redis.get()

    def run_claim(self) -> RedisRunClaim:
        """A new claim on the same Redis (keys ``<prefix>:claims:...``), for the schedulers
        that share this source."""
        return RedisRunClaim(self.url, prefix=f"{self.prefix}:claims", **self._connection_kwargs)

    async def shutdown(self) -> None:
        await self._redis.close()

    async def add_schedule(self, schedule: ScheduledTask) -> None:
        try:
            blob = self.serializer.dumpb(schedule.model_dump(mode="json"))
        except Exception as exc:
            raise ValueError(
                f"cannot store the schedule of task {schedule.task_name!r} in Redis with "
                f"{type(self.serializer).__name__}: {type(exc).__name__}: {exc}"
            ) from exc
        await self._client().hset(self.prefix, schedule.schedule_id, blob)

    async def delete_schedule(self, schedule_id: str) -> None:
        await self._client().hdel(self.prefix, schedule_id)

    async def get_schedules(self) -> list[ScheduledTask]:
        entries: dict[Any, Any] = await self._client().hgetall(self.prefix)
        schedules: list[ScheduledTask] = []
        for raw_id, blob in entries.items():
            schedule = self._load(_text(raw_id), blob)
            if schedule is not None:
                schedules.append(schedule)
        return schedules

    def _load(self, schedule_id: str, blob: bytes) -> ScheduledTask | None:
        try:
            data = self.serializer.loadb(blob)
            if not isinstance(data, dict):
                raise ValueError(f"expected a mapping, got {type(data).__name__}")
            data["schedule_id"] = schedule_id
            schedule = ScheduledTask.model_validate(data)
        except Exception as exc:
            if self._reported.get(schedule_id) != blob:
                self._reported[schedule_id] = blob
                logger.error(
                    "skipping unreadable schedule %s in Redis hash %s: %s: %s",
                    schedule_id, self.prefix, type(exc).__name__, exc,
                )  # fmt: skip
            return None
        self._reported.pop(schedule_id, None)
        return schedule

    async def post_send(self, task: ScheduledTask) -> None:
        """Delete a one-shot ``time`` schedule once it was sent (as taskiq-redis does)."""
        if task.time is not None and not task.cron:
            await self.delete_schedule(task.schedule_id)

    def __repr__(self) -> str:
        return f"RedisScheduleSource(url={safe_url(self.url)!r}, prefix={self.prefix!r})"


__all__ = ["RedisRunClaim", "RedisScheduleSource"]
