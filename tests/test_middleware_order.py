"""Middleware hooks, sync and async, run in taskiq's order; pre_send/pre_execute can rewrite.

taskiq's order: ``startup``, ``shutdown``, ``pre_send`` and ``pre_execute`` run in the order the
middlewares were added; ``post_send``, ``on_error``, ``post_execute`` and ``post_save`` in the
reverse order. ``on_error`` runs before ``post_execute``, ``post_save`` after the result is saved.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pool import AsyncTaskiqTask, InMemoryBroker, TaskiqMessage, TaskiqMiddleware, TaskiqResult

Log = list[tuple[str, str]]


async def result_of(task: AsyncTaskiqTask[Any]) -> TaskiqResult[Any]:
    return await task.wait_result(timeout=5, check_interval=0.01)


class SyncRecorder(TaskiqMiddleware):
    """Every hook, written as plain functions."""

    def __init__(self, name: str, log: Log) -> None:
        super().__init__()
        self.name, self.log = name, log

    def startup(self) -> None:
        self.log.append((self.name, "startup"))

    def shutdown(self) -> None:
        self.log.append((self.name, "shutdown"))

    def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
        self.log.append((self.name, "pre_send"))
        return message

    def post_send(self, message: TaskiqMessage) -> None:
        self.log.append((self.name, "post_send"))

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        self.log.append((self.name, "pre_execute"))
        return message

    def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        self.log.append((self.name, "post_execute"))

    def on_error(
        self, message: TaskiqMessage, result: TaskiqResult[Any], exception: BaseException
    ) -> None:
        self.log.append((self.name, f"on_error:{type(exception).__name__}"))

    def post_save(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        self.log.append((self.name, "post_save"))


class AsyncRecorder(TaskiqMiddleware):
    """Every hook, written as coroutines (each one really suspends)."""

    def __init__(self, name: str, log: Log) -> None:
        super().__init__()
        self.name, self.log = name, log

    async def _record(self, what: str) -> None:
        await asyncio.sleep(0)
        self.log.append((self.name, what))

    async def startup(self) -> None:
        await self._record("startup")

    async def shutdown(self) -> None:
        await self._record("shutdown")

    async def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
        await self._record("pre_send")
        return message

    async def post_send(self, message: TaskiqMessage) -> None:
        await self._record("post_send")

    async def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        await self._record("pre_execute")
        return message

    async def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        await self._record("post_execute")

    async def on_error(
        self, message: TaskiqMessage, result: TaskiqResult[Any], exception: BaseException
    ) -> None:
        await self._record(f"on_error:{type(exception).__name__}")

    async def post_save(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        await self._record("post_save")


def _both(hook: str) -> Log:
    """``hook`` of each middleware, in the order they were added."""
    return [("first", hook), ("second", hook)]


def _reversed(hook: str) -> Log:
    """``hook`` of each middleware, last added first."""
    return [("second", hook), ("first", hook)]


def _sending(log: Log) -> Log:
    return [entry for entry in log if entry[1] in ("pre_send", "post_send")]


def _running(log: Log) -> Log:
    return [entry for entry in log if entry[1] not in ("pre_send", "post_send")]


@pytest.mark.parametrize(
    ("first_cls", "second_cls"),
    [
        (SyncRecorder, SyncRecorder),
        (AsyncRecorder, AsyncRecorder),
        (SyncRecorder, AsyncRecorder),
        (AsyncRecorder, SyncRecorder),
    ],
    ids=["sync-sync", "async-async", "sync-async", "async-sync"],
)
async def test_hooks_run_in_taskiq_order(
    first_cls: type[TaskiqMiddleware], second_cls: type[TaskiqMiddleware]
) -> None:
    log: Log = []
    broker = InMemoryBroker().with_middlewares(
        first_cls("first", log),  # type: ignore[call-arg]
        second_cls("second", log),  # type: ignore[call-arg]
    )

    @broker.task
    async def ok() -> str:
        log.append(("task", "ok"))
        return "fine"

    @broker.task
    async def fail() -> None:
        log.append(("task", "fail"))
        raise ValueError("no")

    await broker.startup()
    assert log == _both("startup")

    log.clear()
    result = await result_of(await ok.kiq())
    assert result.return_value == "fine"
    # InMemoryBroker runs the task on its own asyncio task: post_send may interleave with
    # the execution hooks, so each side's order is checked on its own
    assert _sending(log) == _both("pre_send") + _reversed("post_send")
    assert _running(log) == [
        *_both("pre_execute"),
        ("task", "ok"),
        *_reversed("post_execute"),
        *_reversed("post_save"),
    ]
    assert log[:2] == _both("pre_send")

    log.clear()
    result = await result_of(await fail.kiq())
    assert result.is_err
    assert _sending(log) == _both("pre_send") + _reversed("post_send")
    assert _running(log) == [
        *_both("pre_execute"),
        ("task", "fail"),
        *_reversed("on_error:ValueError"),
        *_reversed("post_execute"),
        *_reversed("post_save"),
    ]
    assert log[:2] == _both("pre_send")

    log.clear()
    await broker.shutdown()
    assert log == _both("shutdown")


async def test_await_inplace_runs_execute_hooks_between_pre_and_post_send() -> None:
    log: Log = []
    broker = InMemoryBroker(await_inplace=True).with_middlewares(
        SyncRecorder("first", log), AsyncRecorder("second", log)
    )

    @broker.task
    def ok() -> None:
        log.append(("task", "ok"))

    await result_of(await ok.kiq())
    assert log == [
        *_both("pre_send"),
        *_both("pre_execute"),
        ("task", "ok"),
        *_reversed("post_execute"),
        *_reversed("post_save"),
        *_reversed("post_send"),
    ]


async def test_post_save_sees_the_saved_result() -> None:
    seen: list[bool] = []

    class CheckSaved(TaskiqMiddleware):
        async def post_save(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
            seen.append(await self.broker.result_backend.is_result_ready(message.task_id))

        async def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
            seen.append(await self.broker.result_backend.is_result_ready(message.task_id))

    broker = InMemoryBroker().with_middlewares(CheckSaved())

    @broker.task
    async def ok() -> None:
        return None

    await result_of(await ok.kiq())
    assert seen == [False, True]


async def test_hooks_receive_the_message_and_result() -> None:
    got: dict[str, Any] = {}

    class Inspect(TaskiqMiddleware):
        def post_send(self, message: TaskiqMessage) -> None:
            got["sent"] = (message.task_name, message.args, message.kwargs)

        def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
            got["executed"] = (message.task_id, result.return_value)

        def on_error(
            self, message: TaskiqMessage, result: TaskiqResult[Any], exception: BaseException
        ) -> None:
            got["error"] = (result.is_err, exception)

    broker = InMemoryBroker().with_middlewares(Inspect())

    @broker.task(task_name="adder")
    async def adder(a: int, b: int = 0) -> int:
        return a + b

    @broker.task(task_name="broken")
    async def broken() -> None:
        raise KeyError("k")

    task = await adder.kiq(1, b=2)
    await result_of(task)
    assert got["sent"] == ("adder", [1], {"b": 2})
    assert got["executed"] == (task.task_id, 3)
    result = await result_of(await broken.kiq())
    is_err, exception = got["error"]
    assert is_err is True
    assert exception is result.error


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
async def test_pre_send_can_modify_the_message(asynchronous: bool) -> None:
    def rewrite(message: TaskiqMessage) -> TaskiqMessage:
        message.args = [arg * 10 for arg in message.args]
        message.labels["stamped"] = "yes"
        return message

    class SyncRewrite(TaskiqMiddleware):
        def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
            return rewrite(message)

    class AsyncRewrite(TaskiqMiddleware):
        async def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
            await asyncio.sleep(0)
            return rewrite(message)

    broker = InMemoryBroker().with_middlewares(AsyncRewrite() if asynchronous else SyncRewrite())

    @broker.task
    async def add(a: int, b: int) -> int:
        return a + b

    result = await result_of(await add.kiq(1, 2))
    assert result.return_value == 30
    assert result.labels == {"stamped": "yes"}


async def test_pre_send_can_return_a_new_message() -> None:
    class Replace(TaskiqMiddleware):
        def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
            return TaskiqMessage(
                task_id="replaced-id",
                task_name=message.task_name,
                labels={},
                args=["replaced"],
                kwargs={},
            )

    broker = InMemoryBroker().with_middlewares(Replace())

    @broker.task
    async def echo(value: str) -> str:
        return value

    task = await echo.kiq("original")
    assert task.task_id == "replaced-id"
    assert (await result_of(task)).return_value == "replaced"


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
async def test_pre_execute_can_modify_the_message(asynchronous: bool) -> None:
    seen: list[dict[str, Any]] = []

    def rewrite(message: TaskiqMessage) -> TaskiqMessage:
        message.kwargs["greeting"] = "hello"
        return message

    class SyncRewrite(TaskiqMiddleware):
        def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
            return rewrite(message)

    class AsyncRewrite(TaskiqMiddleware):
        async def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
            await asyncio.sleep(0)
            return rewrite(message)

    class Observe(TaskiqMiddleware):
        def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
            seen.append(dict(message.kwargs))

    broker = InMemoryBroker().with_middlewares(
        AsyncRewrite() if asynchronous else SyncRewrite(), Observe()
    )

    @broker.task
    async def greet(name: str, greeting: str = "hi") -> str:
        return f"{greeting} {name}"

    result = await result_of(await greet.kiq("ann"))
    assert result.return_value == "hello ann"
    assert seen == [{"greeting": "hello"}]  # later hooks see the rewritten message


async def test_pre_send_runs_before_the_next_middleware_sees_the_message() -> None:
    order: list[str] = []

    class AddA(TaskiqMiddleware):
        def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
            message.labels["trail"] = "a"
            return message

    class AddB(TaskiqMiddleware):
        def pre_send(self, message: TaskiqMessage) -> TaskiqMessage:
            message.labels["trail"] += "b"
            order.append(message.labels["trail"])
            return message

    broker = InMemoryBroker().with_middlewares(AddA(), AddB())

    @broker.task
    async def noop() -> None:
        return None

    result = await result_of(await noop.kiq())
    assert order == ["ab"]
    assert result.labels["trail"] == "ab"


async def test_middleware_without_overrides_changes_nothing() -> None:
    broker = InMemoryBroker().with_middlewares(TaskiqMiddleware())

    @broker.task
    async def add(a: int, b: int) -> int:
        return a + b

    await broker.startup()
    assert (await result_of(await add.kiq(2, 2))).return_value == 4
    await broker.shutdown()


async def test_add_middlewares_sets_the_broker_on_each() -> None:
    first, second = TaskiqMiddleware(), TaskiqMiddleware()
    broker = InMemoryBroker()
    broker.add_middlewares(first, second)
    assert broker.middlewares == [first, second]
    assert first.broker is broker and second.broker is broker
