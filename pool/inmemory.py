"""A broker that runs tasks in the calling process: for tests and small scripts."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pool.broker import AsyncBroker
from pool.events import TaskiqEvents
from pool.exceptions import UnknownTaskError
from pool.message import BrokerMessage, RawMessage
from pool.receiver import Receiver
from pool.result_backend import AsyncResultBackend, InMemoryResultBackend

# The InMemoryBroker whose task is running, in that task's context.
_running_in: contextvars.ContextVar[InMemoryBroker | None] = contextvars.ContextVar(
    "pool_inmemory_running_in", default=None
)


class InMemoryBroker(AsyncBroker):
    """Runs each sent task on this event loop (sync tasks in a thread pool).

    It is client and worker at once, so ``startup()`` fires WORKER_STARTUP and CLIENT_STARTUP.
    At most ``max_async_tasks`` tasks run at the same time; the rest wait their turn.
    """

    def __init__(
        self,
        sync_tasks_pool_size: int = 4,
        max_stored_results: int = 100,
        cast_types: bool = True,
        result_backend: AsyncResultBackend[Any] | None = None,
        max_async_tasks: int = 30,
        propagate_exceptions: bool = True,
        await_inplace: bool = False,
    ) -> None:
        super().__init__(result_backend or InMemoryResultBackend(max_stored_results))
        if max_async_tasks < 1:
            raise ValueError("max_async_tasks must be at least 1")
        self._pool_size = sync_tasks_pool_size
        self.executor = ThreadPoolExecutor(sync_tasks_pool_size, thread_name_prefix="pool-sync")
        self.receiver = Receiver(
            self, executor=self.executor, propagate_exceptions=propagate_exceptions
        )
        self.max_async_tasks = max_async_tasks
        self.await_inplace = await_inplace
        self.cast_types = cast_types
        self.propagate_exceptions = propagate_exceptions
        self._slots: asyncio.Semaphore | None = None
        self._slots_loop: asyncio.AbstractEventLoop | None = None
        self._running: set[asyncio.Task[None]] = set()

    async def kick(self, message: BrokerMessage) -> None:
        if self.find_task(message.task_name) is None:
            raise UnknownTaskError(message.task_name)
        if self.await_inplace:
            if _running_in.get() is self:
                # sent from a running task, which waits for it: it runs in the sender's
                # slot, or a nested send would wait forever for a slot its sender holds
                await self.receiver.callback(message.message)
            else:
                await self._run(message.message)
            return
        job = asyncio.create_task(self._run(message.message))
        self._running.add(job)
        job.add_done_callback(self._running.discard)

    async def _run(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        if self._slots is None or self._slots_loop is not loop:
            # a semaphore binds to the loop it first waits on; a broker outlives loops
            # (one asyncio.run or one test after another), so each loop gets its own
            self._slots = asyncio.Semaphore(self.max_async_tasks)
            self._slots_loop = loop
        async with self._slots:
            token = _running_in.set(self)
            try:
                await self.receiver.callback(data)
            finally:
                _running_in.reset(token)

    async def wait_all(self) -> None:
        """Wait until every task sent so far has finished."""
        while self._running:
            await asyncio.gather(*list(self._running), return_exceptions=True)

    def listen(self) -> AsyncGenerator[RawMessage, None]:
        raise RuntimeError(
            "InMemoryBroker runs tasks when they are sent; it has nothing to listen to"
        )

    async def startup(self) -> None:
        # the base class fires the event of this process's role; this one fires the other
        await self.run_event(
            TaskiqEvents.CLIENT_STARTUP if self.is_worker_process else TaskiqEvents.WORKER_STARTUP
        )
        await super().startup()

    async def shutdown(self) -> None:
        await self.wait_all()
        await self.run_event(
            TaskiqEvents.CLIENT_SHUTDOWN if self.is_worker_process else TaskiqEvents.WORKER_SHUTDOWN
        )
        await super().shutdown()
        self.executor.shutdown(wait=True)
        # a fresh pool, so the broker can be started again (threads are created lazily)
        self.executor = ThreadPoolExecutor(self._pool_size, thread_name_prefix="pool-sync")
        self.receiver.executor = self.executor
