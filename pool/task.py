"""Handles to sent tasks: poll, wait, read the result."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Generic, TypeVar

if TYPE_CHECKING:
    from pool.result import TaskiqResult
    from pool.result_backend import AsyncResultBackend

_ReturnType = TypeVar("_ReturnType")


class AsyncTaskiqTask(Generic[_ReturnType]):
    """A task that was sent. Use it to wait for, or read, its result."""

    def __init__(self, task_id: str, result_backend: AsyncResultBackend[_ReturnType]) -> None:
        self.task_id = task_id
        self.result_backend = result_backend

    async def is_ready(self) -> bool:
        """True once the result is saved."""
        return await self.result_backend.is_result_ready(self.task_id)

    async def get_result(self, with_logs: bool = False) -> TaskiqResult[_ReturnType]:
        """The saved result (``ResultGetError`` when there is none yet)."""
        return await self.result_backend.get_result(self.task_id, with_logs=with_logs)

    async def wait_result(
        self,
        check_interval: float = 0.2,
        timeout: float = -1,
        with_logs: bool = False,
    ) -> TaskiqResult[_ReturnType]:
        """Wait until the result is saved; ``TaskiqResultTimeoutError`` after ``timeout`` s.

        A negative ``timeout`` waits forever.
        """
        return await self.result_backend.wait_result(
            self.task_id, check_interval=check_interval, timeout=timeout, with_logs=with_logs
        )

    async def get_progress(self) -> Any:
        """The progress the task reported, or ``None``."""
        return await self.result_backend.get_progress(self.task_id)

    def __repr__(self) -> str:
        return f"AsyncTaskiqTask(task_id={self.task_id!r})"


async def gather(
    *tasks: AsyncTaskiqTask[Any],
    timeout: float = -1,
    with_logs: bool = False,
    periodicity: float = 0.1,
) -> tuple[TaskiqResult[Any], ...]:
    """Wait for several tasks at once and return their results in order."""
    results = await asyncio.gather(
        *(
            task.wait_result(check_interval=periodicity, timeout=timeout, with_logs=with_logs)
            for task in tasks
        )
    )
    return tuple(results)
