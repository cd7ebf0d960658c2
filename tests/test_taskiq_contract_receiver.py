"""pool's receiver (``pool.runtime.receiver.PoolReceiver``): taskiq's ``Receiver`` with the
changes its module docstring lists, each checked here against taskiq's own receiver.

- Each running task resolves its dependencies from a context of its own. taskiq hands every
  task the broker's one ``custom_dependency_context`` dict, refilled with the ``Context`` of
  the task that started last; a task's top-level dependencies are resolved from a copy taken
  before its first ``await``, so they are right in taskiq too, but a dependency declared with
  ``use_cache=False`` is resolved from that shared dict later, after an ``await``, and then
  sees another task's message under taskiq's receiver, never under pool's.
- ``pool.TaskiqState`` resolves to ``broker.state``, as ``taskiq.TaskiqState`` does.
- A task cancelled by ``abandon()`` (a drain that timed out) is neither saved nor acked.
- ``on_finished`` hears of every task that ran, ``running`` holds the callbacks in flight.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import taskiq
from taskiq.acks import AckableMessage

import pool
from pool import AsyncTaskiqTask, Context, TaskiqDepends, TaskiqMessage, TaskiqResult, TaskiqState
from pool.runtime.receiver import PoolReceiver

pytestmark = pytest.mark.timeout(30)

BROKERS = {"pool": pool.InMemoryBroker, "taskiq": taskiq.InMemoryBroker}


async def result_of(task: AsyncTaskiqTask[Any]) -> TaskiqResult[Any]:
    return await task.wait_result(timeout=5, check_interval=0.01)


def test_pools_inmemory_broker_runs_pools_receiver_and_taskiqs_does_not() -> None:
    assert isinstance(pool.InMemoryBroker().receiver, PoolReceiver)
    assert not isinstance(taskiq.InMemoryBroker().receiver, PoolReceiver)
    assert issubclass(PoolReceiver, taskiq.receiver.Receiver)


# ------------------------------------------------------------------ a context per task
async def _two_interleaved_tasks(broker: Any, use_cache: bool) -> list[dict[str, str]]:
    """Two tasks that both wait in a first dependency, then resolve ``Context`` in a second."""
    arrived: list[int] = []
    both_waiting = asyncio.Event()

    async def wait_for_the_other() -> None:
        arrived.append(1)
        if len(arrived) == 2:
            both_waiting.set()
        await both_waiting.wait()

    def message_id(context: Context = TaskiqDepends()) -> str:
        return context.message.task_id

    @broker.task
    async def whoami(
        _: None = TaskiqDepends(wait_for_the_other),
        late: str = TaskiqDepends(message_id, use_cache=use_cache),
        context: Context = TaskiqDepends(),
    ) -> dict[str, str]:
        return {"late": late, "context": context.message.task_id}

    first, second = await whoami.kiq(), await whoami.kiq()
    results = [await result_of(first), await result_of(second)]
    ids = [first.task_id, second.task_id]
    return [{"own": ids[i], **results[i].raise_for_error().return_value} for i in range(2)]


@pytest.mark.parametrize("use_cache", [True, False], ids=["cached", "use_cache=False"])
async def test_pools_receiver_gives_each_task_its_own_context_after_an_await(
    use_cache: bool,
) -> None:
    for seen in await _two_interleaved_tasks(pool.InMemoryBroker(), use_cache):
        assert seen["late"] == seen["context"] == seen["own"]


async def test_taskiqs_receiver_is_right_for_a_cached_dependency_after_an_await() -> None:
    for seen in await _two_interleaved_tasks(taskiq.InMemoryBroker(), use_cache=True):
        assert seen["late"] == seen["context"] == seen["own"]


async def test_taskiqs_receiver_shows_a_use_cache_false_dependency_anothers_message() -> None:
    """What pool's receiver changes: under taskiq's, a task sees the other task's message."""
    seen = await _two_interleaved_tasks(taskiq.InMemoryBroker(), use_cache=False)
    assert all(s["context"] == s["own"] for s in seen)
    assert any(s["late"] != s["own"] for s in seen)


class Settings:
    """A client a user registers with ``add_dependency_context``."""

    def __init__(self, name: str) -> None:
        self.name = name


async def test_a_context_added_to_the_broker_later_still_reaches_every_task() -> None:
    broker = pool.InMemoryBroker()

    @broker.task
    async def read(settings: Settings = TaskiqDepends()) -> str:
        return settings.name

    broker.add_dependency_context({Settings: Settings("first")})
    assert (await result_of(await read.kiq())).return_value == "first"
    broker.add_dependency_context({Settings: Settings("second")})
    assert (await result_of(await read.kiq())).return_value == "second"


async def test_dependency_overrides_apply_under_pools_receiver() -> None:
    broker = pool.InMemoryBroker()

    def real() -> str:
        return "real"

    def fake(context: Context = TaskiqDepends()) -> str:
        return f"fake for {context.message.task_name}"

    broker.dependency_overrides[real] = fake

    @broker.task(task_name="uses.real")
    async def uses(value: str = TaskiqDepends(real)) -> str:
        return value

    assert (await result_of(await uses.kiq())).return_value == "fake for uses.real"


# ------------------------------------------------------------------ the state
@pytest.mark.parametrize("receiver", ["pool", "taskiq"])
async def test_taskiqs_state_class_resolves_to_the_broker_state(receiver: str) -> None:
    broker = BROKERS[receiver]()
    broker.state = TaskiqState()  # as a pool worker gives every broker

    @broker.task
    async def state_is_the_brokers(state: taskiq.TaskiqState = TaskiqDepends()) -> bool:
        return state is broker.state

    assert (await result_of(await state_is_the_brokers.kiq())).return_value is True


