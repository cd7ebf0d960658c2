"""SimpleRetryMiddleware and SmartRetryMiddleware on the InMemoryBroker."""

from __future__ import annotations

import asyncio
import random
from datetime import datetime, timedelta, timezone

import pytest

from pool import (
    Context,
    InMemoryBroker,
    NoResultError,
    SimpleRetryMiddleware,
    SmartRetryMiddleware,
    TaskiqDepends,
)
from pool.scheduler import InMemoryScheduleSource, TaskiqScheduler

pytestmark = pytest.mark.timeout(20)


class Flaky(Exception):
    pass


class Fatal(Exception):
    pass


def make_broker(*middlewares):
    broker = InMemoryBroker()
    broker.add_middlewares(*middlewares)
    return broker


async def test_simple_retry_runs_max_retries_plus_one_then_saves_the_error() -> None:
    broker = make_broker(SimpleRetryMiddleware())
    runs: list[int] = []

    @broker.task(retry_on_error=True, max_retries=2)
    async def always_fails(n: int) -> None:
        runs.append(n)
        raise Flaky(f"attempt {len(runs)}")

    await broker.startup()
    handle = await always_fails.kiq(7)
    result = await handle.wait_result(timeout=5)
    await broker.wait_all()
    assert runs == [7, 7, 7]  # the first attempt and 2 retries
    assert result.is_err
    assert isinstance(result.error, Flaky)
    assert str(result.error) == "attempt 3"
    assert result.labels["_retries"] == 2
    await broker.shutdown()


async def test_simple_retry_returns_the_first_success() -> None:
    broker = make_broker(SimpleRetryMiddleware(default_retry_count=5))
    runs: list[int] = []

    @broker.task(retry_on_error=True)
    async def succeeds_on_third() -> str:
        runs.append(1)
        if len(runs) < 3:
            raise Flaky("not yet")
        return "ok"

    await broker.startup()
    result = await (await succeeds_on_third.kiq()).wait_result(timeout=5)
    await broker.wait_all()
    assert len(runs) == 3
    assert not result.is_err
    assert result.return_value == "ok"
    await broker.shutdown()


async def test_default_retry_count_counts_retries_after_the_first_attempt() -> None:
    broker = make_broker(SimpleRetryMiddleware(default_retry_count=1, default_retry_label=True))
    runs: list[int] = []

    @broker.task
    def sync_fails() -> None:
        runs.append(1)
        raise Flaky("sync")

    await broker.startup()
    result = await (await sync_fails.kiq()).wait_result(timeout=5)
    await broker.wait_all()
    assert len(runs) == 2
    assert isinstance(result.error, Flaky)
    await broker.shutdown()


async def test_max_retries_zero_never_retries() -> None:
    broker = make_broker(SimpleRetryMiddleware())
    runs: list[int] = []

    @broker.task(retry_on_error=True, max_retries=0)
    async def fails() -> None:
        runs.append(1)
        raise Flaky

    await broker.startup()
    result = await (await fails.kiq()).wait_result(timeout=5)
    await broker.wait_all()
    assert runs == [1]
    assert isinstance(result.error, Flaky)
    await broker.shutdown()


@pytest.mark.parametrize("labels", [{}, {"retry_on_error": False}, {"retry_on_error": "false"}])
async def test_no_retry_without_the_label(labels: dict) -> None:
    broker = make_broker(SimpleRetryMiddleware())
    runs: list[int] = []

    @broker.task(**labels)
    async def fails() -> None:
        runs.append(1)
        raise Flaky("once")

    await broker.startup()
    result = await (await fails.kiq()).wait_result(timeout=5)
    await broker.wait_all()
    assert runs == [1]
    assert isinstance(result.error, Flaky)
    await broker.shutdown()


async def test_string_labels_are_understood() -> None:
    broker = make_broker(SimpleRetryMiddleware())
    runs: list[int] = []

    @broker.task(retry_on_error="True", max_retries="1")
    async def fails() -> None:
        runs.append(1)
        raise Flaky

    await broker.startup()
    await (await fails.kiq()).wait_result(timeout=5)
    await broker.wait_all()
    assert len(runs) == 2
    await broker.shutdown()


