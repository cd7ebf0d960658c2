"""Sending tasks on a schedule: by cron expression, at a given time, or every N seconds.

A :class:`TaskiqScheduler` asks its :class:`ScheduleSource` objects for their
:class:`ScheduledTask` entries once per second and sends each one that is due through the
broker, exactly as ``kiq`` would. ``python -m pool scheduler MODULE:ATTR`` runs one.

When a schedule is due
----------------------
* ``cron``: a 5-field cron expression (or an alias such as ``@hourly``), evaluated at
  minute granularity in UTC, or in ``cron_offset`` (a time zone name such as
  ``"Europe/Paris"``, or a fixed ``timedelta`` from UTC). A matching minute sends the task
  once, on the first tick inside that minute.
* ``time``: a one-shot. It is sent once, on the first tick at or after ``time`` (a naive
  datetime is taken as UTC), then deleted from its source when the source supports it.
* ``interval``: every ``interval`` seconds. It is sent on the first tick that sees it, then
  on a fixed grid ``first + k * interval`` (no drift).

Missed runs
-----------
Recurring runs (``cron``, ``interval``) that fell due while no scheduler was running are
**not** sent when it starts: a fresh scheduler only considers the current minute (cron) or
starts the interval grid at its first tick. If a running scheduler falls behind (its event
loop was blocked past one or more due times), the schedule is sent **once**, late, never
in a burst. One-shot ``time`` schedules are not lost: one that became due while the
scheduler was down is sent once at the first tick.

Several schedulers at once (high availability)
----------------------------------------------
Give each scheduler the same *run claim* (``TaskiqScheduler(broker, sources,
claim=RedisRunClaim(url))``): before sending a due run, a scheduler claims it, and only the
scheduler whose claim succeeds sends it; the others treat the run as sent. A claim names the
schedule and the occurrence: the due minute for ``cron`` (UTC ISO, the same in every
scheduler) and ``"once"`` for ``time``, both kept a day, and ``"interval"`` for ``interval``,
kept ``0.9 * interval`` seconds (so the scheduler that sent the last run keeps the schedule,
and another takes over within about one interval when it stops). A run whose claim cannot be
taken (the claim store is unreachable) is not sent, and tried again at the next tick.

When no ``claim`` is given and a source offers one (a ``run_claim()`` method, as
:class:`pool.redis.RedisScheduleSource` does), the scheduler uses it; ``claim=False`` turns
claiming off. Without a claim, every scheduler sends every run.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time as _time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Coroutine, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar, Union
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from pool.exceptions import TaskiqError
from pool.kicker import AsyncKicker
from pool.utils import maybe_awaitable

if TYPE_CHECKING:
    from pool.broker import AsyncBroker
    from pool.task import AsyncTaskiqTask

logger = logging.getLogger("pool.scheduler")

_ReturnType = TypeVar("_ReturnType")

CRON_ALIASES = frozenset(
    {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
)


class ScheduledTaskCancelledError(TaskiqError):
    """Raised by a source's ``pre_send`` to skip one sending of a scheduled task."""


# --------------------------------------------------------------------------- helpers
def _as_utc(value: datetime) -> datetime:
    """An aware datetime; a naive one is taken as UTC."""
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def _validate_cron(expression: str) -> str:
    if not isinstance(expression, str):
        raise ValueError(f"cron must be a string, got {expression!r}")
    text = " ".join(expression.split())
    if text.startswith("@"):
        valid = text.lower() in CRON_ALIASES
    else:
        valid = len(text.split(" ")) == 5 and croniter.is_valid(text)
    if not valid:
        raise ValueError(
            f"invalid cron expression {expression!r}: expected 5 fields "
            "(minute hour day-of-month month day-of-week) or an alias such as '@hourly'"
        )
    return text


def _tz_of(offset: str | timedelta | None) -> tzinfo:
    if offset is None:
        return timezone.utc
    if isinstance(offset, timedelta):
        return timezone(offset)
    try:
        return ZoneInfo(offset)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {offset!r} in cron_offset") from exc


