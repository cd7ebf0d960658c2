"""The embedded default broker: producers talk to a running ``pool run`` supervisor.

No external service: tasks and results travel over an authenticated Unix socket in the
pool's private run directory.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import Any

from pool.broker import AsyncBroker
from pool.client import ControlClient, connect
from pool.exceptions import (
    ResultGetError,
    ResultSetError,
    SendTaskError,
    TaskiqResultTimeoutError,
)
from pool.message import BrokerMessage, RawMessage
from pool.protocol import Op
from pool.result import TaskiqResult
from pool.result_backend import AsyncResultBackend


class PoolResultBackend(AsyncResultBackend[Any]):
    """Results pushed by the supervisor to the connection that sent the task.

    Results of tasks sent from elsewhere are asked for once (``GET``) and then pushed too.
    At most ``max_stored_results`` results are kept (oldest dropped first), except that the
    result of a task whose handle (what ``kiq`` returned) is still alive is never dropped.
    """

    def __init__(self, broker: PoolBroker, max_stored_results: int = 10_000) -> None:
        self.broker = broker
        self.max_stored_results = max_stored_results
        self._results: OrderedDict[str, bytes] = OrderedDict()
        self._waiters: dict[str, list[asyncio.Future[bytes]]] = {}
        self._live_handles: dict[str, weakref.ref[Any]] = {}
        self._pinned: dict[str, bytes] = {}

    def track(self, handle: Any) -> None:
        task_id = handle.task_id
        self._live_handles[task_id] = weakref.ref(handle, lambda _: self._unpin(task_id))

    def _unpin(self, task_id: str) -> None:
        self._live_handles.pop(task_id, None)
        self._pinned.pop(task_id, None)

    def _stored(self, task_id: str) -> bytes | None:
        data = self._results.get(task_id)
        return data if data is not None else self._pinned.get(task_id)

    def deliver(self, task_id: str, data: bytes) -> None:
        """Called for every result frame the supervisor pushes."""
        waiters = self._waiters.pop(task_id, None)
        if waiters:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(data)
        self._results[task_id] = data
        self._results.move_to_end(task_id)
        while len(self._results) > self.max_stored_results:
            old_id, old_data = self._results.popitem(last=False)
            if old_id in self._live_handles:
                self._pinned[old_id] = old_data

    def connection_lost(self) -> None:
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(ConnectionError("lost the connection to the pool"))
                    waiter.exception()
        self._waiters.clear()

    def decode(self, data: bytes) -> TaskiqResult[Any]:
        return TaskiqResult.from_dict(self.broker.serializer.loadb(data))

    async def set_result(self, task_id: str, result: TaskiqResult[Any]) -> None:
        raise ResultSetError("results of a PoolBroker are saved by the pool's workers")

    async def is_result_ready(self, task_id: str) -> bool:
        if self._stored(task_id) is not None:
            return True
        try:
            await asyncio.wait_for(self._fetch(task_id), 0.05)
        except (asyncio.TimeoutError, ConnectionError, SendTaskError):
            return False
        return self._stored(task_id) is not None

    async def get_result(self, task_id: str, with_logs: bool = False) -> TaskiqResult[Any]:
        data = self._stored(task_id)
        if data is None:
            try:
                data = await asyncio.wait_for(self._fetch(task_id), 1.0)
            except (asyncio.TimeoutError, ConnectionError, SendTaskError) as exc:
                raise ResultGetError(f"no result for task {task_id}: {exc}") from exc
        return self.decode(data)

    async def wait_result(
        self,
        task_id: str,
        check_interval: float = 0.2,
        timeout: float = -1,
        with_logs: bool = False,
    ) -> TaskiqResult[Any]:
        data = self._stored(task_id)
        if data is not None:
            return self.decode(data)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout is not None and timeout >= 0 else None
        while True:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                data = await asyncio.wait_for(self._fetch(task_id), remaining)
                return self.decode(data)
            except asyncio.TimeoutError:
                raise TaskiqResultTimeoutError(
                    f"no result for task {task_id} in {timeout} s"
                ) from None
            except (ConnectionError, SendTaskError):
                # The pool restarted or is restarting: wait a little, then ask again.
                if deadline is not None and loop.time() + check_interval >= deadline:
                    raise TaskiqResultTimeoutError(
                        f"no result for task {task_id} in {timeout} s (pool unreachable)"
                    ) from None
                await asyncio.sleep(check_interval)

    async def _fetch(self, task_id: str) -> bytes:
        data = self._stored(task_id)
        if data is not None:
            return data
        waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        first = task_id not in self._waiters
        self._waiters.setdefault(task_id, []).append(waiter)
        try:
            if first:
                client = await self.broker.connection()
                client.send(Op.GET, task_id.encode())
            return await waiter
        finally:
            waiters = self._waiters.get(task_id)
            if waiters and waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._waiters[task_id]


class PoolBroker(AsyncBroker):
    """Sends tasks to the pool running in ``run_dir`` (default ``$POOL_RUN_DIR`` or ``./.pool``).

    Run the workers with ``python -m pool run module:broker``. ``kiq`` raises
    ``SendTaskError`` naming the run directory when no pool is running there, and waits
    (back-pressure) when the pool's queue is full.
    """

    def __init__(
        self,
        run_dir: str | Path | None = None,
        result_backend: AsyncResultBackend[Any] | None = None,
        task_id_generator: Callable[[], str] | None = None,
        max_stored_results: int = 10_000,
        connect_timeout: float = 5.0,
    ) -> None:
        self.pool_results = PoolResultBackend(self, max_stored_results)
        super().__init__(result_backend or self.pool_results, task_id_generator)
        self.run_dir = run_dir
        self.connect_timeout = connect_timeout
        self._client: ControlClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Lock | None = None

    async def connection(self) -> ControlClient:
        """The open connection to the supervisor, made on first use (and again after loss)."""
        loop = asyncio.get_running_loop()
        client = self._client
        if client is not None and client.is_open and self._client_loop is loop:
            return client
        if self._connecting is None or self._client_loop is not loop:
            self._connecting = asyncio.Lock()
            self._client_loop = loop
        async with self._connecting:
            client = self._client
            if client is not None and client.is_open and self._client_loop is loop:
                return client
            client = await connect(self.run_dir, self.pool_results.deliver, self.connect_timeout)
            client.lost_callbacks.append(self.pool_results.connection_lost)
            self._client = client
            self._client_loop = loop
            return client

    async def kick(self, message: BrokerMessage) -> None:
        client = await self.connection()
        client.send(Op.KICK, message.task_id.encode(), message.task_name.encode(), message.message)
        await client.drain()

    def listen(self) -> AsyncGenerator[RawMessage, None]:
        raise RuntimeError(
            "PoolBroker tasks are received by the workers of `python -m pool run`, not by listen()"
        )

    async def shutdown(self) -> None:
        await super().shutdown()
        if self._client is not None:
            self._client.close()
            self._client = None

    async def request(self, payload: dict[str, Any], timeout: float | None = 30.0) -> Any:
        """Send a control command (``{"cmd": "stats"}``) to the supervisor."""
        client = await self.connection()
        return await client.request(payload, timeout)
