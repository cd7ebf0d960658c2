"""taskiq's result contract on pool's subclasses, in-process (no pool running).

``PoolResultBackend`` (a taskiq ``AsyncResultBackend``) keeps results pushed by the supervisor
and hands a worker's results to its pipe; ``PoolTask`` / ``PoolKicker`` /
``PoolDecoratedTask`` (pool/extensions/handles.py) are taskiq's handle, kicker and decorated
task, waiting on a pushed result where the backend offers one and exactly as taskiq's
otherwise. Here the supervisor's side is played by calling ``deliver`` directly.
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import pytest
import taskiq
from pydantic import BaseModel
from taskiq.depends.progress_tracker import TaskProgress, TaskState

import pool
from pool import (
    InmemoryResultBackend,
    PickleSerializer,
    PoolBroker,
    PoolResultBackend,
    SendTaskError,
    TaskiqResult,
    TaskiqResultTimeoutError,
)
from pool.extensions.handles import PoolDecoratedTask, PoolKicker, PoolTask

pytestmark = pytest.mark.timeout(30)


class QuotaExceeded(Exception):
    """A user's exception class, importable from this module."""


class Point(BaseModel):
    x: int
    y: int


def ok(value: Any, **fields: Any) -> TaskiqResult[Any]:
    return TaskiqResult(is_err=False, return_value=value, execution_time=0.25, **fields)


@pytest.fixture
def broker(tmp_path: Path) -> PoolBroker:
    """A producer's PoolBroker whose run directory has no pool: nothing answers there."""
    return PoolBroker(run_dir=tmp_path / "no-pool", connect_timeout=0.2)


