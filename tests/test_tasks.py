"""Tasks on pool's ``InMemoryBroker`` (taskiq's, with pool's receiver and state): registering,
sending, waiting, results, threads, builders, errors. taskiq's semantics throughout."""

from __future__ import annotations

import asyncio
import pickle
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pool import (
    AsyncKicker,
    AsyncTaskiqDecoratedTask,
    AsyncTaskiqTask,
    InMemoryBroker,
    InmemoryResultBackend,
    PickleSerializer,
    ResultGetError,
    SendTaskError,
    TaskiqMessage,
    TaskiqMiddleware,
    TaskiqResult,
    TaskiqResultTimeoutError,
    UnknownTaskError,
    gather,
)


async def result_of(task: AsyncTaskiqTask[Any]) -> TaskiqResult[Any]:
    return await task.wait_result(timeout=5, check_interval=0.01)


@pytest.fixture
async def broker() -> AsyncIterator[InMemoryBroker]:
    broker = InMemoryBroker()
    await broker.startup()
    yield broker
    await broker.shutdown()


class CustomError(Exception):
    """A user's exception class, importable from this module."""


# --------------------------------------------------------------------- registering
async def test_task_decorator_without_parentheses(broker: InMemoryBroker) -> None:
    @broker.task
    async def add(a: int, b: int) -> int:
        return a + b

    assert isinstance(add, AsyncTaskiqDecoratedTask)
    assert add.task_name == f"{__name__}:add"
    assert add.labels == {}
    assert broker.find_task(add.task_name) is add
    assert (await result_of(await add.kiq(1, 2))).return_value == 3


async def test_task_decorator_with_empty_parentheses(broker: InMemoryBroker) -> None:
    @broker.task()
    def mul(a: int, b: int) -> int:
        return a * b

    assert mul.task_name == f"{__name__}:mul"
    assert (await result_of(await mul.kiq(3, 4))).return_value == 12


async def test_task_decorator_with_task_name_and_labels(broker: InMemoryBroker) -> None:
    @broker.task(task_name="reports.word_count", priority=5, queue="slow")
    def word_count(text: str) -> int:
        return len(text.split())

    assert word_count.task_name == "reports.word_count"
    assert word_count.labels == {"priority": 5, "queue": "slow"}
    assert broker.find_task("reports.word_count") is word_count
    result = await result_of(await word_count.kiq("a b c"))
    assert result.return_value == 3
    assert result.labels == {"priority": 5, "queue": "slow"}


async def test_task_decorator_with_positional_name(broker: InMemoryBroker) -> None:
    @broker.task("positional.name")
    async def noop() -> None:
        return None

    assert noop.task_name == "positional.name"
    assert broker.find_task("positional.name") is noop


def test_decorated_task_keeps_the_docstring() -> None:
    broker = InMemoryBroker()

    @broker.task
    async def documented() -> None:
        """The docstring."""

    assert documented.__doc__ == "The docstring."


def test_register_task_find_task_get_all_tasks() -> None:
    broker = InMemoryBroker()

    def plain(x: int) -> int:
        return x

    def other(x: int) -> int:
        return x

    registered = broker.register_task(plain, "custom.plain", retry=True)
    assert isinstance(registered, AsyncTaskiqDecoratedTask)
    assert registered.task_name == "custom.plain"
    assert registered.labels == {"retry": True}
    assert registered.original_func is plain
    assert broker.find_task("custom.plain") is registered
    assert broker.find_task("custom.missing") is None

    default = broker.register_task(other)
    assert default.task_name == f"{__name__}:other"

    tasks = broker.get_all_tasks()
    assert tasks["custom.plain"] is registered
    assert tasks[f"{__name__}:other"] is default
    tasks.clear()  # a copy: the registry is untouched
    assert broker.find_task("custom.plain") is registered


# --------------------------------------------------------------------- sending
async def test_kiq_returns_a_task_handle_with_its_id(broker: InMemoryBroker) -> None:
    @broker.task
    async def echo(value: Any) -> Any:
        return value

    task = await echo.kiq({"a": [1, 2]})
    assert isinstance(task, AsyncTaskiqTask)
    assert isinstance(task.task_id, str) and task.task_id
    result = await result_of(task)
    assert result.return_value == {"a": [1, 2]}


async def test_kiq_passes_args_and_kwargs(broker: InMemoryBroker) -> None:
    @broker.task
    async def describe(a: int, b: int = 0, *, c: str = "") -> str:
        return f"{a}-{b}-{c}"

    task = await describe.kiq(1, c="x")
    assert (await result_of(task)).return_value == "1-0-x"
    task = await describe.kiq(1, b=2, c="y")
    assert (await result_of(task)).return_value == "1-2-y"


