"""Run claims: several taskiq schedulers at once, each run sent by one of them.

taskiq's ``TaskiqScheduler`` and its loop (``taskiq scheduler``) decide when a schedule is due
and call ``scheduler.on_ready(source, task)`` to send it; two schedulers on the same
schedules both send every run. pool adds a *run claim* in front of ``on_ready``: before
sending, a scheduler claims the run (``SET NX PX`` in Redis, :class:`pool.redis.RedisRunClaim`),
and only the scheduler whose claim succeeds sends it. Everything else (when a schedule is due,
missed runs, ``pre_send`` / ``post_send``, ``skip_first_run``, ...) is taskiq's.

Use it in either of two ways:

- ``PoolScheduler(broker, sources)``: a ``TaskiqScheduler`` that claims each run, so it works
  under ``taskiq scheduler`` as well as ``python -m pool scheduler``;
- ``with_run_claims(scheduler)`` adds claims to a scheduler already built (what
  ``python -m pool scheduler`` does with a plain ``TaskiqScheduler``).

The claim comes from ``claim=...``, else from the first source offering ``run_claim()``
(:class:`pool.redis.RedisScheduleSource` does); ``claim=False`` (or no claim found) sends every
run unclaimed, as taskiq does.

What a run is (the claim's key):

- the schedule: its ``schedule_id``, except for taskiq's ``LabelScheduleSource``, whose ids are
  random in each process: its schedules are named by their content (task, cron, interval,
  time, args, kwargs), the same in every scheduler running the same code;
- the occurrence (taskiq's precedence: cron, then interval, then time): for ``cron``, the
  minute the run is sent in (UTC), kept a day; for ``interval``, one claim per schedule kept
  ``0.9 * interval``: the scheduler that sent the last run keeps sending, and another takes
  over within about one interval after it stops; for ``time``, the time itself, kept a day.

A claimed run that fails to send is released (when the claim has ``release``) and the error
raised as taskiq raises it. A run whose claim cannot be taken (the claim store is down) is not
sent, and logged: sending it might send it twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

from taskiq import ScheduledTask, ScheduleSource, TaskiqScheduler
from taskiq.schedule_sources import LabelScheduleSource
from taskiq.utils import maybe_awaitable

if TYPE_CHECKING:
    from taskiq import AsyncBroker

logger = logging.getLogger("pool.scheduler")

CLAIM_TTL = 24 * 3600.0
"""Seconds a claim on a ``cron`` or ``time`` run is kept."""

INTERVAL_CLAIM_FACTOR = 0.9
"""An ``interval`` run is claimed for this fraction of the interval."""

OnReady = Callable[[ScheduleSource, ScheduledTask], Awaitable[None]]


@runtime_checkable
class RunClaim(Protocol):
    """Decides which of several schedulers sends a run.

    ``claim`` returns True for exactly one caller per ``(schedule_id, occurrence)`` while the
    claim lasts (``ttl`` seconds). A claim may also have ``release(schedule_id, occurrence)``
    (a claimed run could not be sent: let it be tried again) and ``shutdown()``; either may be
    sync or async.
    """

    async def claim(self, schedule_id: str, occurrence: str, ttl: float) -> bool: ...


class InMemoryRunClaim:
    """Claims kept in this process: for several schedulers in one process, and for tests."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.claims: dict[tuple[str, str], tuple[float, str]] = {}
        self._won: dict[tuple[str, str], str] = {}

    async def claim(self, schedule_id: str, occurrence: str, ttl: float) -> bool:
        _check_ttl(ttl)
        key, now = (schedule_id, occurrence), self.clock()
        held = self.claims.get(key)
        if held is not None and held[0] > now:
            return False
        token = uuid.uuid4().hex
        self.claims[key] = (now + ttl, token)
        self._won[key] = token
        return True

    async def release(self, schedule_id: str, occurrence: str) -> None:
        key = (schedule_id, occurrence)
        token = self._won.pop(key, None)
        held = self.claims.get(key)
        if token is not None and held is not None and held[1] == token:
            del self.claims[key]


