"""One taskiq app on the brokers of the ecosystem: `python -m pool run ecosystem_app:broker`.

``POOL_TEST_BROKER`` picks the broker (``eco_brokers.make_broker``). The test process builds
the same broker and sends with the broker's own ``kiq``. The app is plain taskiq: it imports
nothing from pool.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from taskiq import Context, TaskiqDepends, TaskiqEvents, TaskiqState

try:
    from eco_brokers import make_broker
except ImportError:  # imported by a test, as tests.apps.ecosystem_app
    from tests.apps.eco_brokers import make_broker

MARKS = os.environ.get("POOL_TEST_MARKS")
broker = make_broker()


def mark(name: str, text: str = "") -> None:
    """Leave a file the test can wait for (events happen in other processes)."""
    if MARKS:
        (Path(MARKS) / name).write_text(text or str(os.getpid()))


@broker.on_event(TaskiqEvents.WORKER_STARTUP)
async def on_startup(state: TaskiqState) -> None:
    state.incr("workers_started")
    state[f"worker-{os.getpid()}"] = os.getpid()
    mark(f"startup-{os.getpid()}")


@broker.on_event(TaskiqEvents.WORKER_SHUTDOWN)
async def on_shutdown(state: TaskiqState) -> None:
    state.incr("workers_stopped")
    mark(f"shutdown-{os.getpid()}")


@broker.task(task_name="eco.add")
async def add(a: int, b: int) -> int:
    return a + b


@broker.task(task_name="eco.whoami")
async def whoami(delay: float = 0.0) -> int:
    await asyncio.sleep(delay)
    return os.getpid()


@broker.task(task_name="eco.fail")
async def fail() -> None:
    raise ValueError("failed on purpose")


@broker.task(task_name="eco.workers_seen")
async def workers_seen(state: TaskiqState = TaskiqDepends()) -> list[int]:
    """The workers whose WORKER_STARTUP this worker's state shows."""
    return sorted(int(state[key]) for key in state if key.startswith("worker-"))


@broker.task(task_name="eco.slow")
async def slow(seconds: float, context: Context = TaskiqDepends()) -> str:
    mark(f"running-{context.message.task_id}")
    await asyncio.sleep(seconds)
    return "finished"


@broker.task(task_name="eco.block_loop_once")
async def block_loop_once(tag: str, seconds: float) -> int:
    """The first run blocks its worker's event loop (a bug users make); later runs do not."""
    if MARKS and not (Path(MARKS) / f"blocked-{tag}").exists():
        mark(f"blocked-{tag}")
        import time

        time.sleep(seconds)
    return os.getpid()
