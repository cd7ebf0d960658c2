"""Dependency injection as taskiq users write it (Context, TaskiqDepends, TaskiqState), on
pool's ``InMemoryBroker``, whose tasks run through pool's receiver subclass."""

from __future__ import annotations

import asyncio
import threading
import warnings
from collections.abc import AsyncGenerator, AsyncIterator, Generator
from typing import Annotated, Any

import pytest
import taskiq
from taskiq.exceptions import TaskRejectedError

from pool import (
    AsyncBroker,
    AsyncTaskiqTask,
    Context,
    InMemoryBroker,
    TaskiqDepends,
    TaskiqResult,
    TaskiqState,
)


async def result_of(task: AsyncTaskiqTask[Any]) -> TaskiqResult[Any]:
    return await task.wait_result(timeout=5, check_interval=0.01)


class Database:
    """A client a user registers with ``add_dependency_context``."""

    def __init__(self, name: str) -> None:
        self.name = name


@pytest.fixture
async def broker() -> AsyncIterator[InMemoryBroker]:
    broker = InMemoryBroker()
    await broker.startup()
    yield broker
    await broker.shutdown()


async def test_context_gives_message_broker_and_state(broker: InMemoryBroker) -> None:
    broker.state.set_value("greeting", "hi")

    @broker.task(task_name="ctx.task", team="core")
    async def inspect(x: int, context: Context = TaskiqDepends()) -> dict[str, Any]:
        assert context.broker is broker
        assert context.state is broker.state
        return {
            "task_id": context.message.task_id,
            "task_name": context.message.task_name,
            "args": context.message.args,
            "labels": context.message.labels,
            "greeting": context.state.get_value("greeting"),
        }

    task = await inspect.kiq(5)
    result = await result_of(task)
    assert result.error is None
    assert result.return_value == {
        "task_id": task.task_id,
        "task_name": "ctx.task",
        "args": [5],
        "labels": {"team": "core"},
        "greeting": "hi",
    }


async def test_context_in_a_sync_task(broker: InMemoryBroker) -> None:
    @broker.task
    def sync_inspect(context: Context = TaskiqDepends()) -> tuple[str, bool]:
        return context.message.task_id, threading.current_thread() is threading.main_thread()

    task = await sync_inspect.kiq()
    result = await result_of(task)
    assert result.return_value == (task.task_id, False)


async def test_context_with_annotated_style(broker: InMemoryBroker) -> None:
    @broker.task
    async def annotated(context: Annotated[Context, TaskiqDepends()]) -> str:
        return context.message.task_id

    task = await annotated.kiq()
    assert (await result_of(task)).return_value == task.task_id


async def test_each_concurrent_task_sees_its_own_context_message(
    broker: InMemoryBroker,
) -> None:
    """Two tasks interleaved at an ``await`` each keep their own ``Context``.

    (A dependency resolved after an ``await`` is in test_taskiq_contract_receiver.py.)"""
    both_started = asyncio.Event()
    started: list[str] = []

    @broker.task
    async def who_am_i(label: str, context: Context = TaskiqDepends()) -> dict[str, Any]:
        before = (context.message.task_id, context.message.args)
        started.append(label)
        if len(started) == 2:
            both_started.set()
        await both_started.wait()  # both are running now, interleaved
        after = (context.message.task_id, context.message.args)
        return {"before": before, "after": after}

    first = await who_am_i.kiq("first")
    second = await who_am_i.kiq("second")
    first_result, second_result = (
        await result_of(first),
        await result_of(second),
    )
    assert sorted(started) == ["first", "second"]
    for task, label, result in (
        (first, "first", first_result),
        (second, "second", second_result),
    ):
        assert result.error is None
        expected = (task.task_id, [label])
        assert result.return_value == {"before": expected, "after": expected}


async def test_pools_state_class_is_injected_as_the_broker_state(broker: InMemoryBroker) -> None:
    broker.state.set_value("config", {"debug": True})

    @broker.task
    async def read_config(state: TaskiqState = TaskiqDepends()) -> Any:
        assert state is broker.state
        return state.get_value("config")

    @broker.task
    def write_config(state: TaskiqState = TaskiqDepends()) -> None:
        state.config = {"debug": False}

    assert (await result_of(await read_config.kiq())).return_value == {"debug": True}
    await result_of(await write_config.kiq())
    assert broker.state.config == {"debug": False}


async def test_taskiqs_state_class_is_injected_as_the_same_state(broker: InMemoryBroker) -> None:
    broker.state["config"] = "set by the app"

    @broker.task
    async def read_config(state: taskiq.TaskiqState = TaskiqDepends()) -> Any:
        assert state is broker.state
        return state.config

    assert (await result_of(await read_config.kiq())).return_value == "set by the app"