async def test_without_no_result_on_retry_each_attempt_saves_its_error() -> None:
    broker = make_broker(SimpleRetryMiddleware(no_result_on_retry=False))
    saved: list[int] = []
    original = broker.result_backend.set_result

    async def recording(task_id, result):
        saved.append(result.labels.get("_retries", 0))
        await original(task_id, result)

    broker.result_backend.set_result = recording  # type: ignore[method-assign]

    @broker.task(retry_on_error=True, max_retries=2)
    async def fails() -> None:
        raise Flaky

    await broker.startup()
    await fails.kiq()
    await broker.wait_all()
    assert sorted(saved) == [0, 1, 2]
    await broker.shutdown()


async def test_retry_uses_the_same_task_id_and_arguments() -> None:
    broker = make_broker(SimpleRetryMiddleware())
    seen: list[tuple] = []

    @broker.task(retry_on_error=True, max_retries=1)
    async def fails(a: int, *, b: str, context: Context = TaskiqDepends()) -> None:
        seen.append((context.message.task_id, a, b))
        raise Flaky

    await broker.startup()
    handle = await fails.kicker().with_task_id("fixed-id").kiq(1, b="x")
    await handle.wait_result(timeout=5)
    await broker.wait_all()
    assert seen == [("fixed-id", 1, "x"), ("fixed-id", 1, "x")]
    await broker.shutdown()


# ------------------------------------------------------------------ smart retry
def test_make_delay_is_the_base_delay_without_options() -> None:
    middleware = SmartRetryMiddleware(default_delay=3)
    assert middleware.make_delay(0) == 3
    assert middleware.make_delay(5) == 3
    assert middleware.make_delay(2, delay=0.5) == 0.5


def test_make_delay_exponent_and_cap() -> None:
    middleware = SmartRetryMiddleware(
        default_delay=2, use_delay_exponent=True, max_delay_exponent=30
    )
    assert [middleware.make_delay(n) for n in range(6)] == [2, 4, 8, 16, 30, 30]
    assert middleware.make_delay(1000) == 30  # no overflow


def test_make_delay_jitter_bounds() -> None:
    random.seed(1234)
    plain = SmartRetryMiddleware(default_delay=1, use_jitter=True)
    values = [plain.make_delay(0) for _ in range(200)]
    assert all(1 <= v < 2 for v in values)
    assert len(set(values)) > 100  # really random

    capped = SmartRetryMiddleware(
        default_delay=1, use_jitter=True, use_delay_exponent=True, max_delay_exponent=5
    )
    values = [capped.make_delay(10) for _ in range(200)]
    assert all(5 <= v < 6 for v in values)


async def test_smart_retry_end_to_end_with_zero_delay() -> None:
    middleware = SmartRetryMiddleware(default_delay=0, default_retry_count=2)
    broker = make_broker(middleware)
    runs: list[int] = []

    @broker.task(retry_on_error=True)
    async def fails_twice() -> int:
        runs.append(1)
        if len(runs) <= 2:
            raise Flaky
        return len(runs)

    await broker.startup()
    result = await (await fails_twice.kiq()).wait_result(timeout=5)
    await broker.wait_all()
    assert result.return_value == 3
    assert middleware.pending_retries == 0
    await broker.shutdown()


async def test_smart_retry_delay_label_zero_and_exhaustion() -> None:
    broker = make_broker(SmartRetryMiddleware(default_delay=60))
    runs: list[int] = []

    @broker.task(retry_on_error=True, max_retries=3, delay=0)
    async def fails() -> None:
        runs.append(1)
        raise Flaky

    await broker.startup()
    result = await (await fails.kiq()).wait_result(timeout=5)
    await broker.wait_all()
    assert len(runs) == 4
    assert isinstance(result.error, Flaky)
    await broker.shutdown()


