"""The app of tests/test_observe.py: tasks that print, fail, retry and wait."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from pool import PoolBroker, SimpleRetryMiddleware, TaskiqEvents, TaskiqState

broker = PoolBroker().with_middlewares(SimpleRetryMiddleware(default_retry_count=3))
MARKS = os.environ.get("POOL_TEST_MARKS", "")


@broker.on_event(TaskiqEvents.WORKER_STARTUP)
async def on_startup(state: TaskiqState) -> None:
    if MARKS and (Path(MARKS) / "fail-startup").exists():
        raise RuntimeError("cache unreachable (test switch)")


@broker.task
def shout(text: str) -> int:
    print(f"out: {text}")
    print(f"err: {text}", file=sys.stderr)
    sys.stdout.write("two\nlines\n")
    return os.getpid()


@broker.task
async def noop() -> None:
    return None


@broker.task
def fail(message: str) -> None:
    raise ValueError(message)


@broker.task(retry_on_error=True, max_retries=2)
def flaky(tag: str) -> int:
    """Fails on its first run, succeeds on the second (the marks directory counts runs)."""
    path = Path(MARKS) / f"flaky-{tag}"
    if not path.exists():
        path.write_text("1")
        raise RuntimeError("first run fails")
    return 2


@broker.task
async def hold(path: str, tag: str, limit: float = 30.0) -> int:
    """Say it runs, then wait until the test creates ``path``."""
    (Path(MARKS) / f"running-{tag}").write_text(str(os.getpid()))
    deadline = time.monotonic() + limit
    while not os.path.exists(path) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return os.getpid()


@broker.task
async def block_loop(seconds: float) -> None:
    time.sleep(seconds)  # blocks the worker's event loop: no heartbeat meanwhile
