"""taskiq's SimpleRetryMiddleware and SmartRetryMiddleware on pool's ``InMemoryBroker``.

taskiq's counting: ``max_retries`` (or ``default_retry_count``) is the number of attempts in
all, the first one included; each retry is the same task id and arguments, labelled with
``_retries`` (1, 2, ...). The last attempt's error is the saved result; with
``no_result_on_retry`` (the default) an attempt that was retried saves nothing.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from pool import (
    AsyncTaskiqTask,
    Context,
    InMemoryBroker,
    ScheduledTask,
    ScheduleSource,
    SimpleRetryMiddleware,
    SmartRetryMiddleware,
    TaskiqDepends,
    TaskiqMiddleware,
    TaskiqResult,
    TaskiqScheduler,
)

pytestmark = pytest.mark.timeout(20)


class Flaky(Exception):
    pass


class Fatal(Exception):
    pass


def make_broker(*middlewares: TaskiqMiddleware) -> InMemoryBroker:
    broker = InMemoryBroker()
    broker.add_middlewares(*middlewares)
    return broker


async def result_of(task: AsyncTaskiqTask[Any]) -> TaskiqResult[Any]:
    return await task.wait_result(timeout=5, check_interval=0.01)


# ------------------------------------------------------------------ simple retry
async def test_max_retries_attempts_in_all_then_the_last_error_is_saved() -> None:
    broker = make_broker(SimpleRetryMiddleware())
    runs: list[int] = []

    @broker.task(retry_on_error=True, max_retries=3)
    async def always_fails(n: int) -> None:
        runs.append(n)
        raise Flaky(f"attempt {len(runs)}")

    async with broker:
        result = await result_of(await always_fails.kiq(7))
        await broker.wait_all()
    assert runs == [7, 7, 7]
    assert result.is_err
    assert isinstance(result.error, Flaky)
    assert str(result.error) == "attempt 3"
    assert result.labels["_retries"] == 2


async def test_the_first_success_is_the_result() -> None:
    broker = make_broker(SimpleRetryMiddleware(default_retry_count=5))
    runs: list[int] = []

    @broker.task(retry_on_error=True)
    async def succeeds_on_third() -> str:
        runs.append(1)
        if len(runs) < 3:
            raise Flaky("not yet")
        return "ok"

    async with broker:
        result = await result_of(await succeeds_on_third.kiq())
        await broker.wait_all()
    assert len(runs) == 3
    assert not result.is_err
    assert result.return_value == "ok"


async def test_default_retry_label_retries_tasks_without_the_label() -> None:
    broker = make_broker(SimpleRetryMiddleware(default_retry_count=2, default_retry_label=True))
    runs: list[int] = []

    @broker.task
    def sync_fails() -> None:
        runs.append(1)
        raise Flaky("sync")

    async with broker:
        result = await result_of(await sync_fails.kiq())
        await broker.wait_all()
    assert len(runs) == 2
    assert isinstance(result.error, Flaky)


@pytest.mark.parametrize("max_retries", [0, 1])
async def test_max_retries_of_one_or_less_never_retries(max_retries: int) -> None:
    broker = make_broker(SimpleRetryMiddleware())
    runs: list[int] = []

    @broker.task(retry_on_error=True, max_retries=max_retries)
    async def fails() -> None:
        runs.append(1)
        raise Flaky

    async with broker:
        result = await result_of(await fails.kiq())
        await broker.wait_all()
    assert runs == [1]
    assert isinstance(result.error, Flaky)


@pytest.mark.parametrize("labels", [{}, {"retry_on_error": False}, {"retry_on_error": "false"}])
async def test_no_retry_without_the_label(labels: dict[str, Any]) -> None:
    broker = make_broker(SimpleRetryMiddleware())
    runs: list[int] = []

    @broker.task(**labels)
    async def fails() -> None:
        runs.append(1)
        raise Flaky("once")

    async with broker:
        result = await result_of(await fails.kiq())
        await broker.wait_all()
    assert runs == [1]
    assert isinstance(result.error, Flaky)


async def test_labels_given_as_strings_are_understood() -> None:
    broker = make_broker(SimpleRetryMiddleware())
    runs: list[int] = []

    @broker.task(retry_on_error="True", max_retries="2")
    async def fails() -> None:
        runs.append(1)
        raise Flaky

    async with broker:
        await result_of(await fails.kiq())
        await broker.wait_all()
    assert len(runs) == 2


async def test_without_no_result_on_retry_each_attempt_saves_its_error() -> None:
    broker = make_broker(SimpleRetryMiddleware(no_result_on_retry=False))
    saved: list[int] = []
    all_saved = asyncio.Event()
    original = broker.result_backend.set_result

    async def recording(task_id: str, result: TaskiqResult[Any]) -> None:
        saved.append(result.labels.get("_retries", 0))
        await original(task_id, result)
        if len(saved) == 3:
            all_saved.set()

    broker.result_backend.set_result = recording  # type: ignore[method-assign]

    @broker.task(retry_on_error=True, max_retries=3)
    async def fails() -> None:
        raise Flaky

    async with broker:
        await fails.kiq()
        await asyncio.wait_for(all_saved.wait(), 5)
        await broker.wait_all()
    assert saved == [0, 1, 2]


async def test_a_retry_has_the_same_task_id_and_arguments() -> None:
    broker = make_broker(SimpleRetryMiddleware())
    seen: list[tuple[Any, ...]] = []

    @broker.task(retry_on_error=True, max_retries=2)
    async def fails(a: int, *, b: str, context: Context = TaskiqDepends()) -> None:
        seen.append((context.message.task_id, a, b, context.message.labels.get("_retries")))
        raise Flaky

    async with broker:
        handle = await fails.kicker().with_task_id("fixed-id").kiq(1, b="x")
        await result_of(handle)
        await broker.wait_all()
    assert seen == [("fixed-id", 1, "x", None), ("fixed-id", 1, "x", 1)]


@pytest.mark.parametrize("middleware_class", [SimpleRetryMiddleware, SmartRetryMiddleware])
async def test_types_of_exceptions_limits_what_is_retried(
    middleware_class: type[SimpleRetryMiddleware],
) -> None:
    middleware = middleware_class(default_retry_count=3, types_of_exceptions=[Flaky])
    if isinstance(middleware, SmartRetryMiddleware):
        middleware.default_delay = 0
    broker = make_broker(middleware)
    runs: dict[str, int] = {"flaky": 0, "fatal": 0}

    @broker.task(retry_on_error=True)
    async def flaky() -> None:
        runs["flaky"] += 1
        raise Flaky

    @broker.task(retry_on_error=True)
    async def fatal() -> None:
        runs["fatal"] += 1
        raise Fatal

    async with broker:
        flaky_result = await result_of(await flaky.kiq())
        fatal_result = await result_of(await fatal.kiq())
        await broker.wait_all()
    assert runs == {"flaky": 3, "fatal": 1}
    assert isinstance(flaky_result.error, Flaky)
    assert isinstance(fatal_result.error, Fatal)


async def test_a_tasks_own_types_of_exceptions_win_over_the_middlewares() -> None:
    broker = make_broker(SimpleRetryMiddleware(types_of_exceptions=[Flaky]))
    runs: list[int] = []

    @broker.task(retry_on_error=True, max_retries=2, types_of_exceptions=[Fatal])
    async def fatal() -> None:
        runs.append(1)
        raise Fatal

    async with broker:
        result = await result_of(await fatal.kiq())
        await broker.wait_all()
    assert len(runs) == 2
    assert isinstance(result.error, Fatal)
    assert "types_of_exceptions" not in result.labels  # never sent with the message


async def test_retries_of_concurrent_tasks_do_not_mix() -> None:
    broker = make_broker(SimpleRetryMiddleware())
    counts: dict[int, int] = {}

    @broker.task(retry_on_error=True, max_retries=3)
    async def fails(i: int) -> None:
        counts[i] = counts.get(i, 0) + 1
        await asyncio.sleep(0)  # let the others interleave
        raise Flaky

    async with broker:
        handles = [await fails.kiq(i) for i in range(20)]
        results = [await result_of(h) for h in handles]
        await broker.wait_all()
    assert counts == {i: 3 for i in range(20)}
    assert all(isinstance(r.error, Flaky) for r in results)


# ------------------------------------------------------------------ smart retry
async def test_smart_retry_retries_until_a_success() -> None:
    broker = make_broker(SmartRetryMiddleware(default_delay=0, default_retry_count=3))
    runs: list[int] = []

    @broker.task(retry_on_error=True)
    async def fails_twice() -> int:
        runs.append(1)
        if len(runs) <= 2:
            raise Flaky
        return len(runs)

    async with broker:
        result = await result_of(await fails_twice.kiq())
        await broker.wait_all()
    assert result.return_value == 3


class RecordingSource(ScheduleSource):
    """A schedule source that only keeps what it is given."""

    def __init__(self) -> None:
        self.schedules: list[ScheduledTask] = []

    async def get_schedules(self) -> list[ScheduledTask]:
        return list(self.schedules)

    async def add_schedule(self, schedule: ScheduledTask) -> None:
        self.schedules.append(schedule)


async def test_smart_retry_with_a_schedule_source_schedules_the_retry_after_the_delay() -> None:
    source = RecordingSource()
    broker = make_broker(
        SmartRetryMiddleware(default_delay=30, default_retry_count=2, schedule_source=source)
    )
    runs: list[int] = []

    @broker.task(retry_on_error=True)
    async def fails(x: int) -> None:
        runs.append(x)
        raise Flaky

    async with broker:
        before = datetime.now(timezone.utc)
        handle = await fails.kiq(5)
        await broker.wait_all()
        assert not await handle.is_ready()  # the attempt that will be retried saved nothing
        (scheduled,) = source.schedules
        assert scheduled.task_id == handle.task_id
        assert scheduled.args == [5]
        assert scheduled.labels["_retries"] == "1"
        assert scheduled.time is not None
        assert before + timedelta(seconds=29) < scheduled.time < before + timedelta(seconds=40)

        await TaskiqScheduler(broker, [source]).on_ready(source, scheduled)  # when it is due
        result = await result_of(handle)
        await broker.wait_all()
    assert runs == [5, 5]
    assert isinstance(result.error, Flaky)


def test_smart_retry_checks_the_schedule_source_type() -> None:
    with pytest.raises(TypeError):
        SmartRetryMiddleware(schedule_source=object())  # type: ignore[arg-type]