async def test_kicker_with_labels_and_task_id(broker: InMemoryBroker) -> None:
    @broker.task(team="core")
    async def labelled() -> str:
        return "ok"

    kicker = labelled.kicker()
    assert isinstance(kicker, AsyncKicker)
    chained = kicker.with_labels(priority=9, team="edge").with_task_id("my-id-1")
    assert chained is kicker
    task = await chained.kiq()
    assert task.task_id == "my-id-1"
    result = await result_of(task)
    assert result.return_value == "ok"
    assert result.labels == {"team": "edge", "priority": 9}
    # the task's own labels are not changed by one call's labels
    assert labelled.labels == {"team": "core"}
    assert (await result_of(await labelled.kiq())).labels == {"team": "core"}


async def test_each_kiq_gets_a_new_task_id(broker: InMemoryBroker) -> None:
    @broker.task
    async def noop() -> None:
        return None

    ids = {(await noop.kiq()).task_id for _ in range(20)}
    assert len(ids) == 20


async def test_calling_the_task_runs_it_locally(broker: InMemoryBroker) -> None:
    sent: list[str] = []

    class Spy(TaskiqMiddleware):
        def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
            sent.append(message.task_name)
            return message

    broker.add_middlewares(Spy())
    caller = threading.get_ident()

    @broker.task
    def sync_add(a: int, b: int) -> tuple[int, int]:
        return a + b, threading.get_ident()

    @broker.task
    async def async_add(a: int, b: int) -> int:
        return a + b

    assert sync_add(1, 2) == (3, caller)
    assert await async_add(2, 3) == 5
    assert sent == []
    assert broker.result_backend.results == {}  # type: ignore[attr-defined]


async def test_await_inplace_runs_the_task_before_kiq_returns() -> None:
    broker = InMemoryBroker(await_inplace=True)

    @broker.task
    async def double(x: int) -> int:
        return 2 * x

    task = await double.kiq(21)
    assert await task.is_ready()
    assert (await task.get_result()).return_value == 42


# --------------------------------------------------------------------- waiting and results
async def test_is_ready_and_get_result(broker: InMemoryBroker) -> None:
    release = asyncio.Event()

    @broker.task
    async def gated() -> str:
        await release.wait()
        return "done"

    task = await gated.kiq()
    assert await task.is_ready() is False
    with pytest.raises(ResultGetError):
        await task.get_result()
    release.set()
    waited = await result_of(task)
    assert await task.is_ready() is True
    got = await task.get_result()
    assert got.return_value == "done"
    assert got == waited


async def test_wait_result_times_out_then_succeeds(broker: InMemoryBroker) -> None:
    release = asyncio.Event()

    @broker.task
    async def gated() -> int:
        await release.wait()
        return 7

    task = await gated.kiq()
    with pytest.raises(TaskiqResultTimeoutError):
        await task.wait_result(check_interval=0.01, timeout=0.05)
    release.set()
    assert (await task.wait_result(check_interval=0.01, timeout=5)).return_value == 7


async def test_result_fields_of_a_successful_task(broker: InMemoryBroker) -> None:
    @broker.task(kind="ok")
    async def ok() -> list[int]:
        return [1, 2]

    result = await result_of(await ok.kiq())
    assert isinstance(result, TaskiqResult)
    assert result.is_err is False
    assert result.return_value == [1, 2]
    assert result.error is None
    assert result.labels == {"kind": "ok"}
    assert isinstance(result.execution_time, float) and result.execution_time >= 0
    assert result.log is None
    assert result.raise_for_error() is result


async def test_result_of_a_failing_task_and_raise_for_error(broker: InMemoryBroker) -> None:
    @broker.task
    async def fail(message: str) -> None:
        raise CustomError(message)

    result = await result_of(await fail.kiq("boom"))
    assert result.is_err is True
    assert result.return_value is None
    assert isinstance(result.error, CustomError)
    assert str(result.error) == "boom"
    with pytest.raises(CustomError, match="boom"):
        result.raise_for_error()


async def test_a_failing_sync_task_gives_an_error_result(broker: InMemoryBroker) -> None:
    @broker.task
    def fail() -> None:
        raise KeyError("missing")

    result = await result_of(await fail.kiq())
    assert result.is_err
    assert isinstance(result.error, KeyError)


async def test_a_timeout_error_raised_by_the_task_is_kept(broker: InMemoryBroker) -> None:
    @broker.task
    async def gives_up() -> None:
        raise TimeoutError("upstream did not answer")

    result = await result_of(await gives_up.kiq())
    assert isinstance(result.error, TimeoutError)
    assert str(result.error) == "upstream did not answer"


