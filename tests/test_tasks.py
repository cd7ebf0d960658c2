"""Tasks on an ``InMemoryBroker``: registering, sending, waiting, results, limits, builders."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest

from pool import (
    AsyncKicker,
    AsyncResultBackend,
    AsyncTaskiqDecoratedTask,
    AsyncTaskiqTask,
    InMemoryBroker,
    InMemoryResultBackend,
    ResultGetError,
    SendTaskError,
    TaskiqMessage,
    TaskiqMiddleware,
    TaskiqResult,
    TaskiqResultTimeoutError,
    UnknownTaskError,
    gather,
)
from pool.exceptions import TaskFailedError
from pool.serializers import PickleSerializer


@pytest.fixture
async def broker() -> AsyncIterator[InMemoryBroker]:
    broker = InMemoryBroker()
    await broker.startup()
    yield broker
    await broker.shutdown()


class CustomError(Exception):
    """A user's exception class, importable from this module."""


class CodedError(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


# --------------------------------------------------------------------- registering
async def test_task_decorator_without_parentheses(broker: InMemoryBroker) -> None:
    @broker.task
    async def add(a: int, b: int) -> int:
        return a + b

    assert isinstance(add, AsyncTaskiqDecoratedTask)
    assert add.task_name == f"{__name__}:add"
    assert add.labels == {}
    assert broker.find_task(add.task_name) is add
    assert (await (await add.kiq(1, 2)).wait_result(timeout=5)).return_value == 3


async def test_task_decorator_with_empty_parentheses(broker: InMemoryBroker) -> None:
    @broker.task()
    def mul(a: int, b: int) -> int:
        return a * b

    assert mul.task_name == f"{__name__}:mul"
    assert (await (await mul.kiq(3, 4)).wait_result(timeout=5)).return_value == 12


async def test_task_decorator_with_task_name_and_labels(broker: InMemoryBroker) -> None:
    @broker.task(task_name="reports.word_count", priority=5, queue="slow")
    def word_count(text: str) -> int:
        return len(text.split())

    assert word_count.task_name == "reports.word_count"
    assert word_count.labels == {"priority": 5, "queue": "slow"}
    assert broker.find_task("reports.word_count") is word_count
    result = await (await word_count.kiq("a b c")).wait_result(timeout=5)
    assert result.return_value == 3
    assert result.labels == {"priority": 5, "queue": "slow"}


async def test_task_decorator_with_positional_name(broker: InMemoryBroker) -> None:
    @broker.task("positional.name")
    async def noop() -> None:
        return None

    assert noop.task_name == "positional.name"
    assert broker.find_task("positional.name") is noop


def test_decorated_task_keeps_name_and_doc() -> None:
    broker = InMemoryBroker()

    @broker.task
    async def documented() -> None:
        """The docstring."""

    assert documented.__name__ == "documented"
    assert documented.__doc__ == "The docstring."


def test_register_task_find_task_get_all_tasks() -> None:
    broker = InMemoryBroker()

    def plain(x: int) -> int:
        return x

    registered = broker.register_task(plain, "custom.plain", retry=True)
    assert isinstance(registered, AsyncTaskiqDecoratedTask)
    assert registered.task_name == "custom.plain"
    assert registered.labels == {"retry": True}
    assert registered.original_func is plain
    assert broker.find_task("custom.plain") is registered
    assert broker.find_task("custom.missing") is None

    default = broker.register_task(plain)
    assert default.task_name == f"{__name__}:plain"

    tasks = broker.get_all_tasks()
    assert tasks == {"custom.plain": registered, f"{__name__}:plain": default}
    tasks.clear()  # a copy: the registry is untouched
    assert broker.find_task("custom.plain") is registered


def test_register_task_rejects_non_callables_and_non_str_names() -> None:
    broker = InMemoryBroker()
    with pytest.raises(TypeError):
        broker.register_task(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        broker.register_task(lambda: None, task_name=42)  # type: ignore[arg-type]


async def test_registering_a_name_again_runs_the_new_function(broker: InMemoryBroker) -> None:
    async def first() -> str:
        return "first"

    def second() -> str:
        return "second"

    task = broker.register_task(first, "same.name")
    assert (await (await task.kiq()).wait_result(timeout=5)).return_value == "first"
    task = broker.register_task(second, "same.name")
    result = await (await task.kiq()).wait_result(timeout=5)
    assert result.error is None
    assert result.return_value == "second"


# --------------------------------------------------------------------- sending
async def test_kiq_returns_a_task_handle_with_its_id(broker: InMemoryBroker) -> None:
    @broker.task
    async def echo(value: Any) -> Any:
        return value

    task = await echo.kiq({"a": [1, 2]})
    assert isinstance(task, AsyncTaskiqTask)
    assert isinstance(task.task_id, str) and task.task_id
    result = await task.wait_result(timeout=5)
    assert result.return_value == {"a": [1, 2]}


async def test_kiq_passes_args_and_kwargs(broker: InMemoryBroker) -> None:
    @broker.task
    async def describe(a: int, b: int = 0, *, c: str = "") -> str:
        return f"{a}-{b}-{c}"

    task = await describe.kiq(1, c="x")
    assert (await task.wait_result(timeout=5)).return_value == "1-0-x"
    task = await describe.kiq(1, b=2, c="y")
    assert (await task.wait_result(timeout=5)).return_value == "1-2-y"


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
    result = await task.wait_result(timeout=5)
    assert result.return_value == "ok"
    assert result.labels == {"team": "edge", "priority": 9}
    # the task's own labels are not changed by one call's labels
    assert labelled.labels == {"team": "core"}
    assert (await (await labelled.kiq()).wait_result(timeout=5)).labels == {"team": "core"}


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


async def test_await_inplace_task_can_send_another_at_the_concurrency_limit() -> None:
    broker = InMemoryBroker(await_inplace=True, max_async_tasks=1)

    @broker.task
    async def inner(x: int) -> int:
        return x + 1

    @broker.task
    async def outer(x: int) -> int:
        task = await inner.kiq(x)
        return (await task.wait_result(timeout=5)).return_value * 10

    task = await asyncio.wait_for(outer.kiq(1), 5)
    assert (await task.get_result()).return_value == 20


async def test_await_inplace_still_honours_the_limit_for_concurrent_senders() -> None:
    broker = InMemoryBroker(await_inplace=True, max_async_tasks=1)
    running = 0
    most = 0
    first_in = asyncio.Event()
    release = asyncio.Event()

    @broker.task
    async def gated() -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        first_in.set()
        await release.wait()
        running -= 1

    senders = [asyncio.create_task(gated.kiq()) for _ in range(3)]
    await asyncio.wait_for(first_in.wait(), 5)
    for _ in range(20):
        await asyncio.sleep(0)
    assert running == 1
    release.set()
    await asyncio.wait_for(asyncio.gather(*senders), 5)
    assert most == 1


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
    waited = await task.wait_result(timeout=5)
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


class PollingBackend(AsyncResultBackend[Any]):
    """A backend that only answers questions: ``wait_result`` must poll it."""

    def __init__(self) -> None:
        self.results: dict[str, TaskiqResult[Any]] = {}
        self.polls = 0
        self.ready_after: int | None = None

    async def set_result(self, task_id: str, result: TaskiqResult[Any]) -> None:
        self.results[task_id] = result

    async def is_result_ready(self, task_id: str) -> bool:
        self.polls += 1
        if self.ready_after is not None and self.polls >= self.ready_after:
            self.results.setdefault(task_id, TaskiqResult(is_err=False, return_value="late"))
        return task_id in self.results

    async def get_result(self, task_id: str, with_logs: bool = False) -> TaskiqResult[Any]:
        return self.results[task_id]


async def test_polling_wait_result_times_out_after_timeout() -> None:
    backend = PollingBackend()
    task: AsyncTaskiqTask[Any] = AsyncTaskiqTask("never", backend)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TaskiqResultTimeoutError):
        await task.wait_result(check_interval=0.01, timeout=0.1)
    assert loop.time() - started >= 0.09
    assert backend.polls >= 3  # it polled every check_interval, not once


async def test_polling_wait_result_returns_once_ready() -> None:
    backend = PollingBackend()
    backend.ready_after = 4
    task: AsyncTaskiqTask[Any] = AsyncTaskiqTask("later", backend)
    result = await task.wait_result(check_interval=0.001, timeout=-1)
    assert result.return_value == "late"
    assert backend.polls == 4


async def test_polling_wait_result_with_zero_timeout_checks_once() -> None:
    backend = PollingBackend()
    await backend.set_result("there", TaskiqResult(is_err=False, return_value=1))
    assert (await AsyncTaskiqTask("there", backend).wait_result(timeout=0)).return_value == 1
    with pytest.raises(TaskiqResultTimeoutError):
        await AsyncTaskiqTask("absent", backend).wait_result(timeout=0)


async def test_result_fields_of_a_successful_task(broker: InMemoryBroker) -> None:
    @broker.task(kind="ok")
    async def ok() -> list[int]:
        return [1, 2]

    result = await (await ok.kiq()).wait_result(timeout=5)
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

    result = await (await fail.kiq("boom")).wait_result(timeout=5)
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

    result = await (await fail.kiq()).wait_result(timeout=5)
    assert result.is_err
    assert isinstance(result.error, KeyError)


async def test_a_timeout_error_raised_by_the_task_is_kept(broker: InMemoryBroker) -> None:
    @broker.task
    async def gives_up() -> None:
        raise TimeoutError("upstream did not answer")

    result = await (await gives_up.kiq()).wait_result(timeout=5)
    assert isinstance(result.error, TimeoutError)
    assert str(result.error) == "upstream did not answer"


# --------------------------------------------------------------------- threads and limits
async def test_sync_tasks_run_in_a_thread_not_the_loop_thread(broker: InMemoryBroker) -> None:
    loop_thread = threading.get_ident()

    @broker.task
    def where() -> int:
        return threading.get_ident()

    @broker.task
    async def where_async() -> int:
        return threading.get_ident()

    sync_result = await (await where.kiq()).wait_result(timeout=5)
    async_result = await (await where_async.kiq()).wait_result(timeout=5)
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


async def test_concurrency_limit_is_honoured() -> None:
    broker = InMemoryBroker(max_async_tasks=2)
    await broker.startup()
    running = 0
    most = 0
    two_running = asyncio.Event()
    release = asyncio.Event()

    @broker.task
    async def blocking(index: int) -> int:
        nonlocal running, most
        running += 1
        most = max(most, running)
        if running == 2:
            two_running.set()
        await release.wait()
        running -= 1
        return index

    tasks = [await blocking.kiq(i) for i in range(6)]
    await asyncio.wait_for(two_running.wait(), 5)
    # let every other sent task reach the point where it would start
    for _ in range(20):
        await asyncio.sleep(0)
    assert running == 2
    assert [await t.is_ready() for t in tasks] == [False] * 6
    release.set()
    results = await gather(*tasks, timeout=10)
    assert [r.return_value for r in results] == list(range(6))
    assert most == 2
    await broker.shutdown()


async def test_concurrency_limit_holds_in_a_second_event_loop() -> None:
    """A broker outlives an event loop (one test or ``asyncio.run`` after another)."""
    broker = InMemoryBroker(max_async_tasks=1)

    @broker.task
    async def step(i: int) -> int:
        await asyncio.sleep(0)
        return i

    async def run_three() -> list[int]:
        tasks = [await step.kiq(i) for i in range(3)]
        return [(await t.wait_result(timeout=5)).return_value for t in tasks]

    def in_new_loop() -> list[int]:
        return asyncio.run(run_three())

    assert await asyncio.to_thread(in_new_loop) == [0, 1, 2]
    assert await asyncio.to_thread(in_new_loop) == [0, 1, 2]
    assert await run_three() == [0, 1, 2]


async def test_max_async_tasks_must_be_positive() -> None:
    with pytest.raises(ValueError):
        InMemoryBroker(max_async_tasks=0)


async def test_shutdown_waits_for_running_tasks() -> None:
    broker = InMemoryBroker()
    await broker.startup()
    started = asyncio.Event()
    release = asyncio.Event()

    @broker.task
    async def slow() -> str:
        started.set()
        await release.wait()
        return "finished"

    task = await slow.kiq()
    await started.wait()
    stopping = asyncio.create_task(broker.shutdown())
    done, _ = await asyncio.wait({stopping}, timeout=0.1)
    assert not done
    release.set()
    await asyncio.wait_for(stopping, 5)
    assert (await task.get_result()).return_value == "finished"


async def test_result_backend_keeps_at_most_max_stored_results() -> None:
    broker = InMemoryBroker(max_stored_results=2)
    await broker.startup()

    @broker.task
    async def ident(x: int) -> int:
        return x

    tasks = []
    for i in range(3):
        task = await ident.kiq(i)
        await task.wait_result(timeout=5)
        tasks.append(task)
    assert len(broker.result_backend.results) == 2  # type: ignore[attr-defined]
    assert await tasks[0].is_ready() is False
    with pytest.raises(ResultGetError):
        await tasks[0].get_result()
    assert [(await t.get_result()).return_value for t in tasks[1:]] == [1, 2]
    await broker.shutdown()


async def test_inmemory_result_backend_bounds_directly() -> None:
    backend: InMemoryResultBackend[int] = InMemoryResultBackend(max_stored_results=3)
    for i in range(10):
        await backend.set_result(str(i), TaskiqResult(is_err=False, return_value=i))
    assert list(backend.results) == ["7", "8", "9"]
    unbounded: InMemoryResultBackend[int] = InMemoryResultBackend(max_stored_results=-1)
    for i in range(500):
        await unbounded.set_result(str(i), TaskiqResult(is_err=False, return_value=i))
    assert len(unbounded.results) == 500


async def test_inmemory_result_backend_get_result_without_logs() -> None:
    backend: InMemoryResultBackend[int] = InMemoryResultBackend()
    await backend.set_result("t", TaskiqResult(is_err=False, return_value=1, log="line"))
    assert (await backend.get_result("t")).log is None
    assert (await backend.get_result("t", with_logs=True)).log == "line"


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
    result = await task.wait_result(timeout=5)
    assert result.is_err
    assert isinstance(result.error, TimeoutError)
    assert "timed out" in str(result.error)
    assert cancelled.is_set()


async def test_timeout_label_on_the_decorator(broker: InMemoryBroker) -> None:
    @broker.task(timeout=0.05)
    async def forever() -> None:
        await asyncio.Event().wait()

    @broker.task(timeout=5)
    async def quick() -> str:
        return "in time"

    assert isinstance((await (await forever.kiq()).wait_result(timeout=5)).error, TimeoutError)
    assert (await (await quick.kiq()).wait_result(timeout=5)).return_value == "in time"


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
    backend = InMemoryResultBackend[Any]()
    broker = InMemoryBroker()
    assert broker.with_result_backend(backend) is broker
    assert broker.result_backend is backend

    @broker.task
    async def one() -> int:
        return 1

    task = await one.kiq()
    await task.wait_result(timeout=5)
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

    await (await recorded.kiq()).wait_result(timeout=5)
    assert seen == ["recorded"]


def test_with_middlewares_rejects_other_objects() -> None:
    with pytest.raises(TypeError):
        InMemoryBroker().with_middlewares(object())  # type: ignore[arg-type]


async def test_with_id_generator() -> None:
    counter = iter(range(100))
    broker = InMemoryBroker()
    assert broker.with_id_generator(lambda: f"id-{next(counter)}") is broker

    @broker.task
    async def one() -> int:
        return 1

    first, second = await one.kiq(), await one.kiq()
    assert (first.task_id, second.task_id) == ("id-0", "id-1")
    assert (await second.wait_result(timeout=5)).return_value == 1


async def test_with_serializer() -> None:
    broker = InMemoryBroker()

    @broker.task
    async def total(values: set[int]) -> int:
        return sum(values)

    with pytest.raises(SendTaskError):
        await total.kiq({1, 2, 3})  # JSON, the default, has no sets
    assert broker.with_serializer(PickleSerializer()) is broker
    task = await total.kiq({1, 2, 3})
    assert (await task.wait_result(timeout=5)).return_value == 6


async def test_builders_chain() -> None:
    backend = InMemoryResultBackend[Any]()
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
async def test_kiq_of_an_unknown_task_raises_send_task_error_naming_it(
    broker: InMemoryBroker,
) -> None:
    with pytest.raises(SendTaskError, match=r"no\.such:task") as info:
        await AsyncKicker("no.such:task", broker).kiq()
    assert isinstance(info.value.__cause__, UnknownTaskError)
    assert info.value.__cause__.task_name == "no.such:task"


async def test_a_message_for_an_unknown_task_gives_an_error_result_naming_it(
    broker: InMemoryBroker,
) -> None:
    message = TaskiqMessage(task_id="lost-1", task_name="gone.task", labels={"a": 1})
    result = await broker.receiver.callback(broker.formatter.dumps(message).message)
    assert result is not None
    assert result.is_err
    assert isinstance(result.error, UnknownTaskError)
    assert "gone.task" in str(result.error)
    saved = await AsyncTaskiqTask("lost-1", broker.result_backend).wait_result(timeout=5)
    assert isinstance(saved.error, UnknownTaskError)
    with pytest.raises(UnknownTaskError):
        saved.raise_for_error()


async def test_a_message_that_cannot_be_parsed_is_logged_and_dropped(
    broker: InMemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("WARNING", logger="pool.receiver"):
        assert await broker.receiver.callback(b"\x00not json") is None
    assert "cannot be parsed" in caplog.text


async def test_unserialisable_args_raise_send_task_error(broker: InMemoryBroker) -> None:
    @broker.task
    async def takes(value: Any) -> None:
        return None

    with pytest.raises(SendTaskError, match="takes") as info:
        await takes.kiq(object())
    assert isinstance(info.value.__cause__, TypeError)
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

    result = await (await needs_db.kiq()).wait_result(timeout=5)
    assert result.is_err
    assert isinstance(result.error, ConnectionError)


# --------------------------------------------------------------------- result encoding
def _round_trip(result: TaskiqResult[Any]) -> TaskiqResult[Any]:
    return TaskiqResult.from_dict(json.loads(json.dumps(result.to_dict())))


def test_result_round_trips_through_json() -> None:
    result = TaskiqResult(
        is_err=False, return_value={"x": [1, "a"]}, execution_time=0.5, labels={"l": 1}
    )
    back = _round_trip(result)
    assert back == result


def test_custom_exception_is_rebuilt_as_its_own_class() -> None:
    try:
        raise CustomError("it broke")
    except CustomError as exc:
        error = exc
    back = _round_trip(TaskiqResult(is_err=True, error=error))
    assert back.is_err
    assert type(back.error) is CustomError
    assert str(back.error) == "it broke"
    notes = "\n".join(getattr(back.error, "__notes__", []))
    assert "it broke" in notes and "Traceback" in notes
    with pytest.raises(CustomError):
        back.raise_for_error()


def test_exception_with_several_arguments_is_rebuilt_with_them() -> None:
    back = _round_trip(TaskiqResult(is_err=True, error=CodedError(404, "not found")))
    assert isinstance(back.error, CodedError)
    assert (back.error.code, back.error.reason) == (404, "not found")


def test_builtin_exception_is_rebuilt() -> None:
    back = _round_trip(TaskiqResult(is_err=True, error=ValueError("bad value")))
    assert type(back.error) is ValueError
    assert str(back.error) == "bad value"


def test_exception_of_a_class_not_importable_here_becomes_task_failed_error() -> None:
    class LocalError(Exception):
        pass

    back = _round_trip(TaskiqResult(is_err=True, error=LocalError("local")))
    assert isinstance(back.error, TaskFailedError)
    assert "LocalError" in str(back.error)
    assert "local" in str(back.error)


def test_exception_of_an_unloaded_module_is_not_imported() -> None:
    data = TaskiqResult(is_err=True, error=ValueError("x")).to_dict()
    data["error"]["type"] = "some_module_never_imported_here.Boom"
    back = TaskiqResult.from_dict(data)
    assert isinstance(back.error, TaskFailedError)
    assert "some_module_never_imported_here.Boom" in str(back.error)
    import sys

    assert "some_module_never_imported_here" not in sys.modules


def test_exception_encoding_is_plain_data() -> None:
    encoded = TaskiqResult(is_err=True, error=CodedError(1, "r")).to_dict()["error"]
    assert encoded["type"] == f"{__name__}.CodedError"
    assert encoded["args"] == [1, "r"]
    json.dumps(encoded)
