"""taskiq's contract for ``InMemoryBroker``, checked on pool's subclass (``pool.InMemoryBroker``).

pool's subclass changes two things (its state class and its receiver); everything a taskiq
user relies on must behave as on taskiq's class. What taskiq's own suite checks (its tests of
the in-memory broker, the receiver, acknowledgements, the progress tracker, the retry
middleware) is asserted here again, on pool's class, in our own words.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import taskiq
from pydantic import BaseModel
from taskiq.acks import AckableMessage

import pool
from pool import (
    AcknowledgeType,
    AsyncTaskiqTask,
    BrokerMessage,
    Context,
    InMemoryBroker,
    JSONFormatter,
    PickleSerializer,
    ProgressTracker,
    SimpleRetryMiddleware,
    TaskiqDepends,
    TaskiqEvents,
    TaskiqFormatter,
    TaskiqMessage,
    TaskiqMiddleware,
    TaskiqResult,
    TaskiqState,
    TaskState,
)

pytestmark = pytest.mark.timeout(30)


class Point(BaseModel):
    x: int
    y: int


class Route(BaseModel):
    name: str
    stops: list[Point]


async def result_of(task: AsyncTaskiqTask[Any]) -> TaskiqResult[Any]:
    return await task.wait_result(timeout=5, check_interval=0.01)


@pytest.fixture
async def broker() -> AsyncIterator[InMemoryBroker]:
    broker = InMemoryBroker()
    async with broker:
        yield broker


def test_it_is_taskiqs_broker_with_pools_state() -> None:
    broker = InMemoryBroker()
    assert isinstance(broker, taskiq.InMemoryBroker)
    assert isinstance(broker.state, TaskiqState)
    assert isinstance(broker.state, taskiq.TaskiqState)
    assert isinstance(broker.result_backend, pool.InmemoryResultBackend)


def test_the_constructors_options_reach_pools_receiver() -> None:
    broker = InMemoryBroker(cast_types=False, max_async_tasks=7, propagate_exceptions=False)
    receiver = broker.receiver
    assert receiver.broker is broker
    assert receiver.executor is broker.executor
    assert receiver.validate_params is False
    assert receiver.propagate_exceptions is False
    assert receiver.sem is not None and receiver.sem._value == 7


# ------------------------------------------------------------------ sending and waiting
async def test_kiq_then_wait_result(broker: InMemoryBroker) -> None:
    @broker.task
    async def add(a: int, b: int) -> int:
        return a + b

    task = await add.kiq(2, 3)
    result = await result_of(task)
    assert result.is_err is False
    assert result.return_value == 5
    assert await task.is_ready()


async def test_a_sync_task_runs_too(broker: InMemoryBroker) -> None:
    @broker.task
    def shout(word: str) -> str:
        return word.upper()

    assert (await result_of(await shout.kiq("hi"))).return_value == "HI"


async def test_await_inplace_has_the_result_when_kiq_returns() -> None:
    broker = InMemoryBroker(await_inplace=True)

    @broker.task
    async def double(x: int) -> int:
        return 2 * x

    task = await double.kiq(4)
    assert await task.is_ready()
    assert (await task.get_result()).return_value == 8


async def test_wait_all_waits_for_the_sent_tasks(broker: InMemoryBroker) -> None:
    done: list[int] = []

    @broker.task
    async def step(i: int) -> None:
        await asyncio.sleep(0)
        done.append(i)

    handles = [await step.kiq(i) for i in range(5)]
    await broker.wait_all()
    assert sorted(done) == list(range(5))
    assert [await h.is_ready() for h in handles] == [True] * 5


async def test_listen_is_refused() -> None:
    with pytest.raises(RuntimeError):
        async for _ in InMemoryBroker().listen():
            pass


async def test_async_with_starts_and_stops_the_broker() -> None:
    fired: list[TaskiqEvents] = []
    broker = InMemoryBroker()
    for event in TaskiqEvents:
        broker.add_event_handler(event, lambda state, e=event: fired.append(e))
    async with broker:
        assert fired == [TaskiqEvents.CLIENT_STARTUP, TaskiqEvents.WORKER_STARTUP]
    assert fired[2:] == [TaskiqEvents.CLIENT_SHUTDOWN, TaskiqEvents.WORKER_SHUTDOWN]


# ------------------------------------------------------------------ arguments and results
async def test_pydantic_and_datetime_arguments_arrive_as_their_annotated_types(
    broker: InMemoryBroker,
) -> None:
    seen: dict[str, Any] = {}

    @broker.task
    async def plan(route: Route, start: datetime, *, first: Point, every: timedelta) -> str:
        seen.update(route=route, start=start, first=first, every=every)
        return route.name

    start = datetime(2026, 12, 1, 10, 30, tzinfo=timezone.utc)
    route = Route(name="loop", stops=[Point(x=1, y=2), Point(x=3, y=4)])
    task = await plan.kiq(route, start, first=Point(x=0, y=0), every=timedelta(minutes=5))
    assert (await result_of(task)).return_value == "loop"
    assert seen["route"] == route and isinstance(seen["route"].stops[0], Point)
    assert seen["start"] == start and isinstance(seen["start"], datetime)
    assert seen["first"] == Point(x=0, y=0)
    assert seen["every"] == timedelta(minutes=5)


async def test_arguments_sent_as_plain_data_are_parsed_too(broker: InMemoryBroker) -> None:
    @broker.task
    async def norm(p: Point, when: datetime) -> list[Any]:
        return [type(p).__name__, p.x + p.y, when.year]

    task = await norm.kiq({"x": "1", "y": 2}, "2026-01-02T03:04:05")  # type: ignore[arg-type]
    assert (await result_of(task)).return_value == ["Point", 3, 2026]


async def test_without_cast_types_arguments_stay_as_sent() -> None:
    broker = InMemoryBroker(cast_types=False)

    @broker.task
    async def kind(p: Point) -> str:
        return type(p).__name__

    assert (await result_of(await kind.kiq(Point(x=1, y=1)))).return_value == "dict"


async def test_a_returned_model_is_parsed_back_with_the_return_type(broker: InMemoryBroker) -> None:
    @broker.task
    async def make() -> Point:
        return Point(x=5, y=6)

    @broker.task
    async def make_raw() -> Point:
        return {"x": 7, "y": "8"}  # type: ignore[return-value]

    assert make.return_type is Point
    task = await make.kiq()
    assert task.return_type is Point
    assert (await result_of(task)).return_value == Point(x=5, y=6)
    raw = await result_of(await make_raw.kiq())
    assert raw.return_value == Point(x=7, y=8)


async def test_an_error_result_carries_the_exception(broker: InMemoryBroker) -> None:
    @broker.task
    async def fails() -> None:
        raise LookupError("nothing here")

    result = await result_of(await fails.kiq())
    assert result.is_err
    assert isinstance(result.error, LookupError)
    with pytest.raises(LookupError, match="nothing here"):
        result.raise_for_error()


# ------------------------------------------------------------------ labels and the kicker
async def test_labels_reach_the_task_and_the_result_with_their_types(
    broker: InMemoryBroker,
) -> None:
    @broker.task(priority=3, ratio=0.5, urgent=True, team="core")
    async def labelled(context: Context = TaskiqDepends()) -> dict[str, Any]:
        return dict(context.message.labels)

    result = await result_of(await labelled.kiq())
    expected = {"priority": 3, "ratio": 0.5, "urgent": True, "team": "core"}
    assert result.return_value == expected
    assert result.labels == expected


async def test_kicker_with_task_id_and_labels(broker: InMemoryBroker) -> None:
    @broker.task(team="core")
    async def who(context: Context = TaskiqDepends()) -> list[Any]:
        return [context.message.task_id, context.message.labels]

    task = await who.kicker().with_task_id("chosen-id").with_labels(team="edge", extra=1).kiq()
    assert task.task_id == "chosen-id"
    assert (await result_of(task)).return_value == ["chosen-id", {"team": "edge", "extra": 1}]
    assert who.labels == {"team": "core"}  # one call's labels leave the task's alone


# ------------------------------------------------------------------ acknowledgements
async def _deliver(
    broker: InMemoryBroker, task: Any, ack_type: AcknowledgeType | None, log: list[str]
) -> None:
    """Hand pool's receiver one ackable delivery of ``task``, as a broker's listen() would."""
    kicker = task.kicker()
    if ack_type is not None:
        kicker = kicker.with_labels(ack_type=ack_type.value)
    message = kicker._prepare_message()
    data = broker.formatter.dumps(message).message
    await broker.receiver.callback(AckableMessage(data=data, ack=lambda: log.append("ack")))


class SavedRecorder(TaskiqMiddleware):
    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def post_save(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        self.log.append("saved")


@pytest.mark.parametrize(
    ("ack_type", "expected"),
    [
        (None, ["task", "saved", "ack"]),  # taskiq's default: when saved
        (AcknowledgeType.WHEN_RECEIVED, ["ack", "task", "saved"]),
        (AcknowledgeType.WHEN_EXECUTED, ["task", "ack", "saved"]),
        (AcknowledgeType.WHEN_SAVED, ["task", "saved", "ack"]),
        (AcknowledgeType.MANUAL, ["task", "saved"]),
    ],
    ids=["default", "when_received", "when_executed", "when_saved", "manual"],
)
async def test_the_ack_type_label_decides_when_a_delivery_is_acked(
    ack_type: AcknowledgeType | None, expected: list[str]
) -> None:
    log: list[str] = []
    broker = InMemoryBroker().with_middlewares(SavedRecorder(log))

    @broker.task
    async def work() -> None:
        log.append("task")

    await _deliver(broker, work, ack_type, log)
    assert log == expected


async def test_context_ack_acknowledges_a_manual_delivery_once() -> None:
    log: list[str] = []
    broker = InMemoryBroker().with_middlewares(SavedRecorder(log))

    @broker.task
    async def work(context: Context = TaskiqDepends()) -> None:
        assert context.is_ackable and not context.is_acked
        log.append("task")
        await context.ack()
        await context.ack()  # a second ack does nothing
        assert context.is_acked
        log.append("after ack")

    await _deliver(broker, work, AcknowledgeType.MANUAL, log)
    assert log == ["task", "ack", "after ack", "saved"]


async def test_context_ack_of_a_message_that_cannot_be_acked_raises(
    broker: InMemoryBroker,
) -> None:
    @broker.task
    async def work(context: Context = TaskiqDepends()) -> bool:
        with pytest.raises(RuntimeError):
            await context.ack()
        return context.is_ackable

    assert (await result_of(await work.kiq())).return_value is False


# ------------------------------------------------------------------ progress
async def test_progress_tracker_sets_and_gets_the_progress(broker: InMemoryBroker) -> None:
    inside: list[Any] = []
    release = asyncio.Event()
    reported = asyncio.Event()

    @broker.task
    async def long(progress: ProgressTracker[dict[str, int]] = TaskiqDepends()) -> str:
        await progress.set_progress(TaskState.STARTED, {"done": 1})
        await progress.set_progress("halfway")  # no meta: the last one is kept
        inside.append(await progress.get_progress())
        reported.set()
        await release.wait()
        return "finished"

    task = await long.kiq()
    await asyncio.wait_for(reported.wait(), 5)
    progress = await task.get_progress()
    assert progress is not None
    assert progress.state == "halfway"
    assert progress.meta == {"done": 1}
    assert inside == [progress]
    release.set()
    assert (await result_of(task)).return_value == "finished"


async def test_a_task_that_reports_nothing_has_no_progress(broker: InMemoryBroker) -> None:
    @broker.task
    async def quiet() -> None:
        return None

    task = await quiet.kiq()
    await result_of(task)
    assert await task.get_progress() is None


# ------------------------------------------------------------------ middlewares
class Recorder(TaskiqMiddleware):
    def __init__(self, name: str, log: list[str]) -> None:
        super().__init__()
        self.name, self.log = name, log

    def _note(self, hook: str) -> None:
        self.log.append(f"{self.name}.{hook}")

    def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
        self._note("pre_send")
        return message

    def post_send(self, message: TaskiqMessage) -> None:
        self._note("post_send")

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        self._note("pre_execute")
        return message

    async def on_error(
        self, message: TaskiqMessage, result: TaskiqResult[Any], exception: BaseException
    ) -> None:
        self._note("on_error")

    def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        self._note("post_execute")

    async def post_save(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        self._note("post_save")


@pytest.mark.parametrize("fails", [False, True], ids=["ok", "error"])
async def test_middleware_hooks_run_in_taskiqs_order(fails: bool) -> None:
    log: list[str] = []
    broker = InMemoryBroker(await_inplace=True).with_middlewares(
        Recorder("a", log), Recorder("b", log)
    )

    @broker.task
    async def work() -> None:
        log.append("task")
        if fails:
            raise ValueError("failed")

    await work.kiq()
    errors = ["b.on_error", "a.on_error"] if fails else []
    assert log == [
        "a.pre_send",
        "b.pre_send",
        "a.pre_execute",
        "b.pre_execute",
        "task",
        *errors,
        "b.post_execute",
        "a.post_execute",
        "b.post_save",
        "a.post_save",
        "b.post_send",
        "a.post_send",
    ]


async def test_simple_retry_middleware_retries_only_the_given_exceptions() -> None:
    broker = InMemoryBroker().with_middlewares(
        SimpleRetryMiddleware(default_retry_count=3, types_of_exceptions=(ConnectionError,))
    )
    runs: list[str] = []

    @broker.task(retry_on_error=True)
    async def flaky(kind: str) -> None:
        runs.append(kind)
        raise ConnectionError() if kind == "net" else KeyError(kind)

    async with broker:
        net = await result_of(await flaky.kiq("net"))
        other = await result_of(await flaky.kiq("key"))
        await broker.wait_all()
    assert runs.count("net") == 3
    assert runs.count("key") == 1
    assert isinstance(net.error, ConnectionError)
    assert isinstance(other.error, KeyError)


# ------------------------------------------------------------------ serializer and formatter
class CountingPickle(PickleSerializer):
    def __init__(self) -> None:
        self.dumped: list[bytes] = []
        self.loaded = 0

    def dumpb(self, value: Any) -> bytes:
        data = super().dumpb(value)
        self.dumped.append(data)
        return data

    def loadb(self, value: bytes) -> Any:
        self.loaded += 1
        return super().loadb(value)


async def test_a_custom_serializer_carries_the_messages() -> None:
    serializer = CountingPickle()
    broker = InMemoryBroker().with_serializer(serializer)

    @broker.task
    async def echo(p: Point, when: datetime) -> list[Any]:
        return [p, when]

    when = datetime(2026, 1, 1, tzinfo=timezone.utc)
    result = await result_of(await echo.kiq(Point(x=1, y=2), when))
    assert result.return_value == [Point(x=1, y=2), when]
    assert len(serializer.dumped) == 1 and serializer.loaded == 1
    assert pickle.loads(serializer.dumped[0])["task_name"] == echo.task_name


class TaggingFormatter(TaskiqFormatter):
    """taskiq's JSON formatter that stamps a label on every message it encodes."""

    def __init__(self) -> None:
        self.inner = JSONFormatter()

    def dumps(self, message: TaskiqMessage) -> BrokerMessage:
        message.labels["formatted_by"] = "tagger"
        return self.inner.dumps(message)

    def loads(self, message: bytes) -> TaskiqMessage:
        return self.inner.loads(message)


@pytest.mark.parametrize("formatter", [JSONFormatter(), TaggingFormatter()], ids=["json", "tag"])
async def test_a_custom_formatter_carries_the_messages(formatter: TaskiqFormatter) -> None:
    broker = InMemoryBroker().with_formatter(formatter)

    @broker.task
    async def labels(p: Point, context: Context = TaskiqDepends()) -> list[Any]:
        return [p.x, context.message.labels.get("formatted_by")]

    result = await result_of(await labels.kiq(Point(x=4, y=0)))
    tag = "tagger" if isinstance(formatter, TaggingFormatter) else None
    assert result.return_value == [4, tag]