def _seconds(interval: float | timedelta) -> float:
    value = interval.total_seconds() if isinstance(interval, timedelta) else float(interval)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"interval must be a positive number of seconds, got {interval!r}")
    return value


def _floor_minute(value: datetime) -> datetime:
    return value.replace(second=0, microsecond=0)


# --------------------------------------------------------------------------- schedules
@dataclass
class ScheduledTask:
    """One schedule: which task to send, with what, and when.

    Exactly one of ``cron``, ``time`` and ``interval`` must be given.

    :param cron: a 5-field cron expression (minute granularity) or an alias like ``@daily``.
    :param cron_offset: the time zone the cron expression is read in: a zone name
        (``"Europe/Paris"``) or a fixed offset from UTC (``timedelta(hours=3)``).
        ``None`` means UTC.
    :param time: when to send the task once; a naive datetime is taken as UTC.
    :param interval: send every this many seconds (a number or a ``timedelta``; stored as
        float seconds).
    :param task_id: send every run under this task id (default: a new id each run).
    """

    task_name: str
    labels: dict[str, Any] = field(default_factory=dict)
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    schedule_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    cron: str | None = None
    cron_offset: str | timedelta | None = None
    time: datetime | None = None
    interval: float | None = None
    task_id: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("cron", "time", "interval") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(
                "a ScheduledTask needs exactly one of cron, time and interval"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.cron is not None:
            self.cron = _validate_cron(self.cron)
        if self.cron_offset is not None:
            if not isinstance(self.cron_offset, (str, timedelta)):
                raise ValueError(
                    f"cron_offset must be a time zone name or a timedelta, got {self.cron_offset!r}"
                )
            _tz_of(self.cron_offset)
        if self.time is not None:
            if isinstance(self.time, str):
                self.time = datetime.fromisoformat(self.time)
            if not isinstance(self.time, datetime):
                raise ValueError(f"time must be a datetime, got {self.time!r}")
            self.time = _as_utc(self.time)
        if self.interval is not None:
            self.interval = _seconds(self.interval)
        self.labels = dict(self.labels or {})
        self.args = list(self.args or [])
        self.kwargs = dict(self.kwargs or {})

    @property
    def timezone(self) -> tzinfo:
        """The time zone the cron expression is evaluated in."""
        return _tz_of(self.cron_offset)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly form (for sources that store schedules)."""
        offset: Any = self.cron_offset
        if isinstance(offset, timedelta):
            offset = {"seconds": offset.total_seconds()}
        return {
            "task_name": self.task_name,
            "labels": self.labels,
            "args": self.args,
            "kwargs": self.kwargs,
            "schedule_id": self.schedule_id,
            "cron": self.cron,
            "cron_offset": offset,
            "time": self.time.isoformat() if self.time is not None else None,
            "interval": self.interval,
            "task_id": self.task_id,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ScheduledTask:
        offset = data.get("cron_offset")
        if isinstance(offset, dict):
            offset = timedelta(seconds=float(offset["seconds"]))
        when = data.get("time")
        values: dict[str, Any] = {
            "task_name": data["task_name"],
            "labels": dict(data.get("labels") or {}),
            "args": list(data.get("args") or []),
            "kwargs": dict(data.get("kwargs") or {}),
            "cron": data.get("cron"),
            "cron_offset": offset,
            "time": datetime.fromisoformat(when) if isinstance(when, str) else when,
            "interval": data.get("interval"),
            "task_id": data.get("task_id"),
        }
        if data.get("schedule_id"):
            values["schedule_id"] = str(data["schedule_id"])
        return cls(**values)


@dataclass
class CronSpec:
    """A cron expression built from its fields, with an optional time zone."""

    minutes: str | int | None = "*"
    hours: str | int | None = "*"
    days: str | int | None = "*"
    months: str | int | None = "*"
    weekdays: str | int | None = "*"
    offset: str | timedelta | None = None

    def to_cron(self) -> str:
        parts = (self.minutes, self.hours, self.days, self.months, self.weekdays)
        return " ".join("*" if part is None else str(part) for part in parts)


# --------------------------------------------------------------------------- sources
class ScheduleSource(ABC):
    """Where schedules come from. Only ``get_schedules`` is required.

    ``add_schedule`` and ``delete_schedule`` are optional: the defaults raise
    ``NotImplementedError``. ``pre_send`` (which may raise
    :class:`ScheduledTaskCancelledError` to skip a run) and ``post_send`` are called around
    each sending and may be sync or async.

    A source shared by several schedulers may also offer ``run_claim()``, returning a
    :class:`RunClaim` that a ``TaskiqScheduler`` created without ``claim`` uses.
    """

    async def startup(self) -> None:
        """Called by ``TaskiqScheduler.startup()``."""
        return None

    async def shutdown(self) -> None:
        """Called by ``TaskiqScheduler.shutdown()``."""
        return None

    @abstractmethod
    async def get_schedules(self) -> list[ScheduledTask]:
        """Every schedule this source currently holds."""

    async def add_schedule(self, schedule: ScheduledTask) -> None:
        """Store a new schedule (optional)."""
        raise NotImplementedError(f"{type(self).__name__} cannot add schedules")

    async def delete_schedule(self, schedule_id: str) -> None:
        """Remove a schedule (optional); a missing id is not an error."""
        raise NotImplementedError(f"{type(self).__name__} cannot delete schedules")

    def pre_send(self, task: ScheduledTask) -> Coroutine[Any, Any, None] | None:
        """Before a scheduled task is sent."""
        return None

    def post_send(self, task: ScheduledTask) -> Coroutine[Any, Any, None] | None:
        """After a scheduled task was sent."""
        return None


class InMemoryScheduleSource(ScheduleSource):
    """Schedules kept in this process's memory (lost when it exits)."""

    def __init__(self, schedules: Iterable[ScheduledTask] = ()) -> None:
        self.schedules: dict[str, ScheduledTask] = {s.schedule_id: s for s in schedules}

    async def get_schedules(self) -> list[ScheduledTask]:
        return list(self.schedules.values())

    async def add_schedule(self, schedule: ScheduledTask) -> None:
        self.schedules[schedule.schedule_id] = schedule

    async def delete_schedule(self, schedule_id: str) -> None:
        self.schedules.pop(schedule_id, None)


class LabelScheduleSource(ScheduleSource):
    """Schedules declared on the tasks themselves, in their ``schedule`` label.

    ``@broker.task(schedule=[{"cron": "*/5 * * * *", "args": [1]}])``: each entry is a
    dict with one of ``cron``, ``time`` or ``interval``, and optionally ``cron_offset``,
    ``args``, ``kwargs``, ``labels`` (added to the task's own labels) and ``schedule_id``.
    Tasks registered after startup are picked up at the next read. A one-shot ``time``
    entry is removed (for this process) once it was sent.
    """

    def __init__(self, broker: AsyncBroker) -> None:
        self.broker = broker
        self._deleted: set[str] = set()

    async def startup(self) -> None:
        self._scan()  # an invalid schedule label fails the start, where it is visible

    async def get_schedules(self) -> list[ScheduledTask]:
        return [s for s in self._scan() if s.schedule_id not in self._deleted]

    async def delete_schedule(self, schedule_id: str) -> None:
        self._deleted.add(schedule_id)

    def _scan(self) -> list[ScheduledTask]:
        found: list[ScheduledTask] = []
        for task_name, task in self.broker.get_all_tasks().items():
            entries = task.labels.get("schedule")
            if not entries:
                continue
            if isinstance(entries, dict):
                entries = [entries]
            if not isinstance(entries, (list, tuple)):
                raise ValueError(
                    f"the schedule label of task {task_name!r} must be a list of dicts, "
                    f"got {entries!r}"
                )
            base_labels = {k: v for k, v in task.labels.items() if k != "schedule"}
            for index, entry in enumerate(entries):
                if not isinstance(entry, dict):
                    raise ValueError(
                        f"schedule #{index} of task {task_name!r} must be a dict, got {entry!r}"
                    )
                try:
                    found.append(
                        ScheduledTask(
                            task_name=task_name,
                            labels={**base_labels, **(entry.get("labels") or {})},
                            args=list(entry.get("args") or []),
                            kwargs=dict(entry.get("kwargs") or {}),
                            schedule_id=str(
                                entry.get("schedule_id") or f"label:{task_name}:{index}"
                            ),
                            cron=entry.get("cron"),
                            cron_offset=entry.get("cron_offset"),
                            time=entry.get("time"),
                            interval=entry.get("interval"),
                            task_id=entry.get("task_id"),
                        )
                    )
                except ValueError as exc:
                    raise ValueError(f"schedule #{index} of task {task_name!r}: {exc}") from exc
        return found


# --------------------------------------------------------------------------- run claims
CLAIM_TTL = 24 * 3600.0
"""Seconds a scheduler asks a claim on a ``cron`` or ``time`` run to be kept."""

INTERVAL_CLAIM_FACTOR = 0.9
"""An ``interval`` run is claimed for this fraction of the interval."""


class RunClaim(Protocol):
    """Decides which of several schedulers sends a run (see the module docstring).

    ``claim`` returns True for exactly one caller per ``(schedule_id, occurrence)`` while
    the claim lasts (``ttl`` seconds). Optionally, a claim object may also have
    ``release(schedule_id, occurrence)``, called when the claimed run could not be sent so
    that it can be tried again, and ``shutdown()``, called by ``TaskiqScheduler.shutdown()``
    (either may be sync or async).
    """

    async def claim(self, schedule_id: str, occurrence: str, ttl: float) -> bool: ...


# --------------------------------------------------------------------------- scheduler
_SENT, _CANCELLED, _FAILED, _ELSEWHERE = "sent", "cancelled", "failed", "elsewhere"


@dataclass
class _State:
    last_minute: datetime | None = None  # cron: the last minute already considered
    due_minute: datetime | None = None  # cron: the matching minute found due (UTC)
    next_due: datetime | None = None  # interval: when it is due next
    fired: bool = False  # time: already sent


class TaskiqScheduler:
    """Sends the schedules of ``sources`` through ``broker`` when they are due.

    ``await startup()``, then ``await run_forever(stop)`` (one tick per second until
    ``stop`` is set), then ``await shutdown()``. ``tick(now)`` does one round at the given
    time, which makes the timing testable without waiting.

    Missed runs: recurring schedules (cron, interval) due while no scheduler was running are
    not sent on start; a running scheduler that fell behind sends each due schedule once,
    late, never a burst of the runs it missed. One-shot ``time`` schedules that became due
    while the scheduler was down are sent once at the first tick.

    ``claim`` (a :class:`RunClaim`, such as :class:`pool.redis.RedisRunClaim`) lets several
    schedulers run at once and still send each run once: each due run is claimed just before
    it is sent (before the source's ``pre_send``), and a run claimed by another scheduler is
    not sent here (logged at debug level) but counted as done; a claimed run that could not
    be sent is released (when the claim has ``release``) and retried. When ``claim`` is None,
    the first source with a ``run_claim()`` method provides it; ``claim=False`` sends every
    run without claiming, as a lone scheduler does.
    """

    def __init__(
        self,
        broker: AsyncBroker,
        sources: list[ScheduleSource],
        claim: RunClaim | Literal[False] | None = None,
    ) -> None:
        self.broker = broker
        self.sources = list(sources)
        self._states: dict[tuple[int, str], _State] = {}
        resolved: RunClaim | None = None
        if claim is None:
            for source in self.sources:
                make = getattr(source, "run_claim", None)
                if callable(make):
                    resolved = make()
                    break
        elif claim is not False:
            resolved = claim
        if resolved is not None and not callable(getattr(resolved, "claim", None)):
            raise TypeError(
                "claim must have an async claim(schedule_id, occurrence, ttl) method, "
                f"got {resolved!r}"
            )
        self.claim: RunClaim | None = resolved

    async def startup(self) -> None:
        """Start the broker (as a scheduler process), then each source."""
        self.broker.is_scheduler_process = True
        await self.broker.startup()
        for source in self.sources:
            await source.startup()

    async def shutdown(self) -> None:
        """Stop each source and the claim (failures are logged), then the broker."""
        for source in self.sources:
            try:
                await source.shutdown()
            except Exception:
                logger.exception("schedule source %r failed to shut down", source)
        close = getattr(self.claim, "shutdown", None)
        if callable(close):
            try:
                await maybe_awaitable(close())
            except Exception:
                logger.exception("run claim %r failed to shut down", self.claim)
        await self.broker.shutdown()

    async def on_ready(self, source: ScheduleSource, task: ScheduledTask) -> None:
        """Send one due task (override to change how it is sent)."""
        kicker: AsyncKicker[Any] = AsyncKicker(task.task_name, self.broker, dict(task.labels))
        if task.task_id:
            kicker.with_task_id(task.task_id)
        await kicker.kiq(*task.args, **task.kwargs)

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Tick once per second (at the start of each second) until ``stop`` is set."""
        logger.info("scheduler started with %d source(s)", len(self.sources))
        while not stop.is_set():
            try:
                await self.tick(datetime.now(timezone.utc))
            except Exception:
                logger.exception("scheduler tick failed")
            delay = 1.0 - (_time.time() % 1.0) + 0.001
            try:
                await asyncio.wait_for(stop.wait(), timeout=delay)
            except asyncio.TimeoutError:
                pass
        logger.info("scheduler stopped")

    async def tick(self, now: datetime) -> list[ScheduledTask]:
        """Send every schedule due at ``now`` (a naive datetime is UTC); returns those sent.

        A schedule whose sending failed is logged and tried again at the next tick. With a
        ``claim``, a run another scheduler claimed is counted as done but not returned.
        """
        now = _as_utc(now).astimezone(timezone.utc)
        sent: list[ScheduledTask] = []
        for index, source in enumerate(self.sources):
            try:
                schedules = await source.get_schedules()
            except Exception:
                logger.exception("cannot read schedules from %r", source)
                continue
            seen: set[tuple[int, str]] = set()
            for task in schedules:
                key = (index, task.schedule_id)
                seen.add(key)
                state = self._states.setdefault(key, _State())
                try:
                    due = self._is_due(task, state, now)
                except Exception:
                    logger.exception("cannot evaluate schedule %s", task.schedule_id)
                    continue
                if not due:
                    continue
                outcome = await self._send(source, task, state)
                if outcome == _FAILED:
                    continue  # tried again at the next tick
                if outcome == _SENT:
                    sent.append(task)
                # sent, cancelled by the source, or sent by another scheduler
                self._advance(task, state, now)
                if task.time is not None and outcome != _ELSEWHERE:
                    # the scheduler that sent it deletes it: if its sending fails, it
                    # releases the claim and tries again, so the schedule must stay
                    await self._delete_fired(source, task)
            for key in [k for k in self._states if k[0] == index and k not in seen]:
                del self._states[key]
        return sent

    # ------------------------------------------------------------ internals
    @staticmethod
    def _is_due(task: ScheduledTask, state: _State, now: datetime) -> bool:
        if task.time is not None:
            return not state.fired and now >= task.time
        if task.interval is not None:
            return state.next_due is None or now >= state.next_due
        assert task.cron is not None
        minute = _floor_minute(now)  # UTC; zone offsets are whole minutes
        if state.last_minute is None:
            state.last_minute = minute - timedelta(minutes=1)
        if minute <= state.last_minute:
            return False  # this minute was already considered (or the clock went back)
        # The latest matching minute up to now (read in the schedule's time zone); sent
        # once if it is newer than the last minute considered, so a scheduler that fell
        # behind sends one late run, not a burst.
        start = (minute + timedelta(minutes=1)).astimezone(task.timezone)
        latest = croniter(task.cron, start).get_prev(datetime).astimezone(timezone.utc)
        if latest > state.last_minute:
            state.due_minute = latest
            return True
        state.last_minute = minute
        return False

    @staticmethod
    def _advance(task: ScheduledTask, state: _State, now: datetime) -> None:
        if task.time is not None:
            state.fired = True
        elif task.interval is not None:
            step = timedelta(seconds=task.interval)
            if state.next_due is None:
                state.next_due = now + step
            else:
                missed = (now - state.next_due) // step  # whole periods skipped, sent once
                state.next_due += step * (missed + 1)
        else:
            state.last_minute = _floor_minute(now)

    @staticmethod
    def _occurrence(task: ScheduledTask, state: _State) -> tuple[str, float]:
        """The claim of a due run: its occurrence key and how long the claim is kept."""
        if task.time is not None:
            return "once", CLAIM_TTL
        if task.interval is not None:
            return "interval", INTERVAL_CLAIM_FACTOR * task.interval
        assert state.due_minute is not None
        return state.due_minute.astimezone(timezone.utc).isoformat(timespec="minutes"), CLAIM_TTL

    async def _release(self, task: ScheduledTask, occurrence: str) -> None:
        release = getattr(self.claim, "release", None)
        if not callable(release):
            return
        try:
            await maybe_awaitable(release(task.schedule_id, occurrence))
        except Exception:
            logger.exception(
                "cannot release the claim on run %s of schedule %s", occurrence, task.schedule_id
            )

    async def _send(self, source: ScheduleSource, task: ScheduledTask, state: _State) -> str:
        occurrence: str | None = None
        if self.claim is not None:
            occurrence, ttl = self._occurrence(task, state)
            try:
                won = await self.claim.claim(task.schedule_id, occurrence, ttl)
            except Exception:
                logger.exception(
                    "cannot claim run %s of schedule %s; will retry", occurrence, task.schedule_id
                )
                return _FAILED
            if not won:
                logger.debug(
                    "run %s of schedule %s (%s) was claimed by another scheduler",
                    occurrence,
                    task.schedule_id,
                    task.task_name,
                )
                return _ELSEWHERE
        try:
            await maybe_awaitable(source.pre_send(task))
        except ScheduledTaskCancelledError:
            logger.info(
                "run of schedule %s (%s) cancelled by its source", task.schedule_id, task.task_name
            )
            return _CANCELLED
        except Exception:
            logger.exception("pre_send of schedule %s failed", task.schedule_id)
            if occurrence is not None:
                await self._release(task, occurrence)
            return _FAILED
        try:
            await self.on_ready(source, task)
        except Exception:
            logger.exception(
                "cannot send scheduled task %s (schedule %s); will retry",
                task.task_name,
                task.schedule_id,
            )
            if occurrence is not None:
                await self._release(task, occurrence)
            return _FAILED
        logger.info("sent scheduled task %s (schedule %s)", task.task_name, task.schedule_id)
        try:
            await maybe_awaitable(source.post_send(task))
        except Exception:
            logger.exception("post_send of schedule %s failed", task.schedule_id)
        return _SENT

    @staticmethod
    async def _delete_fired(source: ScheduleSource, task: ScheduledTask) -> None:
        try:
            await source.delete_schedule(task.schedule_id)
        except NotImplementedError:
            pass  # the scheduler remembers it was sent
        except Exception:
            logger.exception("cannot delete one-shot schedule %s", task.schedule_id)


# --------------------------------------------------------------------------- registration
class CreatedSchedule(Generic[_ReturnType]):
    """A schedule that was added to a source: ``await cancel()`` removes it."""

    def __init__(
        self, kicker: AsyncKicker[_ReturnType], source: ScheduleSource, task: ScheduledTask
    ) -> None:
        self.kicker = kicker
        self.source = source
        self.task = task
        self.schedule_id = task.schedule_id

    async def cancel(self) -> None:
        """Remove the schedule from its source (no more runs are sent)."""
        await self.source.delete_schedule(self.schedule_id)

    async def unschedule(self) -> None:
        """taskiq's name for :meth:`cancel`."""
        await self.cancel()

    async def kiq(self) -> AsyncTaskiqTask[_ReturnType]:
        """Send the task now, with the scheduled arguments, as if it were not scheduled."""
        return await self.kicker.kiq(*self.task.args, **self.task.kwargs)

    def __repr__(self) -> str:
        when = (
            f"cron={self.task.cron!r}"
            if self.task.cron
            else f"time={self.task.time}"
            if self.task.time
            else f"interval={self.task.interval}"
        )
        return f"CreatedSchedule(id={self.schedule_id!r}, task={self.task.task_name!r}, {when})"


KickerLike = Union[AsyncKicker[Any], Any]  # noqa: UP007  (an AsyncKicker or a decorated task)


def _kicker_of(kicker_or_task: KickerLike) -> AsyncKicker[Any]:
    if isinstance(kicker_or_task, AsyncKicker):
        return kicker_or_task
    make = getattr(kicker_or_task, "kicker", None)
    if callable(make):
        kicker = make()
        if isinstance(kicker, AsyncKicker):
            return kicker
    raise TypeError(f"expected a task or an AsyncKicker, got {kicker_or_task!r}")


async def _register(
    kicker: AsyncKicker[Any], source: ScheduleSource, **when: Any
) -> CreatedSchedule[Any]:
    schedule = ScheduledTask(
        task_name=kicker.task_name,
        labels=dict(kicker.labels),
        task_id=kicker.custom_task_id,
        **when,
    )
    await source.add_schedule(schedule)
    return CreatedSchedule(kicker, source, schedule)


async def schedule_by_cron(
    kicker_or_task: KickerLike,
    source: ScheduleSource,
    cron: str | CronSpec,
    *args: Any,
    **kwargs: Any,
) -> CreatedSchedule[Any]:
    """Add a cron schedule of this task to ``source``; ``ValueError`` for a bad expression.

    ``cron`` is a 5-field expression (UTC) or a :class:`CronSpec` (whose ``offset`` gives
    the time zone).
    """
    kicker = _kicker_of(kicker_or_task)
    offset = None
    if isinstance(cron, CronSpec):
        offset = cron.offset
        cron = cron.to_cron()
    return await _register(kicker, source, cron=cron, cron_offset=offset, args=args, kwargs=kwargs)


async def schedule_by_time(
    kicker_or_task: KickerLike,
    source: ScheduleSource,
    time: datetime,
    *args: Any,
    **kwargs: Any,
) -> CreatedSchedule[Any]:
    """Add a one-shot schedule at ``time`` (naive = UTC); ``ValueError`` if it is past."""
    kicker = _kicker_of(kicker_or_task)
    if not isinstance(time, datetime):
        raise ValueError(f"time must be a datetime, got {time!r}")
    when = _as_utc(time)
    if when <= datetime.now(timezone.utc):
        raise ValueError(f"cannot schedule task {kicker.task_name!r} in the past ({when})")
    return await _register(kicker, source, time=when, args=args, kwargs=kwargs)


async def schedule_by_interval(
    kicker_or_task: KickerLike,
    source: ScheduleSource,
    interval: float | timedelta,
    *args: Any,
    **kwargs: Any,
) -> CreatedSchedule[Any]:
    """Add a schedule that sends the task every ``interval`` seconds (or timedelta)."""
    kicker = _kicker_of(kicker_or_task)
    return await _register(kicker, source, interval=_seconds(interval), args=args, kwargs=kwargs)


__all__ = [
    "CLAIM_TTL",
    "CreatedSchedule",
    "CronSpec",
    "InMemoryScheduleSource",
    "LabelScheduleSource",
    "RunClaim",
    "ScheduleSource",
    "ScheduledTask",
    "ScheduledTaskCancelledError",
    "TaskiqScheduler",
    "schedule_by_cron",
    "schedule_by_interval",
    "schedule_by_time",
]
