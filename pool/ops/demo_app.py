"""The app that ``python -m pool demo`` runs: tasks, lifecycle events and the shared state."""

from __future__ import annotations

import asyncio
import os

from pool import Context, PoolBroker, TaskiqDepends, TaskiqEvents, TaskiqState

broker = PoolBroker()


# taskiq types handlers as taking taskiq's TaskiqState; pool's subclass is what they get
@broker.on_event(TaskiqEvents.WORKER_STARTUP)  # type: ignore[arg-type]
async def on_worker_startup(state: TaskiqState) -> None:
    """Every worker registers itself in the shared state."""
    state.incr("workers_started")
    state.setdefault("started_by", os.getpid())


@broker.on_event(TaskiqEvents.WORKER_SHUTDOWN)  # type: ignore[arg-type]
async def on_worker_shutdown(state: TaskiqState) -> None:
    state.incr("workers_stopped")


@broker.task
async def square(x: int, context: Context = TaskiqDepends()) -> dict[str, int]:
    """An async task that counts itself in the shared state."""
    await asyncio.sleep(0.001)
    context.state.incr("squares")
    return {"x": x, "square": x * x, "pid": os.getpid()}


@broker.task
def word_count(text: str) -> int:
    """A sync task: it runs in the worker's thread pool."""
    return len(text.split())


@broker.task
def state_snapshot() -> dict[str, object]:
    """What the workers share: read from any worker, it is the same."""
    return {key: value for key, value in broker.state.items() if isinstance(value, (int, str))}
