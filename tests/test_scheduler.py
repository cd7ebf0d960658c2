"""TaskiqScheduler with a controllable clock: cron, cron_offset, time, interval, sources."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import pytest

from pool import (
    InMemoryBroker,
    LabelScheduleSource,
    ScheduledTask,
    ScheduleSource,
    TaskiqScheduler,
)
from pool.scheduler import (
    CronSpec,
    InMemoryScheduleSource,
    ScheduledTaskCancelledError,
    schedule_by_cron,
    schedule_by_interval,
    schedule_by_time,
)

pytestmark = pytest.mark.timeout(20)

UTC = timezone.utc


def at(hour: int, minute: int, second: int = 0, day: int = 1) -> datetime:
    return datetime(2030, 1, day, hour, minute, second, tzinfo=UTC)


@pytest.fixture
async def app():
    broker = InMemoryBroker()
    calls: list[Any] = []

    @broker.task("record")
    async def record(value: Any = None, **kwargs: Any) -> Any:
        calls.append(value)
        return value

    source = InMemoryScheduleSource()
    scheduler = TaskiqScheduler(broker, [source])
    await scheduler.startup()
    yield SimpleNamespace(
        broker=broker, source=source, scheduler=scheduler, record=record, calls=calls
    )
    await scheduler.shutdown()


async def ticks(scheduler: TaskiqScheduler, times: list[datetime]) -> list[datetime]:
    """The times among ``times`` at which the scheduler sent something."""
    fired = []
    for now in times:
        if await scheduler.tick(now):
            fired.append(now)
    return fired


# ------------------------------------------------------------------ cron
async def test_cron_fires_once_per_due_minute(app) -> None:
    broker, source, scheduler, calls = app.broker, app.source, app.scheduler, app.calls
    await source.add_schedule(ScheduledTask("record", cron="*/5 * * * *", args=["c"]))
    seconds = [at(10, m, s) for m in range(0, 11) for s in (0, 1, 30, 59)]
    fired = await ticks(scheduler, seconds)
    assert fired == [at(10, 0, 0), at(10, 5, 0), at(10, 10, 0)]
    await broker.wait_all()
    assert calls == ["c", "c", "c"]


async def test_cron_first_tick_mid_minute_still_fires(app) -> None:
    source, scheduler = app.source, app.scheduler
    await source.add_schedule(ScheduledTask("record", cron="0 * * * *"))
    assert await ticks(scheduler, [at(10, 0, 42), at(10, 0, 50), at(10, 1, 0)]) == [at(10, 0, 42)]


async def test_cron_missed_runs_are_not_sent_in_a_burst(app) -> None:
    source, scheduler = app.source, app.scheduler
    await source.add_schedule(ScheduledTask("record", cron="* * * * *"))
    assert await ticks(scheduler, [at(10, 0, 1)]) == [at(10, 0, 1)]
    # The loop was blocked for an hour: one late run, not sixty.
    assert len(await scheduler.tick(at(11, 0, 30))) == 1
    assert await scheduler.tick(at(11, 0, 31)) == []
    # A clock that goes back does not send again.
    assert await scheduler.tick(at(10, 30, 0)) == []


async def test_cron_missed_while_down_is_not_sent_on_start(app) -> None:
    source, scheduler = app.source, app.scheduler
    await source.add_schedule(ScheduledTask("record", cron="0 9 * * *"))
    # A scheduler started at 09:01 does not send the 09:00 run.
    assert await ticks(scheduler, [at(9, 1, 0), at(9, 2, 0), at(10, 0, 0)]) == []
    assert await ticks(scheduler, [at(9, 0, 0, day=2)]) == [at(9, 0, 0, day=2)]


async def test_cron_offset_time_zone(app) -> None:
    source, scheduler = app.source, app.scheduler
    # 09:00 in Paris is 08:00 UTC in January.
    await source.add_schedule(
        ScheduledTask("record", cron="0 9 * * *", cron_offset="Europe/Paris", args=["paris"])
    )
    await source.add_schedule(
        ScheduledTask("record", cron="0 9 * * *", cron_offset=timedelta(hours=3), args=["+3"])
    )
    await source.add_schedule(ScheduledTask("record", cron="0 9 * * *", args=["utc"]))
    sent: dict[datetime, list[Any]] = {}
    for hour in range(5, 11):
        for now in (at(hour, 0, 0), at(hour, 0, 30)):
            tasks = await scheduler.tick(now)
            if tasks:
                sent[now] = [t.args[0] for t in tasks]
    assert sent == {at(6, 0): ["+3"], at(8, 0): ["paris"], at(9, 0): ["utc"]}


async def test_cron_offset_follows_daylight_saving(app) -> None:
    source, scheduler = app.source, app.scheduler
    await source.add_schedule(ScheduledTask("record", cron="0 9 * * *", cron_offset="Europe/Paris"))
    july = datetime(2030, 7, 1, 7, 0, 5, tzinfo=UTC)  # 09:00 in Paris in summer
    assert await ticks(scheduler, [july - timedelta(hours=1), july]) == [july]


async def test_invalid_cron_raises_value_error_with_the_expression() -> None:
    with pytest.raises(ValueError, match=r"61 \* \* \* \*"):
        ScheduledTask("record", cron="61 * * * *")
    with pytest.raises(ValueError, match="not a cron"):
        ScheduledTask("record", cron="not a cron")
    with pytest.raises(ValueError):
        ScheduledTask("record", cron="* * * * * *")  # seconds are not supported
    with pytest.raises(ValueError, match="Mars/Olympus"):
        ScheduledTask("record", cron="* * * * *", cron_offset="Mars/Olympus")
    assert ScheduledTask("record", cron="@hourly").cron == "@hourly"


def test_exactly_one_of_cron_time_interval() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        ScheduledTask("record")
    with pytest.raises(ValueError, match="exactly one"):
        ScheduledTask("record", cron="* * * * *", interval=5)
    with pytest.raises(ValueError):
        ScheduledTask("record", interval=0)
    with pytest.raises(ValueError):
        ScheduledTask("record", interval=-1)


def test_scheduled_task_round_trips_through_a_dict() -> None:
    for task in (
        ScheduledTask("a", cron="0 1 * * *", cron_offset=timedelta(hours=-5), args=[1]),
        ScheduledTask("b", time=datetime(2030, 1, 1, 12), kwargs={"x": 1}, labels={"l": 2}),
        ScheduledTask("c", interval=timedelta(minutes=2), task_id="tid"),
    ):
        assert ScheduledTask.from_dict(task.to_dict()) == task
    assert ScheduledTask("c", interval=timedelta(minutes=2)).interval == 120.0


# ------------------------------------------------------------------ time
async def test_time_fires_once_then_is_removed(app) -> None:
    broker, source, scheduler, calls = app.broker, app.source, app.scheduler, app.calls
    when = at(12, 0, 30)
    task = ScheduledTask("record", time=when, args=["once"])
    await source.add_schedule(task)
    assert await scheduler.tick(at(12, 0, 29)) == []
    assert await scheduler.tick(at(12, 0, 30)) == [task]
    assert await source.get_schedules() == []
    assert await scheduler.tick(at(12, 0, 31)) == []
    await broker.wait_all()
    assert calls == ["once"]


async def test_naive_time_is_utc_and_late_one_shots_still_fire(app) -> None:
    source, scheduler = app.source, app.scheduler
    task = ScheduledTask("record", time=datetime(2030, 1, 1, 12, 0))
    assert task.time == at(12, 0)
    await source.add_schedule(task)
    # The scheduler was down at 12:00: the one-shot is sent once when it comes back.
    assert await scheduler.tick(at(15, 0)) == [task]


class ReadOnlySource(ScheduleSource):
    def __init__(self, schedules: list[ScheduledTask]) -> None:
        self.schedules = schedules
        self.sent: list[str] = []

    async def get_schedules(self) -> list[ScheduledTask]:
        return list(self.schedules)

    def post_send(self, task: ScheduledTask) -> None:
        self.sent.append(task.schedule_id)


async def test_time_fires_once_even_if_the_source_cannot_delete() -> None:
    broker = InMemoryBroker()

    @broker.task("record")
    async def record() -> None:
        pass

    task = ScheduledTask("record", time=at(12, 0))
    source = ReadOnlySource([task])
    scheduler = TaskiqScheduler(broker, [source])
    await scheduler.startup()
    for second in range(5):
        await scheduler.tick(at(12, 0, second))
    assert source.sent == [task.schedule_id]
    await scheduler.shutdown()


async def test_schedule_by_time_in_the_past_raises(app) -> None:
    source, record = app.source, app.record
    with pytest.raises(ValueError, match="past"):
        await schedule_by_time(record, source, datetime.now(UTC) - timedelta(seconds=1))
    with pytest.raises(ValueError, match="past"):
        await schedule_by_time(record, source, datetime(2000, 1, 1))  # naive = UTC
    assert await source.get_schedules() == []


# ------------------------------------------------------------------ interval
async def test_interval_fires_every_n_seconds_since_first_seen(app) -> None:
    source, scheduler = app.source, app.scheduler
    await source.add_schedule(ScheduledTask("record", interval=10))
    start = at(12, 0, 3)
    times = [start + timedelta(seconds=s) for s in range(0, 35)]
    fired = await ticks(scheduler, times)
    assert [int((t - start).total_seconds()) for t in fired] == [0, 10, 20, 30]


async def test_interval_does_not_burst_after_a_stall(app) -> None:
    source, scheduler = app.source, app.scheduler
    await source.add_schedule(ScheduledTask("record", interval=timedelta(seconds=5)))
    start = at(12, 0, 0)
    assert len(await scheduler.tick(start)) == 1
    assert len(await scheduler.tick(start + timedelta(seconds=23))) == 1  # 4 periods missed
    assert await scheduler.tick(start + timedelta(seconds=24)) == []
    assert len(await scheduler.tick(start + timedelta(seconds=25))) == 1  # back on the grid


# ------------------------------------------------------------------ registration handles
async def test_schedule_by_cron_and_cancel(app) -> None:
    broker, source, scheduler = app.broker, app.source, app.scheduler
    record, calls = app.record, app.calls
    handle = await schedule_by_cron(record, source, "* * * * *", "hello", extra=1)
    (task,) = await source.get_schedules()
    assert task.schedule_id == handle.schedule_id
    assert task.task_name == "record"
    assert task.args == ["hello"] and task.kwargs == {"extra": 1}
    assert len(await scheduler.tick(at(10, 0))) == 1
    await handle.cancel()
    assert await source.get_schedules() == []
    assert await scheduler.tick(at(10, 1)) == []
    await broker.wait_all()
    assert calls == ["hello"]


async def test_schedule_by_cron_with_cron_spec_and_kicker(app) -> None:
    broker, source, scheduler, record = app.broker, app.source, app.scheduler, app.record
    kicker = record.kicker().with_labels(priority=3).with_task_id("fixed")
    handle = await schedule_by_cron(
        kicker, source, CronSpec(minutes=30, hours=8, offset="Europe/Paris"), "x"
    )
    assert handle.task.cron == "30 8 * * *"
    assert handle.task.cron_offset == "Europe/Paris"
    assert handle.task.labels == {"priority": 3}
    assert handle.task.task_id == "fixed"
    assert await ticks(scheduler, [at(8, 30), at(7, 30, day=2)]) == [at(7, 30, day=2)]
    result = await broker.result_backend.wait_result("fixed", timeout=5)
    assert result.return_value == "x"
    assert result.labels["priority"] == 3


async def test_schedule_by_cron_invalid_expression(app) -> None:
    source, record = app.source, app.record
    with pytest.raises(ValueError, match="every minute"):
        await schedule_by_cron(record, source, "every minute")


async def test_schedule_by_time_and_interval_handles(app) -> None:
    source, record = app.source, app.record
    when = datetime.now(UTC) + timedelta(hours=1)
    once = await schedule_by_time(record, source, when, "later")
    every = await schedule_by_interval(record, source, 30, "often")
    assert {s.schedule_id for s in await source.get_schedules()} == {
        once.schedule_id,
        every.schedule_id,
    }
    await once.unschedule()
    await every.cancel()
    assert await source.get_schedules() == []
    handle = await every.kiq()  # send now, as if not scheduled
    assert (await handle.wait_result(timeout=5)).return_value == "often"


# ------------------------------------------------------------------ sources
async def test_label_schedule_source_reads_labels() -> None:
    broker = InMemoryBroker()

    @broker.task(
        "labelled",
        priority=1,
        schedule=[
            {"cron": "*/2 * * * *", "args": [1], "labels": {"extra": "y"}},
            {"interval": 60, "kwargs": {"k": 2}},
            {"time": "2030-01-01T12:00:00", "schedule_id": "new-year-noon"},
            {"cron": "0 9 * * *", "cron_offset": "Europe/Paris"},
        ],
    )
    async def labelled(*args: Any, **kwargs: Any) -> None:
        pass

    @broker.task("plain")
    async def plain() -> None:
        pass

    source = LabelScheduleSource(broker)
    scheduler = TaskiqScheduler(broker, [source])
    await scheduler.startup()
    schedules = await source.get_schedules()
    assert len(schedules) == 4
    cron, interval, once, paris = schedules
    assert {s.task_name for s in schedules} == {"labelled"}
    assert cron.cron == "*/2 * * * *" and cron.args == [1]
    assert cron.labels == {"priority": 1, "extra": "y"}  # no "schedule" label sent along
    assert interval.interval == 60 and interval.kwargs == {"k": 2}
    assert once.time == at(12, 0) and once.schedule_id == "new-year-noon"
    assert paris.cron_offset == "Europe/Paris"
    # ids are stable between reads, so state is kept between ticks
    assert [s.schedule_id for s in await source.get_schedules()] == [
        s.schedule_id for s in schedules
    ]

    sent = await scheduler.tick(at(12, 0))
    assert {s.schedule_id for s in sent} == {
        cron.schedule_id,
        interval.schedule_id,
        "new-year-noon",
    }
    assert "new-year-noon" not in {s.schedule_id for s in await source.get_schedules()}
    assert await scheduler.tick(at(12, 0, 30)) == []
    assert [s.schedule_id for s in await scheduler.tick(at(12, 1))] == [interval.schedule_id]
    assert [s.schedule_id for s in await scheduler.tick(at(12, 2))] == [
        cron.schedule_id,
        interval.schedule_id,
    ]
    await scheduler.shutdown()


async def test_label_schedule_source_rejects_bad_labels() -> None:
    broker = InMemoryBroker()

    @broker.task("bad", schedule=[{"cron": "nope"}])
    async def bad() -> None:
        pass

    with pytest.raises(ValueError, match="'bad'"):
        await LabelScheduleSource(broker).startup()


class FlakySource(ScheduleSource):
    def __init__(self, task: ScheduledTask) -> None:
        self.task = task
        self.fail_reads = 0
        self.cancel_next = False

    async def get_schedules(self) -> list[ScheduledTask]:
        if self.fail_reads:
            self.fail_reads -= 1
            raise ConnectionError("source down")
        return [self.task]

    async def pre_send(self, task: ScheduledTask) -> None:
        if self.cancel_next:
            self.cancel_next = False
            raise ScheduledTaskCancelledError


async def test_source_errors_and_cancellation_by_pre_send() -> None:
    broker = InMemoryBroker()
    sent: list[int] = []

    @broker.task("count")
    async def count() -> None:
        sent.append(1)

    source = FlakySource(ScheduledTask("count", cron="* * * * *"))
    other = InMemoryScheduleSource([ScheduledTask("count", cron="* * * * *")])
    scheduler = TaskiqScheduler(broker, [source, other])
    await scheduler.startup()
    source.fail_reads = 1
    assert len(await scheduler.tick(at(10, 0))) == 1  # the other source still works
    assert len(await scheduler.tick(at(10, 0, 1))) == 1  # the flaky one is back
    source.cancel_next = True
    assert len(await scheduler.tick(at(10, 1))) == 1  # only the other one was sent
    assert await scheduler.tick(at(10, 1, 30)) == []  # the cancelled run is not retried
    await broker.wait_all()
    assert len(sent) == 3
    await scheduler.shutdown()


async def test_failed_send_is_retried_at_the_next_tick() -> None:
    broker = InMemoryBroker()  # "missing" is not registered: kiq raises
    source = InMemoryScheduleSource([ScheduledTask("missing", cron="* * * * *")])
    scheduler = TaskiqScheduler(broker, [source])
    await scheduler.startup()
    assert await scheduler.tick(at(10, 0)) == []

    @broker.task("missing")
    async def missing() -> None:
        pass

    assert len(await scheduler.tick(at(10, 0, 1))) == 1  # sent late, within the minute
    assert await scheduler.tick(at(10, 0, 2)) == []
    await scheduler.shutdown()


# ------------------------------------------------------------------ run_forever
async def test_run_forever_sends_and_stops() -> None:
    broker = InMemoryBroker()
    got = asyncio.Event()

    @broker.task("ping")
    async def ping() -> None:
        got.set()

    source = InMemoryScheduleSource([ScheduledTask("ping", interval=3600)])
    scheduler = TaskiqScheduler(broker, [source])
    stop = asyncio.Event()
    await scheduler.startup()
    assert broker.is_scheduler_process
    runner = asyncio.create_task(scheduler.run_forever(stop))
    await asyncio.wait_for(got.wait(), 5)  # an interval schedule is sent when first seen
    stop.set()
    await asyncio.wait_for(runner, 5)
    await scheduler.shutdown()


async def test_run_forever_returns_at_once_when_stopped() -> None:
    scheduler = TaskiqScheduler(InMemoryBroker(), [InMemoryScheduleSource()])
    stop = asyncio.Event()
    stop.set()
    await asyncio.wait_for(scheduler.run_forever(stop), 2)
