"""The app of tests/test_bounds.py: tasks with big results."""

from __future__ import annotations

import asyncio
import os

from pool import PoolBroker

broker = PoolBroker()


@broker.task
async def blob(size: int, tag: str = "", release: str = "") -> list[object]:
    """A result of a little more than ``size`` bytes once serialized, once ``release``
    exists (when given); counts its runs under ``tag``."""
    while release and not os.path.exists(release):
        await asyncio.sleep(0.01)
    runs = broker.state.incr(f"runs-{tag}") if tag else 0
    return ["x" * size, runs, os.getpid()]


@broker.task
def runs(tag: str) -> int:
    return int(broker.state.get_value(f"runs-{tag}", 0))
