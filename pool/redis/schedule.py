"""Schedules kept in Redis, and run claims that let several schedulers run at once.

:class:`RedisScheduleSource` keeps schedules in one Redis hash (``<prefix>``: schedule id ->
the JSON of :meth:`ScheduledTask.to_dict`), so schedules added at run time
(``schedule_by_cron(task, source, ...)`` and friends) outlive the scheduler process and are
seen by every scheduler using the same hash. Only JSON is read or written: arguments of a
stored schedule must be JSON values.

:class:`RedisRunClaim` makes each due run be sent by one scheduler only: the scheduler that
sets ``<prefix>:<schedule id>:<occurrence>`` first (``SET NX PX``) sends the run. Give every
scheduler one (``TaskiqScheduler(broker, sources, claim=RedisRunClaim(url))``), or use a
``RedisScheduleSource``, whose ``run_claim()`` the scheduler picks up by itself.
"""

from __future__ import annotations

import json
import logging
import math
import uuid
from typing import Any

import redis.asyncio as aioredis

from pool.redis.broker import LoopClient, client_kwargs
from pool.scheduler import ScheduledTask, ScheduleSource

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
    ``ttl`` the scheduler asks (a day for cron and one-shot runs, ``0.9 * interval`` for
    interval runs). Other keyword arguments go to ``redis.asyncio.Redis.from_url``; the
    connection is opened on first use, one per process and event loop.
    """

    def __init__(
        self, url: str, prefix: str = "pool:schedule-claims", **connection_kwargs: Any
    ) -> None:
        self.url = url
        self.prefix = prefix
        self._redis = LoopClient(url, client_kwargs(connection_kwargs))
        # schedule id -> (claim key, token) of the latest claim won, for release()
        self._won: dict[str, tuple[str, str]] = {}

    def key(self, schedule_id: str, occurrence: str) -> str:
        return f"{self.prefix}:{schedule_id}:{occurrence}"

    async def claim(self, schedule_id: str, occurrence: str, ttl: float) -> bool:
        """True if this call claimed the run; False if someone holds it already."""
        if not math.isfinite(ttl) or ttl <= 0:
            raise ValueError(f"a claim needs a positive ttl in seconds, got {ttl!r}")
        key = self.key(schedule_id, occurrence)
        token = uuid.uuid4().hex
        won = await self._redis.get().set(key, token, nx=True, px=max(1, math.ceil(ttl * 1000)))
        if won:
            self._won[schedule_id] = (key, token)
        return bool(won)

    async def release(self, schedule_id: str, occurrence: str) -> None:
        """Give up a claim this object won (its run could not be sent), so it can be retried."""
        key = self.key(schedule_id, occurrence)
        entry = self._won.get(schedule_id)
        if entry is None or entry[0] != key:
            return
        del self._won[schedule_id]
        client = self._redis.get()
        await client.eval(_RELEASE, 1, key, entry[1])

    async def shutdown(self) -> None:
        """Close this process's connection (it is reopened if the claim is used again)."""
        await self._redis.close()

    def __repr__(self) -> str:
        return f"RedisRunClaim(prefix={self.prefix!r})"


class RedisScheduleSource(ScheduleSource):
    """Schedules in the Redis hash ``prefix``, shared by every scheduler that reads it.

    ``add_schedule`` stores a schedule (replacing one with the same id), ``delete_schedule``
    removes it (one-shot ``time`` schedules are deleted by the scheduler once sent), and
    ``get_schedules`` reads them all at each scheduler tick. A stored entry that cannot be
    read back (not JSON, or not a valid schedule) is logged and skipped. Other keyword
    arguments go to ``redis.asyncio.Redis.from_url``; the connection is opened on first use,
    one per process and event loop.

    ``run_claim()`` returns a :class:`RedisRunClaim` on the same Redis (keys
    ``<prefix>:claims:...``): a ``TaskiqScheduler`` given this source and no ``claim`` uses it,
    so several schedulers on the same source send each run once.
    """

    def __init__(self, url: str, prefix: str = "pool:schedules", **connection_kwargs: Any) -> None:
        self.url = url
        self.prefix = prefix
        self._connection_kwargs = dict(connection_kwargs)
        self._redis = LoopClient(url, client_kwargs(connection_kwargs))
        self._reported: dict[str, bytes | str] = {}  # unreadable entries already logged

    def _client(self) -> aioredis.Redis:
        return self._redis.get()

    def run_claim(self) -> RedisRunClaim:
        """A new claim on the same Redis, for the schedulers that share this source."""
        return RedisRunClaim(self.url, prefix=f"{self.prefix}:claims", **self._connection_kwargs)

    async def shutdown(self) -> None:
        await self._redis.close()

    async def add_schedule(self, schedule: ScheduledTask) -> None:
        if not isinstance(schedule, ScheduledTask):
            raise TypeError(f"expected a ScheduledTask, got {schedule!r}")
        try:
            blob = json.dumps(schedule.to_dict(), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"cannot store the schedule of task {schedule.task_name!r} in Redis: its args, "
                f"kwargs and labels must be JSON values ({exc})"
            ) from exc
        await self._client().hset(self.prefix, schedule.schedule_id, blob)

    async def delete_schedule(self, schedule_id: str) -> None:
        await self._client().hdel(self.prefix, schedule_id)

    async def get_schedules(self) -> list[ScheduledTask]:
        entries: dict[Any, Any] = await self._client().hgetall(self.prefix)
        schedules: list[ScheduledTask] = []
        for raw_id, blob in entries.items():
            schedule_id = _text(raw_id)
            try:
                data = json.loads(blob)
                if not isinstance(data, dict):
                    raise ValueError(f"expected a JSON object, got {type(data).__name__}")
                data["schedule_id"] = schedule_id
                schedules.append(ScheduledTask.from_dict(data))
            except Exception as exc:
                if self._reported.get(schedule_id) != blob:
                    self._reported[schedule_id] = blob
                    logger.error(
                        "skipping unreadable schedule %s in Redis hash %s: %s: %s",
                        schedule_id,
                        self.prefix,
                        type(exc).__name__,
                        exc,
                    )
                continue
            self._reported.pop(schedule_id, None)
        return schedules

    def __repr__(self) -> str:
        return f"RedisScheduleSource(prefix={self.prefix!r})"


__all__ = ["RedisRunClaim", "RedisScheduleSource"]
