"""The app of the pool-on-Redis tests: `python -m pool run redis_test_app:broker`."""

from __future__ import annotations

import asyncio
import os

import taskiq

from pool import TaskiqEvents, TaskiqState
from pool.redis import RedisResultBackend, RedisStreamBroker

URL = os.environ.get("POOL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("POOL_TEST_QUEUE", "pooltest:queue")


def make_broker(url: str = URL, queue: str = QUEUE) -> RedisStreamBroker:
    """The same broker for workers and for the test that sends the tasks."""
    idle_ms = int(float(os.environ.get("POOL_TEST_IDLE", "2")) * 1000)
    return RedisStreamBroker(
        url, queue_name=queue, consumer_group_name=queue, idle_timeout=idle_ms, xread_block=200
    ).with_result_backend(RedisResultBackend(url, prefix_str=f"{queue}:result", result_ex_time=600))


broker = make_broker()


@broker.on_event(TaskiqEvents.WORKER_STARTUP)
async def on_startup(state: taskiq.TaskiqState) -> None:
    assert isinstance(state, TaskiqState)  # under `pool run`: pool's shared state
    state.incr("workers_started")


@broker.task(task_name="whoami")
async def whoami(delay: float = 0.0) -> int:
    if delay:
        await asyncio.sleep(delay)
    return os.getpid()


@broker.task(task_name="count_run")
def count_run(tag: str) -> list[int]:
    """How often a task with this tag ran, across every pool, and where."""
    return [int(broker.state.incr(f"runs-{tag}")), os.getpid()]


@broker.task(task_name="poison")
def poison() -> None:
    """Kills whichever worker runs it."""
    import signal

    os.kill(os.getpid(), signal.SIGKILL)