async def test_types_of_exceptions_filter() -> None:
    broker = make_broker(
        SmartRetryMiddleware(default_delay=0, default_retry_count=3, types_of_exceptions=[Flaky])
    )
    flaky_runs: list[int] = []
    fatal_runs: list[int] = []

    @broker.task(retry_on_error=True)
    async def flaky() -> None:
        flaky_runs.append(1)
        raise Flaky

    @broker.task(retry_on_error=True)
    async def fatal() -> None:
        fatal_runs.append(1)
        raise Fatal

    await broker.startup()
    r1 = await (await flaky.kiq()).wait_result(timeout=5)
    r2 = await (await fatal.kiq()).wait_result(timeout=5)
    await broker.wait_all()
    assert len(flaky_runs) == 4
    assert len(fatal_runs) == 1
    assert isinstance(r1.error, Flaky)
    assert isinstance(r2.error, Fatal)
    await broker.shutdown()


async def test_delayed_retry_waits_in_background_and_is_sent_at_shutdown() -> None:
    middleware = SmartRetryMiddleware(default_delay=3600, default_retry_count=1)
    broker = make_broker(middleware)
    runs: list[int] = []

    @broker.task(retry_on_error=True)
    async def fails() -> None:
        runs.append(1)
        raise Flaky

    await broker.startup()
    handle = await fails.kiq()
    await broker.wait_all()
    assert runs == [1]
    assert middleware.pending_retries == 1
    assert not await handle.is_ready()  # the failed attempt's result was not saved
    await middleware.shutdown()  # pending retries are sent, not lost
    result = await handle.wait_result(timeout=5)
    assert runs == [1, 1]
    assert isinstance(result.error, Flaky)
    await broker.shutdown()


async def test_delayed_retry_goes_through_a_schedule_source() -> None:
    source = InMemoryScheduleSource()
    middleware = SmartRetryMiddleware(
        default_delay=30, default_retry_count=1, schedule_source=source
    )
    broker = make_broker(middleware)
    runs: list[int] = []

    @broker.task(retry_on_error=True)
    async def fails(x: int) -> None:
        runs.append(x)
        raise Flaky

    await broker.startup()
    before = datetime.now(timezone.utc)
    handle = await fails.kiq(5)
    await broker.wait_all()
    schedules = await source.get_schedules()
    assert len(schedules) == 1
    (scheduled,) = schedules
    assert scheduled.task_id == handle.task_id
    assert scheduled.args == [5]
    assert scheduled.labels["_retries"] == 1
    assert scheduled.time is not None
    assert before + timedelta(seconds=29) < scheduled.time < before + timedelta(seconds=40)
    assert middleware.pending_retries == 0

    scheduler = TaskiqScheduler(broker, [source])
    assert await scheduler.tick(before) == []  # not due yet
    assert await scheduler.tick(scheduled.time) == [scheduled]
    result = await handle.wait_result(timeout=5)
    await broker.wait_all()
    assert runs == [5, 5]
    assert isinstance(result.error, Flaky)
    assert await source.get_schedules() == []  # the one-shot was removed
    await broker.shutdown()


def test_schedule_source_type_is_checked() -> None:
    with pytest.raises(TypeError):
        SmartRetryMiddleware(schedule_source=object())  # type: ignore[arg-type]


async def test_failed_retry_send_keeps_the_error_result(caplog: pytest.LogCaptureFixture) -> None:
    broker = make_broker(SimpleRetryMiddleware())

    @broker.task(retry_on_error=True, max_retries=3)
    async def fails() -> None:
        broker.local_task_registry.pop(fails.task_name)  # the retry cannot be sent
        raise Flaky

    await broker.startup()
    result = await (await fails.kiq()).wait_result(timeout=5)
    assert isinstance(result.error, Flaky)
    assert not isinstance(result.error, NoResultError)
    assert "cannot send retry" in caplog.text
    await broker.shutdown()


async def test_retries_survive_concurrent_tasks() -> None:
    broker = make_broker(SimpleRetryMiddleware())
    counts: dict[int, int] = {}

    @broker.task(retry_on_error=True, max_retries=2)
    async def fails(i: int) -> None:
        counts[i] = counts.get(i, 0) + 1
        await asyncio.sleep(0)
        raise Flaky

    await broker.startup()
    handles = [await fails.kiq(i) for i in range(20)]
    results = [await h.wait_result(timeout=5) for h in handles]
    await broker.wait_all()
    assert counts == {i: 3 for i in range(20)}
    assert all(isinstance(r.error, Flaky) for r in results)
    await broker.shutdown()