async def test_pools_state_class_resolves_to_the_broker_state_under_pools_receiver() -> None:
    broker = pool.InMemoryBroker()
    broker.state.set_value("answer", 42)

    @broker.task
    async def read(state: TaskiqState = TaskiqDepends()) -> Any:
        assert state is broker.state
        return state.get_value("answer")

    assert (await result_of(await read.kiq())).return_value == 42


async def test_under_taskiqs_receiver_pools_state_class_is_a_new_empty_state() -> None:
    """What pool's receiver changes: taskiq's does not know pool's class, and builds one."""
    broker = taskiq.InMemoryBroker()
    broker.state = TaskiqState()
    broker.state.set_value("answer", 42)

    @broker.task
    async def read(state: TaskiqState = TaskiqDepends()) -> list[Any]:
        return [state is broker.state, state.get_value("answer")]

    assert (await result_of(await read.kiq())).return_value == [False, None]


# ------------------------------------------------------------------ reports and in-flight tasks
async def test_on_finished_hears_of_every_task_that_ran() -> None:
    broker = pool.InMemoryBroker()
    heard: list[tuple[str, bool, Any, float]] = []

    def on_finished(message: TaskiqMessage, result: TaskiqResult[Any], seconds: float) -> None:
        heard.append((message.task_name, result.is_err, result.return_value, seconds))

    broker.receiver = PoolReceiver(broker, executor=broker.executor, on_finished=on_finished)

    @broker.task(task_name="ok")
    async def ok() -> int:
        return 1

    @broker.task(task_name="fails")
    def fails() -> None:
        raise ValueError("no")

    await result_of(await ok.kiq())
    await result_of(await fails.kiq())
    await broker.wait_all()
    assert [(name, is_err, value) for name, is_err, value, _ in heard] == [
        ("ok", False, 1),
        ("fails", True, None),
    ]
    assert all(seconds >= 0 for *_, seconds in heard)


async def test_running_holds_the_callbacks_in_flight() -> None:
    broker = pool.InMemoryBroker()
    receiver = broker.receiver
    assert isinstance(receiver, PoolReceiver)
    started = asyncio.Event()
    release = asyncio.Event()

    @broker.task
    async def gated() -> None:
        started.set()
        await release.wait()

    task = await gated.kiq()
    await asyncio.wait_for(started.wait(), 5)
    assert len(receiver.running) == 1
    (callback,) = receiver.running
    assert callback in broker._running_tasks
    release.set()
    await result_of(task)
    await broker.wait_all()
    assert receiver.running == set()


async def _start_forever(
    broker: Any, acks: list[str], **labels: Any
) -> tuple[asyncio.Task[Any], str]:
    """A callback for a delivery whose task waits for ever, started and running."""
    started = asyncio.Event()

    @broker.task(**labels)
    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    message = forever.kicker()._prepare_message()
    data = broker.formatter.dumps(message).message
    delivery = AckableMessage(data=data, ack=lambda: acks.append("ack"))
    callback = asyncio.create_task(broker.receiver.callback(delivery))
    await asyncio.wait_for(started.wait(), 5)
    return callback, message.task_id


async def test_abandoned_tasks_are_neither_saved_nor_acknowledged() -> None:
    broker = pool.InMemoryBroker()
    acks: list[str] = []
    heard: list[str] = []
    broker.receiver.on_finished = lambda message, result, seconds: heard.append("finished")
    callback, task_id = await _start_forever(broker, acks)
    broker.receiver.abandon()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(callback, 5)
    assert acks == []
    assert heard == []
    assert not await broker.result_backend.is_result_ready(task_id)


@pytest.mark.parametrize("receiver", ["pool", "taskiq"])
async def test_a_task_cancelled_otherwise_is_saved_as_its_error_and_acked(receiver: str) -> None:
    """What ``abandon`` changes: any other cancellation is taskiq's, an error result."""
    broker = BROKERS[receiver]()
    acks: list[str] = []
    callback, task_id = await _start_forever(broker, acks)
    callback.cancel()
    await asyncio.wait_for(callback, 5)
    assert acks == ["ack"]
    saved = await broker.result_backend.get_result(task_id)
    assert saved.is_err and isinstance(saved.error, asyncio.CancelledError)


@pytest.mark.parametrize("no_result_on_retry", [True, False])
async def test_an_abandoned_task_is_not_retried_by_a_retry_middleware(
    no_result_on_retry: bool,
) -> None:
    sent: list[str] = []

    class SpySends(pool.TaskiqMiddleware):
        def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
            sent.append(message.task_id)
            return message

    retry = pool.SimpleRetryMiddleware(no_result_on_retry=no_result_on_retry)
    broker = pool.InMemoryBroker().with_middlewares(SpySends(), retry)
    acks: list[str] = []
    heard: list[str] = []
    broker.receiver.on_finished = lambda message, result, seconds: heard.append("finished")
    callback, _ = await _start_forever(broker, acks, retry_on_error=True)
    try:
        broker.receiver.abandon()
        outcome = await asyncio.wait_for(asyncio.gather(callback, return_exceptions=True), 5)
        assert isinstance(outcome[0], asyncio.CancelledError)
        assert (sent, acks, heard) == ([], [], [])  # redelivered by the broker only
    finally:
        for task in list(broker._running_tasks):
            task.cancel()
        await asyncio.gather(*broker._running_tasks, return_exceptions=True)
