"""Lifecycle events on an in-process broker: registration, order, sync/async, failures."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from pool import InMemoryBroker, TaskiqError, TaskiqEvents, TaskiqState
from pool.exceptions import EventHandlerError

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


def test_add_event_handler_accepts_the_event_name_as_a_string() -> None:
    broker = InMemoryBroker()

    def handler(state: TaskiqState) -> None:
        return None

    broker.add_event_handler("WORKER_SHUTDOWN", handler)  # type: ignore[arg-type]
    assert broker.event_handlers[TaskiqEvents.WORKER_SHUTDOWN] == [handler]
    with pytest.raises(ValueError):
        broker.add_event_handler("NOT_AN_EVENT", handler)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        broker.add_event_handler(TaskiqEvents.WORKER_STARTUP, "not callable")  # type: ignore[arg-type]


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


async def test_inmemory_broker_fires_worker_and_client_events_in_taskiq_order() -> None:
    fired: list[str] = []
    broker = InMemoryBroker()
    for event in ALL_EVENTS:
        broker.add_event_handler(event, lambda state, e=event: fired.append(e.value))

    await broker.startup()
    assert fired == ["WORKER_STARTUP", "CLIENT_STARTUP"]
    fired.clear()
    await broker.shutdown()
    assert fired == ["WORKER_SHUTDOWN", "CLIENT_SHUTDOWN"]


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
    assert (await (await is_open.kiq()).wait_result(timeout=5)).return_value is True
    await broker.shutdown()
    assert closed == ["client"]


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
async def test_raising_worker_startup_handler_fails_startup_with_a_taskiq_error(
    asynchronous: bool,
) -> None:
    broker = InMemoryBroker()
    later: list[str] = []

    if asynchronous:

        async def failing(state: TaskiqState) -> None:
            raise ConnectionError("database unreachable")

    else:

        def failing(state: TaskiqState) -> None:
            raise ConnectionError("database unreachable")

    broker.add_event_handler(TaskiqEvents.WORKER_STARTUP, failing)
    broker.add_event_handler(TaskiqEvents.WORKER_STARTUP, lambda state: later.append("ran"))
    broker.add_event_handler(TaskiqEvents.CLIENT_STARTUP, lambda state: later.append("client"))

    with pytest.raises(TaskiqError) as info:
        await broker.startup()
    error = info.value
    assert isinstance(error, EventHandlerError)
    assert isinstance(error.__cause__, ConnectionError)
    message = str(error)
    assert "WORKER_STARTUP" in message
    assert "failing" in message
    assert "database unreachable" in message
    assert later == []  # the start stopped at the failing handler


async def test_raising_client_startup_handler_fails_startup_too() -> None:
    broker = InMemoryBroker()

    @broker.on_event(TaskiqEvents.CLIENT_STARTUP)
    def failing(state: TaskiqState) -> None:
        raise RuntimeError("no config")

    with pytest.raises(EventHandlerError, match="CLIENT_STARTUP"):
        await broker.startup()


@pytest.mark.parametrize("event", [TaskiqEvents.WORKER_SHUTDOWN, TaskiqEvents.CLIENT_SHUTDOWN])
async def test_raising_shutdown_handler_is_logged_and_the_rest_still_run(
    event: TaskiqEvents, caplog: pytest.LogCaptureFixture
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
    with caplog.at_level(logging.ERROR):
        await broker.shutdown()  # does not raise
    assert ran == ["first", "exploding", "last"]
    records = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(
        "exploding" in r.getMessage() and r.exc_info and "close failed" in str(r.exc_info[1])
        for r in records
    ), [r.getMessage() for r in records]


async def test_raising_worker_shutdown_handler_does_not_skip_client_shutdown() -> None:
    broker = InMemoryBroker()
    ran: list[str] = []

    @broker.on_event(TaskiqEvents.WORKER_SHUTDOWN)
    def failing(state: TaskiqState) -> None:
        raise RuntimeError("boom")

    @broker.on_event(TaskiqEvents.CLIENT_SHUTDOWN)
    def client_down(state: TaskiqState) -> None:
        ran.append("client")

    await broker.startup()
    await broker.shutdown()
    assert ran == ["client"]


async def test_broker_can_start_again_after_shutdown() -> None:
    broker = InMemoryBroker()
    starts: list[int] = []
    broker.add_event_handler(TaskiqEvents.WORKER_STARTUP, lambda state: starts.append(1))

    @broker.task
    def sync_task() -> str:
        return "ran"

    for _ in range(2):
        await broker.startup()
        assert (await (await sync_task.kiq()).wait_result(timeout=5)).return_value == "ran"
        await broker.shutdown()
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
