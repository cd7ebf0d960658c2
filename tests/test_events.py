"""Lifecycle events, taskiq's: registration, order, sync/async, failures; on pool's brokers.

taskiq's meaning (SPEC 3): ``AsyncBroker.startup`` fires CLIENT_STARTUP, or WORKER_STARTUP
when ``is_worker_process``; taskiq's ``InMemoryBroker`` fires both, client first. A raising
handler's exception propagates unchanged and the handlers after it do not run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pool import InMemoryBroker, PoolBroker, TaskiqEvents, TaskiqState

ALL_EVENTS = list(TaskiqEvents)


def test_on_event_registers_one_handler_for_several_events() -> None:
    broker = InMemoryBroker()

    @broker.on_event(TaskiqEvents.CLIENT_STARTUP, TaskiqEvents.WORKER_STARTUP)
    async def handler(state: TaskiqState) -> None:
        return None

    assert handler is not None and callable(handler)  # the decorator returns the handler
    assert broker.event_handlers[TaskiqEvents.CLIENT_STARTUP] == [handler]
    assert broker.event_handlers[TaskiqEvents.WORKER_STARTUP] == [handler]
    assert broker.event_handlers[TaskiqEvents.WORKER_SHUTDOWN] == []


def test_events_are_taskiqs_enum_with_their_names_as_values() -> None:
    assert {event.value for event in TaskiqEvents} == {
        "CLIENT_STARTUP",
        "CLIENT_SHUTDOWN",
        "WORKER_STARTUP",
        "WORKER_SHUTDOWN",
    }
    assert TaskiqEvents("WORKER_STARTUP") is TaskiqEvents.WORKER_STARTUP


def test_with_event_handlers_is_chainable() -> None:
    def one(state: TaskiqState) -> None:
        return None

    async def two(state: TaskiqState) -> None:
        return None

    def three(state: TaskiqState) -> None:
        return None

    broker = InMemoryBroker()
    returned = broker.with_event_handlers(
        TaskiqEvents.WORKER_STARTUP, one, two
    ).with_event_handlers(TaskiqEvents.WORKER_SHUTDOWN, three)
    assert returned is broker
    assert broker.event_handlers[TaskiqEvents.WORKER_STARTUP] == [one, two]
    assert broker.event_handlers[TaskiqEvents.WORKER_SHUTDOWN] == [three]


async def test_handlers_run_in_registration_order_across_the_three_ways() -> None:
    calls: list[str] = []
    broker = InMemoryBroker()

    def make(name: str, asynchronous: bool) -> Any:
        if asynchronous:

            async def handler(state: TaskiqState) -> None:
                calls.append(name)

        else:

            def handler(state: TaskiqState) -> None:
                calls.append(name)

        return handler

    broker.on_event(TaskiqEvents.WORKER_STARTUP)(make("decorator-sync", False))
    broker.add_event_handler(TaskiqEvents.WORKER_STARTUP, make("add-async", True))
    broker.with_event_handlers(
        TaskiqEvents.WORKER_STARTUP, make("builder-sync", False), make("builder-async", True)
    )
    broker.on_event(TaskiqEvents.WORKER_STARTUP)(make("decorator-async", True))
    await broker.startup()
    assert calls == [
        "decorator-sync",
        "add-async",
        "builder-sync",
        "builder-async",
        "decorator-async",
    ]
    await broker.shutdown()


async def test_sync_and_async_handlers_get_the_broker_state() -> None:
    broker = InMemoryBroker()
    seen: list[Any] = []

    @broker.on_event(TaskiqEvents.WORKER_STARTUP)
    def sync_handler(state: TaskiqState) -> None:
        seen.append(state)
        state.set_value("sync", True)

    @broker.on_event(TaskiqEvents.WORKER_STARTUP)
    async def async_handler(state: TaskiqState) -> None:
        seen.append(state)
        state.async_ = True

    await broker.startup()
    assert seen == [broker.state, broker.state]
    assert seen[0] is broker.state
    assert broker.state.get_value("sync") is True
    assert broker.state.async_ is True
    await broker.shutdown()


async def test_inmemory_broker_fires_client_then_worker_events() -> None:
    fired: list[str] = []
    broker = InMemoryBroker()
    for event in ALL_EVENTS:
        broker.add_event_handler(event, lambda state, e=event: fired.append(e.value))

    await broker.startup()
    assert fired == ["CLIENT_STARTUP", "WORKER_STARTUP"]
    fired.clear()
    await broker.shutdown()
    assert fired == ["CLIENT_SHUTDOWN", "WORKER_SHUTDOWN"]


@pytest.mark.parametrize(
    ("is_worker", "expected"),
    [
        (False, ["CLIENT_STARTUP", "CLIENT_SHUTDOWN"]),
        (True, ["WORKER_STARTUP", "WORKER_SHUTDOWN"]),
    ],
    ids=["producer", "worker"],
)
async def test_pool_broker_fires_client_or_worker_events_as_taskiq_says(
    tmp_path: Path, is_worker: bool, expected: list[str]
) -> None:
    """No pool needs to run: starting and stopping a producer connects to nothing."""
    fired: list[str] = []
    broker = PoolBroker(run_dir=tmp_path)
    broker.is_worker_process = is_worker
    for event in ALL_EVENTS:
        broker.add_event_handler(event, lambda state, e=event: fired.append(e.value))
    async with broker:
        assert fired == expected[:1]
    assert fired == expected


async def test_a_pool_broker_producers_state_has_the_seeds_api(tmp_path: Path) -> None:
    broker = PoolBroker(run_dir=tmp_path)

    @broker.on_event(TaskiqEvents.CLIENT_STARTUP)
    def remember(state: TaskiqState) -> None:
        state.set_value("started", True)

    async with broker:
        assert isinstance(broker.state, TaskiqState)
        assert broker.state.get_value("started") is True


async def test_handlers_for_other_events_do_not_run() -> None:
    fired: list[str] = []
    broker = InMemoryBroker()
    broker.add_event_handler(TaskiqEvents.WORKER_SHUTDOWN, lambda state: fired.append("down"))
    await broker.startup()
    assert fired == []
    await broker.shutdown()
    assert fired == ["down"]


async def test_startup_state_is_visible_to_tasks_and_shutdown_handlers() -> None:
    broker = InMemoryBroker()
    closed: list[str] = []

    class Client:
        def __init__(self) -> None:
            self.open = True

        async def close(self) -> None:
            self.open = False
            closed.append("client")

    @broker.on_event(TaskiqEvents.WORKER_STARTUP)
    async def connect(state: TaskiqState) -> None:
        state.client = Client()

    @broker.on_event(TaskiqEvents.WORKER_SHUTDOWN)
    async def disconnect(state: TaskiqState) -> None:
        await state.client.close()

    @broker.task
    async def is_open() -> bool:
        return bool(broker.state.client.open)

    await broker.startup()
    result = await (await is_open.kiq()).wait_result(timeout=5, check_interval=0.01)
    assert result.return_value is True
    await broker.shutdown()
    assert closed == ["client"]


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
async def test_a_raising_startup_handler_fails_startup_with_its_own_error(
    asynchronous: bool,
) -> None:
    broker = InMemoryBroker()
    ran: list[str] = []

    if asynchronous:

        async def failing(state: TaskiqState) -> None:
            raise ConnectionError("database unreachable")

    else:

        def failing(state: TaskiqState) -> None:
            raise ConnectionError("database unreachable")

    broker.add_event_handler(TaskiqEvents.CLIENT_STARTUP, lambda state: ran.append("client"))
    broker.add_event_handler(TaskiqEvents.WORKER_STARTUP, failing)
    broker.add_event_handler(TaskiqEvents.WORKER_STARTUP, lambda state: ran.append("later"))

    with pytest.raises(ConnectionError, match="database unreachable"):
        await broker.startup()
    assert ran == ["client"]  # CLIENT_STARTUP comes first; nothing after the failure ran


@pytest.mark.parametrize("event", [TaskiqEvents.WORKER_SHUTDOWN, TaskiqEvents.CLIENT_SHUTDOWN])
async def test_a_raising_shutdown_handler_fails_shutdown_with_its_own_error(
    event: TaskiqEvents,
) -> None:
    broker = InMemoryBroker()
    ran: list[str] = []

    def first(state: TaskiqState) -> None:
        ran.append("first")

    async def exploding(state: TaskiqState) -> None:
        ran.append("exploding")
        raise RuntimeError("close failed")

    def last(state: TaskiqState) -> None:
        ran.append("last")

    broker.with_event_handlers(event, first, exploding, last)
    await broker.startup()
    with pytest.raises(RuntimeError, match="close failed"):
        await broker.shutdown()
    assert ran == ["first", "exploding"]


async def test_events_fire_again_when_the_broker_starts_again() -> None:
    broker = InMemoryBroker()
    starts: list[int] = []
    broker.add_event_handler(TaskiqEvents.WORKER_STARTUP, lambda state: starts.append(1))

    @broker.task
    async def async_task() -> str:
        return "ran"

    for _ in range(2):
        async with broker:
            result = await (await async_task.kiq()).wait_result(timeout=5, check_interval=0.01)
            assert result.return_value == "ran"
    assert starts == [1, 1]


async def test_inmemory_broker_in_a_worker_process_fires_each_event_once() -> None:
    fired: list[str] = []
    broker = InMemoryBroker()
    broker.is_worker_process = True
    for event in ALL_EVENTS:
        broker.add_event_handler(event, lambda state, e=event: fired.append(e.value))
    await broker.startup()
    await broker.shutdown()
    assert sorted(fired) == sorted(e.value for e in ALL_EVENTS)