# --------------------------------------------------------------------- threads and bounds
async def test_sync_tasks_run_in_a_thread_not_the_loop_thread(broker: InMemoryBroker) -> None:
    loop_thread = threading.get_ident()

    @broker.task
    def where() -> int:
        return threading.get_ident()

    @broker.task
    async def where_async() -> int:
        return threading.get_ident()

    sync_result = await result_of(await where.kiq())
    async_result = await result_of(await where_async.kiq())
    assert sync_result.return_value != loop_thread
    assert async_result.return_value == loop_thread


async def test_a_blocking_sync_task_does_not_block_the_loop(broker: InMemoryBroker) -> None:
    inside = threading.Event()
    release = threading.Event()

    @broker.task
    def blocking() -> str:
        inside.set()
        assert release.wait(10)
        return "unblocked"

    task = await blocking.kiq()
    # the loop keeps running while the task blocks its thread
    assert await asyncio.to_thread(inside.wait, 10)
    assert not await task.is_ready()
    release.set()
    assert (await task.wait_result(timeout=10)).return_value == "unblocked"


async def test_result_backend_keeps_at_most_max_stored_results() -> None:
    broker = InMemoryBroker(max_stored_results=2)
    await broker.startup()

    @broker.task
    async def ident(x: int) -> int:
        return x

    tasks = []
    for i in range(3):
        task = await ident.kiq(i)
        await result_of(task)
        tasks.append(task)
    assert len(broker.result_backend.results) == 2  # type: ignore[attr-defined]
    assert await tasks[0].is_ready() is False
    with pytest.raises(ResultGetError):
        await tasks[0].get_result()
    assert [(await t.get_result()).return_value for t in tasks[1:]] == [1, 2]
    await broker.shutdown()


def _ok(value: int) -> TaskiqResult[int]:
    return TaskiqResult(is_err=False, return_value=value, execution_time=0.0)


async def test_inmemory_result_backend_bounds_directly() -> None:
    backend: InmemoryResultBackend[int] = InmemoryResultBackend(max_stored_results=3)
    for i in range(10):
        await backend.set_result(
            str(i), TaskiqResult(is_err=False, return_value=i, execution_time=0)
        )
    assert list(backend.results) == ["7", "8", "9"]
    unbounded: InmemoryResultBackend[int] = InmemoryResultBackend(max_stored_results=-1)
    for i in range(500):
        await unbounded.set_result(
            str(i), TaskiqResult(is_err=False, return_value=i, execution_time=0)
        )
    assert len(unbounded.results) == 500


async def test_timeout_label_cancels_a_long_task_with_an_error_result(
    broker: InMemoryBroker,
) -> None:
    cancelled = asyncio.Event()

    @broker.task
    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    task = await forever.kicker().with_labels(timeout=0.05).kiq()
    result = await result_of(task)
    assert result.is_err
    assert isinstance(result.error, TimeoutError)
    assert cancelled.is_set()


async def test_timeout_label_on_the_decorator(broker: InMemoryBroker) -> None:
    @broker.task(timeout=0.05)
    async def forever() -> None:
        await asyncio.Event().wait()

    @broker.task(timeout=5)
    async def quick() -> str:
        return "in time"

    assert isinstance((await result_of(await forever.kiq())).error, TimeoutError)
    assert (await result_of(await quick.kiq())).return_value == "in time"


async def test_gather_returns_results_in_order(broker: InMemoryBroker) -> None:
    release = asyncio.Event()

    @broker.task
    async def square(x: int) -> int:
        await release.wait()
        return x * x

    tasks = [await square.kiq(i) for i in range(5)]
    waiting = asyncio.create_task(gather(*tasks, timeout=5))
    release.set()
    results = await waiting
    assert isinstance(results, tuple)
    assert [r.return_value for r in results] == [0, 1, 4, 9, 16]


async def test_gather_times_out(broker: InMemoryBroker) -> None:
    release = asyncio.Event()

    @broker.task
    async def gated() -> None:
        await release.wait()

    @broker.task
    async def quick() -> int:
        return 1

    tasks = [await quick.kiq(), await gated.kiq()]
    with pytest.raises(TaskiqResultTimeoutError):
        await gather(*tasks, timeout=0.05, periodicity=0.01)
    release.set()


# --------------------------------------------------------------------- builders
async def test_with_result_backend() -> None:
    backend = InmemoryResultBackend[Any]()
    broker = InMemoryBroker()
    assert broker.with_result_backend(backend) is broker
    assert broker.result_backend is backend

    @broker.task
    async def one() -> int:
        return 1

    task = await one.kiq()
    await result_of(task)
    assert task.task_id in backend.results


