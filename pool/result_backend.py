"""Where results are kept until a producer reads them."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pool.exceptions import ResultGetError, TaskiqResultTimeoutError
from pool.result import TaskiqResult

if TYPE_CHECKING:
    from pool.task import AsyncTaskiqTask

_ReturnType = TypeVar("_ReturnType")


class AsyncResultBackend(ABC, Generic[_ReturnType]):
    """Stores task results. Subclasses implement set/get/is_ready; progress is optional."""

    def track(self, handle: AsyncTaskiqTask[Any]) -> None:
        """Told of every handle ``kiq`` returns; a backend may keep its result while it lives."""

    async def startup(self) -> None:
        """Open connections. Called by ``broker.startup()``."""

    async def shutdown(self) -> None:
        """Close connections. Called by ``broker.shutdown()``."""

    @abstractmethod
    async def set_result(self, task_id: str, result: TaskiqResult[_ReturnType]) -> None: ...

    @abstractmethod
    async def is_result_ready(self, task_id: str) -> bool: ...

    @abstractmethod
    async def get_result(
        self, task_id: str, with_logs: bool = False
    ) -> TaskiqResult[_ReturnType]: ...

    async def set_progress(self, task_id: str, progress: Any) -> None:
        """Record a task's progress (optional feature)."""

    async def get_progress(self, task_id: str) -> Any:
        """Read a task's progress, ``None`` when unknown."""
        return None

    async def wait_result(
        self,
        task_id: str,
        check_interval: float = 0.2,
        timeout: float = -1,
        with_logs: bool = False,
    ) -> TaskiqResult[_ReturnType]:
        """Wait for a result. The default polls; backends that can be told override it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout is not None and timeout >= 0 else None
        while not await self.is_result_ready(task_id):
            if deadline is not None and loop.time() >= deadline:
                raise TaskiqResultTimeoutError(f"no result for task {task_id} in {timeout} s")
            delay = check_interval
            if deadline is not None:
                delay = max(0.0, min(delay, deadline - loop.time()))
            await asyncio.sleep(delay)
        return await self.get_result(task_id, with_logs=with_logs)


class InMemoryResultBackend(AsyncResultBackend[_ReturnType]):
    """Results in this process's memory, at most ``max_stored_results`` (oldest dropped first).

    Waiters are woken when the result is set, so ``wait_result`` does not poll.
    """

    def __init__(self, max_stored_results: int = 100) -> None:
        self.max_stored_results = max_stored_results
        self.results: OrderedDict[str, TaskiqResult[_ReturnType]] = OrderedDict()
        self.progress: OrderedDict[str, Any] = OrderedDict()
        self._waiters: dict[str, list[asyncio.Future[None]]] = {}

    async def set_result(self, task_id: str, result: TaskiqResult[_ReturnType]) -> None:
        self.results[task_id] = result
        self.results.move_to_end(task_id)
        if self.max_stored_results >= 0:
            while len(self.results) > self.max_stored_results:
                self.results.popitem(last=False)
        for waiter in self._waiters.pop(task_id, ()):
            if not waiter.done():
                waiter.get_loop().call_soon_threadsafe(_resolve, waiter)

    async def is_result_ready(self, task_id: str) -> bool:
        return task_id in self.results

    async def get_result(self, task_id: str, with_logs: bool = False) -> TaskiqResult[_ReturnType]:
        try:
            result = self.results[task_id]
        except KeyError:
            raise ResultGetError(f"no result stored for task {task_id}") from None
        if not with_logs and result.log is not None:
            result = TaskiqResult(
                is_err=result.is_err,
                return_value=result.return_value,
                execution_time=result.execution_time,
                labels=result.labels,
                error=result.error,
            )
        return result

    async def set_progress(self, task_id: str, progress: Any) -> None:
        self.progress[task_id] = progress
        while len(self.progress) > max(self.max_stored_results, 0):
            self.progress.popitem(last=False)

    async def get_progress(self, task_id: str) -> Any:
        return self.progress.get(task_id)

    async def wait_result(
        self,
        task_id: str,
        check_interval: float = 0.2,
        timeout: float = -1,
        with_logs: bool = False,
    ) -> TaskiqResult[_ReturnType]:
        if task_id not in self.results:
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(task_id, []).append(waiter)
            try:
                await asyncio.wait_for(
                    waiter, timeout if timeout is not None and timeout >= 0 else None
                )
            except asyncio.TimeoutError:
                raise TaskiqResultTimeoutError(
                    f"no result for task {task_id} in {timeout} s"
                ) from None
            finally:
                waiters = self._waiters.get(task_id)
                if waiters and waiter in waiters:
                    waiters.remove(waiter)
                    if not waiters:
                        del self._waiters[task_id]
        return await self.get_result(task_id, with_logs=with_logs)


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


InmemoryResultBackend = InMemoryResultBackend  # taskiq's spelling
