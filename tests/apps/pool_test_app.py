"""The app the pool tests run under `python -m pool run pool_test_app:broker`."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from pathlib import Path

from pool import PoolBroker, TaskiqEvents, TaskiqState

broker = PoolBroker()
MARKS = os.environ.get("POOL_TEST_MARKS")


def mark(name: str, text: str = "") -> None:
    """Leave a file the test can wait for (events happen in other processes)."""
    if MARKS:
        path = Path(MARKS) / name
        path.write_text(text or str(os.getpid()))


@broker.on_event(TaskiqEvents.WORKER_STARTUP)
async def on_startup(state: TaskiqState) -> None:
    if os.environ.get("POOL_TEST_HANG_STARTUP"):
        await asyncio.Event().wait()  # a handler that never returns
    if os.environ.get("POOL_TEST_FAIL_STARTUP"):
        raise RuntimeError("database unreachable (test)")
    switch = os.environ.get("POOL_TEST_FAIL_STARTUP_IF")
    if switch and os.path.exists(switch):
        raise RuntimeError("cache unreachable (test switch)")
    state.incr("workers_started")
    state.set_value("client", threading.Lock())  # unpicklable: stays in this worker
    mark(f"startup-{os.getpid()}")


@broker.on_event(TaskiqEvents.WORKER_SHUTDOWN)
async def on_shutdown(state: TaskiqState) -> None:
    state.incr("workers_stopped")
    mark(f"shutdown-{os.getpid()}")


@broker.task
async def add(a: int, b: int) -> int:
    return a + b


@broker.task
async def noop() -> None:
    return None


@broker.task
def whoami() -> int:
    return os.getpid()


@broker.task
def incr_many(key: str, times: int) -> int:
    for _ in range(times):
        broker.state.incr(key)
    return os.getpid()


@broker.task
def set_value(key: str, value: object) -> int:
    broker.state.set_value(key, value)
    return os.getpid()


@broker.task
def get_value(key: str) -> list[object]:
    return [broker.state.get_value(key), os.getpid()]


@broker.task
def local_client_info() -> list[object]:
    """The unpicklable value set at startup: local to this worker, never shared."""
    return [broker.state.is_shared("client"), "client" in list(broker.state.keys()), os.getpid()]


@broker.task
async def block_until(path: str, tag: str, limit: float = 30.0) -> list[object]:
    """Start, say so, and wait until the test creates ``path``."""
    mark(f"running-{tag}", f"{os.getpid()}")
    deadline = time.monotonic() + limit
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        await asyncio.sleep(0.01)
    return [tag, os.getpid()]


@broker.task
async def sleep_then_mark(seconds: float, tag: str) -> str:
    mark(f"running-{tag}")
    await asyncio.sleep(seconds)
    mark(f"finished-{tag}")
    return tag


@broker.task
def poison() -> None:
    """Kills whichever worker runs it."""
    os.kill(os.getpid(), signal.SIGKILL)


@broker.task
def fail(message: str) -> None:
    raise ValueError(message)


@broker.task
def count_run(tag: str) -> int:
    """Counts how often a task with this tag ran, across workers."""
    return int(broker.state.incr(f"runs-{tag}"))


_hoard: list[bytes] = []


@broker.task
def hog(megabytes: int) -> int:
    """Grow this worker's RSS by ``megabytes`` and keep it."""
    _hoard.append(os.urandom(megabytes * 1024 * 1024))
    return os.getpid()


@broker.task
async def block_loop_once(tag: str, seconds: float) -> int:
    """The first run blocks its worker's event loop (a bug users make); later runs do not."""
    if MARKS and not (Path(MARKS) / f"blocked-{tag}").exists():
        mark(f"blocked-{tag}")
        time.sleep(seconds)
    return os.getpid()


@broker.task
async def balloon(step_mb: int, steps: int) -> int:
    """Grow by ``step_mb`` every 20 ms, writing the RSS reached to a mark each time: a
    task whose memory grows without bound."""
    import psutil

    me = psutil.Process()
    held = []
    for _ in range(steps):
        held.append(os.urandom(step_mb * 1024 * 1024))
        mark("balloon-rss", str(me.memory_info().rss))
        await asyncio.sleep(0.02)
    return len(held)
