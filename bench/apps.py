"""The tasks the benchmarks send to a pool."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from bench.workloads import spin
from pool import PoolBroker, TaskiqState

broker = PoolBroker()


@broker.task(task_name="noop")
async def noop() -> None:
    return None


@broker.task(task_name="cpu")
def cpu(n: int) -> int:
    return spin(n)


@broker.task(task_name="state_bench")
def state_bench(rounds: int) -> dict[str, Any]:
    """Time state operations from inside a worker (per operation, in microseconds)."""
    from bench.state_bench import time_state

    state: TaskiqState = broker.state
    return time_state(state, rounds)


@broker.task(task_name="chaos_run")
async def chaos_run(index: int) -> int:
    """Counts its own runs in the shared state, so that a second run is seen."""
    return int(broker.state.incr(f"chaos:{index}"))


RUNS = os.environ.get("BENCH_RUNS_FILE", "")


@broker.task(task_name="fault_run")
def fault_run(tag: str, pad: str = "") -> str:
    """Appends its tag to ``$BENCH_RUNS_FILE``: every run is counted, across pools."""
    fd = os.open(RUNS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{tag}\n".encode())
    finally:
        os.close(fd)
    return tag


@broker.task(task_name="poison")
def poison() -> None:
    """Kills whichever worker runs it."""
    os.kill(os.getpid(), signal.SIGKILL)


@broker.task(task_name="block_until")
async def block_until(path: str, limit: float = 300.0) -> None:
    """Holds its worker until ``path`` exists."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not os.path.exists(path) and loop.time() < deadline:
        await asyncio.sleep(0.01)
