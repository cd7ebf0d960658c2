"""The tasks the benchmarks send to a pool."""

from __future__ import annotations

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