async def test_with_middlewares() -> None:
    seen: list[str] = []

    class Recorder(TaskiqMiddleware):
        def post_save(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
            seen.append(message.task_name)

    recorder = Recorder()
    broker = InMemoryBroker()
    assert broker.with_middlewares(recorder) is broker
    assert broker.middlewares == [recorder]
    assert recorder.broker is broker

    @broker.task(task_name="recorded")
    async def recorded() -> None:
        return None

    await result_of(await recorded.kiq())
    assert seen == ["recorded"]


def test_with_middlewares_skips_other_objects_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    broker = InMemoryBroker().with_middlewares(object())  # type: ignore[arg-type]
    assert broker.middlewares == []
    assert "not an instance of TaskiqMiddleware" in caplog.text


async def test_with_id_generator() -> None:
    counter = iter(range(100))
    broker = InMemoryBroker()
    assert broker.with_id_generator(lambda: f"id-{next(counter)}") is broker

    @broker.task
    async def one() -> int:
        return 1

    first, second = await one.kiq(), await one.kiq()
    assert (first.task_id, second.task_id) == ("id-0", "id-1")
    assert (await result_of(second)).return_value == 1


class RecordingPickle(PickleSerializer):
    """taskiq's pickle serializer, counting what it encodes."""

    def __init__(self) -> None:
        self.dumped = 0

    def dumpb(self, value: Any) -> bytes:
        self.dumped += 1
        return super().dumpb(value)


async def test_with_serializer_sends_messages_in_that_format() -> None:
    serializer = RecordingPickle()
    broker = InMemoryBroker()
    assert broker.with_serializer(serializer) is broker
    sent: list[bytes] = []

    class Spy(TaskiqMiddleware):
        def post_send(self, message: TaskiqMessage) -> None:
            sent.append(broker.formatter.dumps(message).message)

    broker.add_middlewares(Spy())

    @broker.task
    async def total(values: set[int]) -> int:
        assert isinstance(values, set)  # parsed to the annotation on arrival
        return sum(values)

    result = await result_of(await total.kiq({1, 2, 3}))
    assert result.return_value == 6
    assert serializer.dumped >= 1
    assert pickle.loads(sent[0])["task_name"] == total.task_name


async def test_builders_chain() -> None:
    backend = InmemoryResultBackend[Any]()
    broker = (
        InMemoryBroker()
        .with_result_backend(backend)
        .with_id_generator(lambda: "fixed")
        .with_middlewares(TaskiqMiddleware())
    )
    assert broker.result_backend is backend
    assert broker.id_generator() == "fixed"
    assert len(broker.middlewares) == 1


# --------------------------------------------------------------------- errors
async def test_kiq_of_an_unknown_task_raises_send_task_error(broker: InMemoryBroker) -> None:
    with pytest.raises(SendTaskError) as info:
        await AsyncKicker("no.such:task", broker, {}).kiq()
    assert isinstance(info.value.__cause__, UnknownTaskError)
    assert info.value.__cause__.task_name == "no.such:task"


async def test_a_message_for_an_unknown_task_is_logged_and_dropped(
    broker: InMemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    message = TaskiqMessage(task_id="lost-1", task_name="gone.task", labels={}, args=[], kwargs={})
    assert await broker.receiver.callback(broker.formatter.dumps(message).message) is None
    assert "gone.task" in caplog.text
    assert not await AsyncTaskiqTask("lost-1", broker.result_backend).is_ready()


async def test_a_message_that_cannot_be_parsed_is_logged_and_dropped(
    broker: InMemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    assert await broker.receiver.callback(b"\x00not json") is None
    assert "Cannot parse message" in caplog.text


async def test_unserialisable_args_raise_send_task_error(broker: InMemoryBroker) -> None:
    @broker.task
    async def takes(value: Any) -> None:
        return None

    with pytest.raises(SendTaskError):
        await takes.kiq(object())
    with pytest.raises(SendTaskError):
        await takes.kiq(value=threading.Lock())
    assert broker.result_backend.results == {}  # type: ignore[attr-defined]


async def test_a_failing_dependency_gives_an_error_result(broker: InMemoryBroker) -> None:
    from pool import TaskiqDepends

    def database() -> None:
        raise ConnectionError("database down")

    @broker.task
    async def needs_db(db: None = TaskiqDepends(database)) -> str:
        return "ran"

    result = await result_of(await needs_db.kiq())
    assert result.is_err
    assert isinstance(result.error, ConnectionError)
