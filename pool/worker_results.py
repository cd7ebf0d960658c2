"""The result backend of a worker of the embedded pool."""

from __future__ import annotations

from typing import Any

from pool.pool_broker import PoolResultBackend
from pool.result import TaskiqResult


class WorkerResultBackend(PoolResultBackend):
    """Keeps a finished task's serialized result until the worker reports the task done.

    The supervisor stores the result and acknowledges the task in one step when the DONE
    frame arrives, so a result is never saved without its acknowledgement or the other
    way round. Reads (a task waiting for another task) go to the supervisor like a producer's.
    """

    def __init__(self, broker: Any) -> None:
        super().__init__(broker, broker.pool_results.max_stored_results)
        self._finished: dict[str, bytes] = {}

    async def set_result(self, task_id: str, result: TaskiqResult[Any]) -> None:
        self._finished[task_id] = self.broker.serializer.dumpb(result.to_dict())

    def pop(self, task_id: str) -> bytes:
        return self._finished.pop(task_id, b"")