class FakeLink:
    """The worker's pipe to the supervisor, as PoolBroker's ``worker_link`` sees it."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[tuple[int, str, bytes]] = asyncio.Queue()
        self.saved: list[tuple[str, bytes]] = []
        self.progress: list[tuple[str, bytes]] = []

    def acknowledge(self, delivery: int, task_id: str) -> None:
        return None

    def save_result(self, task_id: str, payload: bytes) -> None:
        self.saved.append((task_id, payload))

    def save_progress(self, task_id: str, payload: bytes) -> None:
        self.progress.append((task_id, payload))


def test_pools_result_classes_subclass_taskiqs() -> None:
    assert issubclass(PoolResultBackend, taskiq.AsyncResultBackend)
    assert issubclass(PoolTask, taskiq.AsyncTaskiqTask)
    assert issubclass(PoolKicker, pool.AsyncKicker)
    assert issubclass(PoolDecoratedTask, taskiq.AsyncTaskiqDecoratedTask)


def test_a_pool_broker_uses_its_pool_backend_and_pools_decorated_task(
    broker: PoolBroker,
) -> None:
    assert isinstance(broker.result_backend, PoolResultBackend)

    @broker.task
    async def add(a: int, b: int) -> int:
        return a + b

    assert isinstance(add, PoolDecoratedTask)
    assert isinstance(add.kicker(), PoolKicker)
    assert add.kicker().with_labels(x=1).labels == {"x": 1}
    assert add.labels == {}


# ------------------------------------------------------------------ encoding
def test_a_result_round_trips_with_its_fields(broker: PoolBroker) -> None:
    backend = broker.pool_results
    result = ok({"rows": [1, 2]}, labels={"team": "core", "priority": 3})
    assert backend.decode(backend.encode(result)) == result


def test_a_users_exception_comes_back_as_its_own_class(broker: PoolBroker) -> None:
    backend = broker.pool_results
    failed = TaskiqResult(
        is_err=True, return_value=None, execution_time=0.0, error=QuotaExceeded("over 100")
    )
    back = backend.decode(backend.encode(failed))
    assert back.is_err
    assert type(back.error) is QuotaExceeded
    with pytest.raises(QuotaExceeded, match="over 100"):
        back.raise_for_error()


def test_a_value_the_serializer_refuses_becomes_an_error_result(broker: PoolBroker) -> None:
    backend = broker.pool_results
    back = backend.decode(backend.encode(ok(object(), labels={"kept": True})))
    assert back.is_err
    assert isinstance(back.error, TypeError)
    assert "JSONSerializer" in str(back.error)
    assert back.labels == {"kept": True}
    assert back.execution_time == 0.25


def test_results_use_the_brokers_serializer(broker: PoolBroker) -> None:
    broker.with_serializer(PickleSerializer())
    data = broker.pool_results.encode(ok([1]))
    assert data[:1] == b"\x80"  # a pickle, not JSON
    assert broker.pool_results.decode(data).return_value == [1]


# ------------------------------------------------------------------ worker and producer sides
async def test_in_a_worker_set_result_hands_the_encoded_result_to_the_pipe(
    broker: PoolBroker,
) -> None:
    link = FakeLink()
    broker.worker_link = link
    await broker.result_backend.set_result("t-1", ok("done"))
    ((task_id, payload),) = link.saved
    assert task_id == "t-1"
    assert broker.pool_results.decode(payload).return_value == "done"


async def test_in_a_producer_set_result_is_refused(broker: PoolBroker) -> None:
    with pytest.raises(RuntimeError):
        await broker.result_backend.set_result("t-1", ok("done"))


async def test_a_pushed_result_is_ready_and_read_back(broker: PoolBroker) -> None:
    backend = broker.pool_results
    backend.deliver("t-1", backend.encode(ok(Point(x=1, y=2))))
    assert await backend.is_result_ready("t-1")
    assert (await backend.get_result("t-1")).return_value == {"x": 1, "y": 2}
    await asyncio.wait_for(backend.wait_ready("t-1", timeout=1), 5)
    handle = PoolTask("t-1", backend, return_type=Point)
    assert (await handle.get_result()).return_value == Point(x=1, y=2)


async def test_a_result_nobody_has_is_not_ready_and_cannot_be_read(broker: PoolBroker) -> None:
    backend = broker.result_backend
    assert not await backend.is_result_ready("missing")
    with pytest.raises(pool.ResultGetError):
        await backend.get_result("missing")


async def test_the_oldest_results_are_dropped_unless_a_live_handle_holds_them(
    broker: PoolBroker,
) -> None:
    backend = broker.pool_results
    backend.max_stored_results = 2
    held = PoolTask("a", backend)
    backend.track("a", held)
    for task_id in ("a", "b", "c", "d"):
        backend.deliver(task_id, backend.encode(ok(task_id)))
    assert (await held.get_result()).return_value == "a"  # pinned by its handle
    assert not await backend.is_result_ready("b")  # dropped: no handle
    assert [(await backend.get_result(t)).return_value for t in "cd"] == ["c", "d"]
    del held
    gc.collect()
    assert not await backend.is_result_ready("a")


async def test_a_newer_handle_of_the_same_task_keeps_its_result_when_the_older_dies(
    broker: PoolBroker,
) -> None:
    backend = broker.pool_results
    backend.max_stored_results = 1
    older, newer = PoolTask("a", backend), PoolTask("a", backend)
    backend.track("a", older)
    backend.track("a", newer)  # the task sent again (a rerun): its new handle
    backend.deliver("a", backend.encode(ok("a")))
    backend.deliver("b", backend.encode(ok("b")))  # pushes "a" out of the stored results
    del older
    gc.collect()
    assert (await newer.get_result()).return_value == "a"
    del newer
    gc.collect()
    assert not await backend.is_result_ready("a")


async def test_a_tracked_handle_costs_the_collector_two_objects(broker: PoolBroker) -> None:
    """What a producer with many tasks in flight makes the garbage collector walk."""
    backend = broker.pool_results
    gc.collect()
    before = len(gc.get_objects())
    handles = [PoolTask(f"t-{i}", backend) for i in range(1000)]
    for handle in handles:
        backend.track(handle.task_id, handle)
    assert len(gc.get_objects()) - before <= 2 * len(handles) + 10  # the handle, its ref


# ------------------------------------------------------------------ waiting on a handle
async def test_wait_result_returns_when_the_result_is_pushed(broker: PoolBroker) -> None:
    backend = broker.pool_results
    backend.expect("t-1")  # sent on this connection: its result comes unasked
    handle = PoolTask("t-1", backend)
    waiting = asyncio.create_task(handle.wait_result(timeout=5))
    await asyncio.sleep(0)  # let the handle start waiting
    assert not waiting.done()
    backend.deliver("t-1", backend.encode(ok(42)))
    assert (await asyncio.wait_for(waiting, 5)).return_value == 42


async def test_wait_result_times_out_as_taskiqs_does(broker: PoolBroker) -> None:
    with pytest.raises(TaskiqResultTimeoutError):
        await PoolTask("never", broker.pool_results).wait_result(timeout=0.1)


class PushingBackend(InmemoryResultBackend[Any]):
    """An in-memory backend that also offers ``wait_ready`` (pool's PushedResults)."""

    def __init__(self) -> None:
        super().__init__()
        self.waits: list[tuple[str, float | None]] = []
        self.polls = 0

    async def wait_ready(self, task_id: str, timeout: float | None) -> None:
        self.waits.append((task_id, timeout))

    async def is_result_ready(self, task_id: str) -> bool:
        self.polls += 1
        return await super().is_result_ready(task_id)


@pytest.mark.parametrize(("timeout", "expected"), [(3.0, 3.0), (0, None), (-1, None)])
async def test_a_pushed_backend_is_waited_on_not_polled(
    timeout: float, expected: float | None
) -> None:
    """taskiq's meaning of the timeout: 0 or less waits for ever."""
    backend = PushingBackend()
    await backend.set_result("t", ok("v"))
    result = await PoolTask("t", backend).wait_result(timeout=timeout)
    assert result.return_value == "v"
    assert backend.waits == [("t", expected)]
    assert backend.polls == 0


async def test_any_other_backend_is_polled_as_taskiqs_handle_does() -> None:
    backend = InmemoryResultBackend[Any]()
    handle = PoolTask("t", backend)
    with pytest.raises(TaskiqResultTimeoutError):
        await handle.wait_result(check_interval=0.01, timeout=0.05)
    await backend.set_result("t", ok("late"))
    assert (await handle.wait_result(check_interval=0.01, timeout=5)).return_value == "late"


# ------------------------------------------------------------------ the kicker
async def test_the_kicker_hands_out_a_pool_task_and_tracks_it() -> None:
    broker = pool.InMemoryBroker()
    broker.decorator_class = PoolDecoratedTask
    tracked: list[tuple[str, Any]] = []
    broker.result_backend.track = lambda task_id, handle: tracked.append((task_id, handle))  # type: ignore[attr-defined]

    @broker.task
    async def make() -> Point:
        return Point(x=3, y=4)

    handle = await make.kiq()
    assert isinstance(handle, PoolTask)
    assert handle.return_type is Point
    assert tracked == [(handle.task_id, handle)]
    assert (await handle.wait_result(timeout=5, check_interval=0.01)).return_value == Point(
        x=3, y=4
    )


async def test_kiq_with_no_pool_raises_send_task_error_naming_the_run_directory(
    broker: PoolBroker,
) -> None:
    @broker.task
    async def add(a: int, b: int) -> int:
        return a + b

    with pytest.raises(SendTaskError) as info:
        await asyncio.wait_for(add.kiq(1, 2), 10)
    assert isinstance(info.value, pool.PoolUnavailableError)  # the reason, not a bare wrapper
    assert str(broker.run_dir) in str(info.value)


# ------------------------------------------------------------------ pool's errors in results
@pytest.mark.parametrize(
    "error",
    [
        pool.WorkerCrashedError("the task killed 3 workers"),
        pool.WorkerCrashedError(),
        pool.PoolUnavailableError("no pool is running in /srv/app/.pool"),
        pool.TaskNotFoundError(reason="task 'gone' is not registered", task_name="gone"),
    ],
    ids=repr,
)
def test_pools_errors_come_back_from_a_result_as_their_class_with_their_reason(
    broker: PoolBroker, error: Exception
) -> None:
    backend = broker.pool_results
    failed = TaskiqResult(is_err=True, return_value=None, execution_time=0.0, error=error)
    back = backend.decode(backend.encode(failed)).error
    assert type(back) is type(error)
    assert str(back) == str(error)
    assert isinstance(back, taskiq.TaskiqError)


def test_a_task_not_found_error_from_a_result_keeps_its_task_name(broker: PoolBroker) -> None:
    backend = broker.pool_results
    error = pool.TaskNotFoundError(reason="task 'gone' is not registered", task_name="gone")
    failed = TaskiqResult(is_err=True, return_value=None, execution_time=0.0, error=error)
    back = backend.decode(backend.encode(failed)).error
    assert isinstance(back, pool.TaskNotFoundError)
    assert back.task_name == "gone"


# ------------------------------------------------------------------ progress
async def test_in_a_worker_progress_is_kept_here_and_sent_down_the_pipe(
    broker: PoolBroker,
) -> None:
    link = FakeLink()
    broker.worker_link = link
    backend = broker.result_backend
    await backend.set_progress("t-1", TaskProgress(state=TaskState.STARTED, meta={"done": 3}))
    progress = await backend.get_progress("t-1")
    assert progress is not None
    assert (progress.state, progress.meta) == (TaskState.STARTED, {"done": 3})
    ((task_id, payload),) = link.progress
    assert task_id == "t-1"
    assert broker.serializer.loadb(payload)["meta"] == {"done": 3}


async def test_in_a_producer_progress_is_set_by_the_workers_only(broker: PoolBroker) -> None:
    with pytest.raises(RuntimeError):
        await broker.result_backend.set_progress("t-1", TaskProgress(state="x", meta=None))


async def test_asking_for_progress_again_after_a_failure_asks_the_pool_again(
    broker: PoolBroker,
) -> None:
    for _ in range(2):
        with pytest.raises(SendTaskError):
            await asyncio.wait_for(broker.result_backend.get_progress("t-1"), 2)