class InMemoryScheduleSource(ScheduleSource):
    """Schedules kept in this process's memory (lost when it exits); taskiq has none.

    ``add_schedule`` replaces a schedule with the same id, ``delete_schedule`` of a missing id
    is not an error, and a one-shot ``time`` schedule is deleted once sent (``post_send``).
    """

    def __init__(self, schedules: Iterable[ScheduledTask] = ()) -> None:
        self.schedules: dict[str, ScheduledTask] = {s.schedule_id: s for s in schedules}

    async def get_schedules(self) -> list[ScheduledTask]:
        return list(self.schedules.values())

    async def add_schedule(self, schedule: ScheduledTask) -> None:
        self.schedules[schedule.schedule_id] = schedule

    async def delete_schedule(self, schedule_id: str) -> None:
        self.schedules.pop(schedule_id, None)

    def post_send(self, task: ScheduledTask) -> None:
        if task.time is not None and not task.cron:  # as taskiq's LabelScheduleSource
            self.schedules.pop(task.schedule_id, None)


class RunClaims:
    """Sends a due run through ``on_ready`` only when this scheduler won its claim."""

    def __init__(
        self,
        claim: RunClaim,
        clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        if not callable(getattr(claim, "claim", None)):
            raise TypeError(
                "claim must have an async claim(schedule_id, occurrence, ttl) method, "
                f"got {claim!r}"
            )
        self.claim = claim
        self.clock = clock

    async def send(self, on_ready: OnReady, source: ScheduleSource, task: ScheduledTask) -> bool:
        """Claim the run, then send it with ``on_ready``; True when it was sent here."""
        schedule_id = claim_id(source, task)
        occurrence, ttl = occurrence_of(task, self.clock())
        try:
            won = await self.claim.claim(schedule_id, occurrence, ttl)
        except Exception:
            logger.exception(
                "cannot claim run %s of schedule %s (%s); not sent",
                occurrence, task.schedule_id, task.task_name,
            )  # fmt: skip
            return False
        if not won:
            logger.debug(
                "run %s of schedule %s (%s) was claimed by another scheduler",
                occurrence, task.schedule_id, task.task_name,
            )  # fmt: skip
            return False
        try:
            await on_ready(source, task)
        except BaseException:
            await self.release(schedule_id, occurrence)
            raise
        return True

    async def release(self, schedule_id: str, occurrence: str) -> None:
        release = getattr(self.claim, "release", None)
        if not callable(release):
            return
        try:
            await maybe_awaitable(release(schedule_id, occurrence))
        except Exception:
            logger.exception("cannot release the claim on run %s of %s", occurrence, schedule_id)

    async def shutdown(self) -> None:
        close = getattr(self.claim, "shutdown", None)
        if callable(close):
            try:
                await maybe_awaitable(close())
            except Exception:
                logger.exception("run claim %r failed to shut down", self.claim)


class PoolScheduler(TaskiqScheduler):
    """taskiq's ``TaskiqScheduler`` whose ``on_ready`` sends a run only if it won its claim.

    ``claim``: a :class:`RunClaim`; ``None`` takes the first source's ``run_claim()``;
    ``False`` claims nothing (every run is sent, as taskiq does).
    """

    def __init__(
        self,
        broker: AsyncBroker,
        sources: list[ScheduleSource],
        claim: RunClaim | Literal[False] | None = None,
    ) -> None:
        super().__init__(broker, sources)
        found = resolve_claim(self.sources, claim)
        self.run_claims: RunClaims | None = RunClaims(found) if found is not None else None

    async def on_ready(self, source: ScheduleSource, task: ScheduledTask) -> None:
        if self.run_claims is None:
            await super().on_ready(source, task)
        else:
            await self.run_claims.send(super().on_ready, source, task)

    async def shutdown(self) -> None:
        try:
            await super().shutdown()
        finally:
            if self.run_claims is not None:
                await self.run_claims.shutdown()


def with_run_claims(
    scheduler: TaskiqScheduler, claim: RunClaim | Literal[False] | None = None
) -> TaskiqScheduler:
    """Make ``scheduler`` claim each run before sending it; returns the same object.

    Its own ``on_ready`` (a subclass's too) still does the sending. A :class:`PoolScheduler`,
    or a scheduler without a claim to use, is returned unchanged.
    """
    if getattr(scheduler, "run_claims", None) is not None or isinstance(scheduler, PoolScheduler):
        return scheduler
    found = resolve_claim(scheduler.sources, claim)
    if found is None:
        return scheduler
    claims = RunClaims(found)
    send, stop = scheduler.on_ready, scheduler.shutdown

    async def on_ready(source: ScheduleSource, task: ScheduledTask) -> None:
        await claims.send(send, source, task)

    async def shutdown() -> None:
        try:
            await stop()
        finally:
            await claims.shutdown()

    scheduler.on_ready = on_ready  # type: ignore[method-assign]
    scheduler.shutdown = shutdown  # type: ignore[method-assign]
    scheduler.run_claims = claims  # type: ignore[attr-defined]
    return scheduler


def resolve_claim(
    sources: Iterable[ScheduleSource], claim: RunClaim | Literal[False] | None
) -> RunClaim | None:
    """The claim to use: ``claim`` itself, else the first source's ``run_claim()``."""
    if claim is False:
        return None
    if claim is not None:
        return claim
    for source in sources:
        make = getattr(source, "run_claim", None)
        if callable(make):
            found: RunClaim = make()
            return found
    return None


def claim_id(source: ScheduleSource, task: ScheduledTask) -> str:
    """The name of a schedule that every scheduler agrees on (see the module docstring)."""
    if not isinstance(source, LabelScheduleSource):
        return task.schedule_id
    content = {
        "task_name": task.task_name,
        "cron": task.cron,
        "cron_offset": str(task.cron_offset) if task.cron_offset is not None else None,
        "time": task.time.isoformat() if task.time is not None else None,
        "interval": _seconds(task.interval),
        "args": task.args,
        "kwargs": task.kwargs,
    }
    text = json.dumps(content, sort_keys=True, default=repr)
    return f"label:{task.task_name}:{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def occurrence_of(task: ScheduledTask, now: datetime) -> tuple[str, float]:
    """The occurrence a run sent at ``now`` claims, and how long (seconds) it is kept."""
    if task.cron is not None:
        minute = now.astimezone(timezone.utc).replace(second=0, microsecond=0)
        return minute.isoformat(timespec="minutes"), CLAIM_TTL
    interval = _seconds(task.interval)
    if interval is not None:
        return "interval", INTERVAL_CLAIM_FACTOR * interval
    if task.time is None:
        raise ValueError(f"schedule {task.schedule_id} has no cron, interval or time")
    when = task.time if task.time.tzinfo else task.time.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).isoformat(), CLAIM_TTL


def _seconds(interval: int | timedelta | None) -> float | None:
    if interval is None:
        return None
    return interval.total_seconds() if isinstance(interval, timedelta) else float(interval)


def _check_ttl(ttl: float) -> None:
    if not math.isfinite(ttl) or ttl <= 0:
        raise ValueError(f"a claim needs a positive ttl in seconds, got {ttl!r}")


__all__ = [
    "CLAIM_TTL",
    "INTERVAL_CLAIM_FACTOR",
    "InMemoryRunClaim",
    "InMemoryScheduleSource",
    "PoolScheduler",
    "RunClaim",
    "RunClaims",
    "claim_id",
    "occurrence_of",
    "resolve_claim",
    "with_run_claims",
]
