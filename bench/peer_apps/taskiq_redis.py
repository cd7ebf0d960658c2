"""taskiq 0.13 + taskiq-redis (``bench.taskiq_app``), workers under ``taskiq worker``.

The producer awaits with ``wait_result(check_interval=BENCH_POLL)``: taskiq-redis's result
backend is polled (taskiq's default interval: 0.2 s).
"""

from __future__ import annotations

import asyncio
from typing import Any

from bench.peer_apps import POLL


class TaskiqDriver:
    """Any taskiq broker with a result backend, and its no-op task."""

    def __init__(self, broker: Any, task: Any) -> None:
        self.broker, self.task = broker, task

    async def start(self) -> None:
        await self.broker.startup()

    async def stop(self) -> None:
        await self.broker.shutdown()

    async def batch(self, n: int) -> None:
        await self._wait_all([await self.task.kiq() for _ in range(n)])

    async def batch_at_once(self, n: int) -> None:
        await self._wait_all(await asyncio.gather(*(self.task.kiq() for _ in range(n))))

    async def _wait_all(self, handles: list[Any]) -> None:
        for handle in handles:
            (await handle.wait_result(check_interval=POLL, timeout=120)).raise_for_error()

    async def one(self, timeout: float) -> None:
        handle = await self.task.kiq()
        (await handle.wait_result(check_interval=POLL, timeout=timeout)).raise_for_error()


def Driver() -> TaskiqDriver:
    from bench import taskiq_app

    return TaskiqDriver(taskiq_app.broker, taskiq_app.noop)