async def test_function_dependencies_nest(broker: InMemoryBroker) -> None:
    def base_url(state: TaskiqState = TaskiqDepends()) -> str:
        return state.get_value("url", "http://default")

    async def client(url: str = TaskiqDepends(base_url)) -> str:
        return f"client({url})"

    broker.state.url = "http://example"

    @broker.task
    async def use(c: str = TaskiqDepends(client)) -> str:
        return c

    assert (await result_of(await use.kiq())).return_value == ("client(http://example)")


async def test_generator_dependencies_are_closed_after_the_task(broker: InMemoryBroker) -> None:
    events: list[str] = []

    def sync_resource() -> Generator[str, None, None]:
        events.append("open sync")
        yield "sync"
        events.append("close sync")

    async def async_resource() -> AsyncGenerator[str, None]:
        events.append("open async")
        yield "async"
        events.append("close async")

    @broker.task
    async def uses(
        a: str = TaskiqDepends(sync_resource), b: str = TaskiqDepends(async_resource)
    ) -> str:
        events.append("task")
        return a + b

    result = await result_of(await uses.kiq())
    assert result.return_value == "syncasync"
    assert events[:2] == ["open sync", "open async"] or events[:2] == ["open async", "open sync"]
    assert events[2] == "task"
    assert sorted(events[3:]) == ["close async", "close sync"]


async def test_generator_dependency_sees_the_task_error(broker: InMemoryBroker) -> None:
    seen: list[BaseException] = []

    async def resource() -> AsyncGenerator[None, None]:
        try:
            yield None
        except Exception as exc:
            seen.append(exc)
            raise

    @broker.task
    async def fails(r: None = TaskiqDepends(resource)) -> None:
        raise ValueError("task failed")

    result = await result_of(await fails.kiq())
    assert isinstance(result.error, ValueError)
    assert len(seen) == 1 and seen[0] is result.error


async def test_dependency_is_resolved_per_run(broker: InMemoryBroker) -> None:
    calls = 0

    def counter() -> int:
        nonlocal calls
        calls += 1
        return calls

    @broker.task
    async def count(n: int = TaskiqDepends(counter)) -> int:
        return n

    values = [(await result_of(await count.kiq())).return_value for _ in range(3)]
    assert values == [1, 2, 3]


async def test_kwargs_sent_with_the_message_win_over_dependencies(broker: InMemoryBroker) -> None:
    def default_name() -> str:
        return "from dependency"

    @broker.task
    async def hello(name: str = TaskiqDepends(default_name)) -> str:
        return name

    assert (await result_of(await hello.kiq())).return_value == "from dependency"
    assert (await result_of(await hello.kiq(name="sent"))).return_value == "sent"


async def test_custom_dependency_context_and_overrides(broker: InMemoryBroker) -> None:
    def real_settings() -> str:
        return "real"

    def test_settings() -> str:
        return "test"

    broker.add_dependency_context({Database: Database("primary")})
    broker.dependency_overrides[real_settings] = test_settings

    @broker.task
    async def use(
        db: Database = TaskiqDepends(), settings: str = TaskiqDepends(real_settings)
    ) -> str:
        return f"{db.name}/{settings}"

    assert (await result_of(await use.kiq())).return_value == "primary/test"


async def test_context_reject_saves_a_task_rejected_error(broker: InMemoryBroker) -> None:
    @broker.task
    async def refuse(context: Context = TaskiqDepends()) -> None:
        context.reject()

    result = await result_of(await refuse.kiq())
    assert result.is_err
    assert isinstance(result.error, TaskRejectedError)


async def test_context_requeue_runs_the_task_again(broker: InMemoryBroker) -> None:
    runs: list[Any] = []

    @broker.task
    async def flaky(context: Context = TaskiqDepends()) -> int:
        runs.append(context.message.labels.get("X-Taskiq-requeue"))
        if len(runs) == 1:
            await context.requeue()
        return len(runs)

    task = await flaky.kiq()
    result = await result_of(task)
    assert result.return_value == 2
    assert runs[0] is None and int(runs[1]) == 1


def test_the_inmemory_broker_is_an_async_broker() -> None:
    assert isinstance(InMemoryBroker(), AsyncBroker)


async def test_injecting_context_and_state_raises_no_warning(broker: InMemoryBroker) -> None:
    """Their ``__init__`` type hints resolve, so taskiq_dependencies has nothing to warn about."""

    @broker.task
    async def both(
        context: Context = TaskiqDepends(), state: TaskiqState = TaskiqDepends()
    ) -> bool:
        return context.state is state

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = await result_of(await both.kiq())
    assert result.return_value is True
    assert [str(w.message) for w in caught] == []
