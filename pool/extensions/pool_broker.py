"""The embedded default broker: producers talk to a running ``pool run`` supervisor.

No external service: tasks and results travel over an authenticated Unix socket in the
pool's private run directory (producers) and over each worker's pipe (workers).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import weakref
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from taskiq import AckableMessage, AsyncBroker, AsyncResultBackend, BrokerMessage, TaskiqResult
from taskiq.depends.progress_tracker import TaskProgress
from taskiq.exceptions import ResultGetError, SendTaskError, TaskiqResultTimeoutError

from pool.extensions import model_json
from pool.extensions.errors import MessageTooLargeError
from pool.extensions.handles import Cancellation, PoolDecoratedTask
from pool.extensions.task_ids import uuid4_hex
from pool.runtime import protocol
from pool.runtime.protocol import GetProgress, Kick, KickWith, Subscribe
from pool.runtime.taskcontrol import Limit, control_of
from shared_state import TaskiqState

if TYPE_CHECKING:
    from pool.runtime.client import ControlClient

logger = logging.getLogger("pool.extensions.pool_broker")

_running_loop = asyncio.get_running_loop


class WorkerLink(Protocol):
    """The pipe to the supervisor, as a PoolBroker inside a worker process sees it."""

    inbox: asyncio.Queue[tuple[int, str, bytes]]

    def acknowledge(self, delivery: int, task_id: str) -> None: ...

    def save_result(self, task_id: str, payload: bytes) -> None: ...

    def save_progress(self, task_id: str, payload: bytes) -> None: ...


# Room in a frame for what goes with a result (op, field lengths, delivery, outcome, ...).
_FRAME_HEADROOM = 1024
# pydantic makes ``TaskiqResult[Any]`` anew at each subscript (about 1 µs): once is enough
_ANY_RESULT = TaskiqResult[Any]


class _HandleRef(weakref.ref[Any]):
    """A weak reference to a task's handle that names its task: one object per handle for
    the garbage collector to walk in a producer with many in flight, where a closure as
    the callback is four more (the function, its cells and their tuple)."""

    __slots__ = ("task_id",)
    task_id: str

    def __new__(cls, handle: Any, callback: Any, task_id: str) -> _HandleRef:
        ref = super().__new__(cls, handle, callback)
        ref.task_id = task_id
        return ref

    def __init__(self, handle: Any, callback: Any, task_id: str) -> None:
        super().__init__(handle, callback)  # type: ignore[call-arg]  # ref's own, in C


class PoolResultBackend(AsyncResultBackend[Any]):
    """Results kept by the supervisor and pushed to the connection that waits for them.

    In a producer, results of its own tasks are pushed as they arrive; others are asked for
    once and then pushed. At most ``max_stored_results`` are kept here (oldest dropped
    first), except that the result of a task whose handle is still alive is never dropped.
    In a worker, ``set_result`` hands the serialized result to the pipe: the supervisor
    stores it together with the message's acknowledgement.
    """

    def __init__(self, broker: PoolBroker, max_stored_results: int = 10_000) -> None:
        self.broker = broker
        self.max_stored_results = max_stored_results
        self._results: OrderedDict[str, bytes] = OrderedDict()
        self._waiters: dict[str, list[asyncio.Future[bytes]]] = {}
        self._live_handles: dict[str, _HandleRef] = {}
        self._handle_gone = self._unpin  # one bound method for every handle's reference
        self._pinned: dict[str, bytes] = {}
        self._progress_waiters: dict[str, list[asyncio.Future[bytes]]] = {}
        self._local_progress: dict[str, bytes] = {}
        # Tasks sent on the current connection: the supervisor pushes their results to it
        # unasked, so waiting for one needs no Subscribe (oldest forgotten past the bound).
        self._pushed: dict[str, None] = {}

    def expect(self, task_id: str) -> None:
        """``task_id`` was sent on the current connection; its result will come unasked."""
        pushed = self._pushed
        pushed[task_id] = None
        if len(pushed) > self.max_stored_results:
            del pushed[next(iter(pushed))]

    def discard(self, task_id: str) -> None:
        """Forget the result of ``task_id`` here (it is sent again, to run again)."""
        self._results.pop(task_id, None)
        self._pinned.pop(task_id, None)

    # ----------------------------------------------------------------- pushed results
    def deliver(self, task_id: str, data: bytes) -> None:
        """Called for every result frame the supervisor pushes."""
        self._pushed.pop(task_id, None)
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

    def deliver_progress(self, task_id: str, data: bytes) -> None:
        for waiter in self._progress_waiters.pop(task_id, []):
            if not waiter.done():
                waiter.set_result(data)

    def track(self, task_id: str, handle: Any) -> None:
        """Keep the result of ``task_id`` while ``handle`` lives."""
        self._live_handles[task_id] = _HandleRef(handle, self._handle_gone, task_id)

    def _unpin(self, ref: _HandleRef) -> None:
        # only a reference still in the table can call back: one that a newer handle of
        # the same task replaced was freed with the entry, before its handle died
        self._live_handles.pop(ref.task_id, None)
        self._pinned.pop(ref.task_id, None)

    def reconnected(self, client: ControlClient) -> None:
        """A new connection: ask at once for the result of every task a live handle still
        waits for, so the supervisor pushes it when it comes. Asking only when somebody
        waits could be too late: a restarted supervisor keeps only its newest results."""
        for task_id in list(self._live_handles):
            if task_id not in self._pushed and self._stored(task_id) is None:
                client.send(Subscribe(task_id))

    @property
    def awaited(self) -> bool:
        """Whether a live handle still waits for its result."""
        return any(self._stored(task_id) is None for task_id in self._live_handles)

    def connection_lost(self) -> None:
        self._pushed.clear()
        for table in (self._waiters, self._progress_waiters):
            for waiters in table.values():
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_exception(ConnectionError("lost the connection to the pool"))
                        waiter.exception()
            table.clear()

    def _stored(self, task_id: str) -> bytes | None:
        data = self._results.get(task_id)
        return data if data is not None else self._pinned.get(task_id)

    # ----------------------------------------------------------------- serialization
    def encode(self, result: TaskiqResult[Any], task_id: str = "") -> bytes:
        """The result as bytes; a value the serializer refuses, or one too big for a frame
        (``POOL_MAX_FRAME``, with room for the frame's other fields and ``task_id``),
        becomes an error result: the task is not run again and its worker lives on."""
        serializer = self.broker.serializer
        error: Exception
        try:
            payload = model_json.dump(result, serializer)
        except Exception as exc:
            error = TypeError(
                f"the result of the task could not be serialized with "
                f"{type(serializer).__name__}: {type(exc).__name__}: {exc}"
            )
        else:
            limit = protocol.MAX_FRAME - _FRAME_HEADROOM - len(task_id.encode())
            if len(payload) <= limit:
                return payload
            error = ValueError(
                f"the result of the task is {len(payload)} bytes once serialized, over the "
                f"limit of {limit} bytes for a result (frames of POOL_MAX_FRAME = "
                f"{protocol.MAX_FRAME} bytes); return a smaller value (a path, a key, ...)"
            )
        fallback: TaskiqResult[Any] = TaskiqResult(
            is_err=True,
            return_value=None,
            execution_time=result.execution_time,
            labels=result.labels,
            error=error,
        )
        return model_json.dump(fallback, serializer)

    def decode(self, data: bytes) -> TaskiqResult[Any]:
        return model_json.load(_ANY_RESULT, data, self.broker.serializer)

    # ----------------------------------------------------------------- taskiq's API
    async def set_result(self, task_id: str, result: TaskiqResult[Any]) -> None:
        link = self.broker.worker_link
        if link is None:
            raise RuntimeError("results of a PoolBroker are saved by the pool's workers")
        link.save_result(task_id, self.encode(result, task_id))

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
                raise ResultGetError() from exc
        return self.decode(data)

    async def wait_ready(self, task_id: str, timeout: float | None) -> None:
        """Return once the result is here (pushed by the supervisor, no polling).

        Raises ``PoolUnavailableError`` when the pool is gone and none answers again within
        the broker's ``connect_timeout``; a pool restarted in that time is not an error."""
        if self._stored(task_id) is not None:
            return
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        retry = 0.05
        while True:
            remaining = None if deadline is None else max(0.0, deadline - loop.time())
            try:
                await _within(self._fetch(task_id), remaining)
                return
            except asyncio.TimeoutError:
                raise TaskiqResultTimeoutError(timeout=timeout) from None
            except ConnectionError:
                # The pool went away: ask again on a new connection. When no pool comes
                # back within the broker's connect_timeout, connecting raises
                # PoolUnavailableError, which the waiter gets (it does not wait for ever).
                if deadline is not None and loop.time() + retry >= deadline:
                    raise TaskiqResultTimeoutError(timeout=timeout) from None
                await asyncio.sleep(retry)
                retry = min(retry * 2, 1.0)

    async def set_progress(self, task_id: str, progress: TaskProgress[Any]) -> None:
        data = model_json.dump(progress, self.broker.serializer)
        if len(data) + len(task_id) + 1024 > protocol.MAX_FRAME:
            raise ValueError(
                f"the progress of task {task_id} is {len(data)} bytes, over the pool's frame "
                f"limit of {protocol.MAX_FRAME} (POOL_MAX_FRAME)"
            )
        link = self.broker.worker_link
        if link is None:
            raise RuntimeError("progress of a PoolBroker task is set by the pool's workers")
        self._local_progress[task_id] = data
        link.save_progress(task_id, data)

    async def get_progress(self, task_id: str) -> TaskProgress[Any] | None:
        data = self._local_progress.get(task_id)
        if data is None:
            data = await asyncio.wait_for(
                _ask(self._progress_waiters, task_id, self._ask_progress), 5.0
            )
        if not data:
            return None
        return model_json.load(TaskProgress[Any], data, self.broker.serializer)

    def forget_local(self, task_id: str) -> None:
        """A worker finished ``task_id``: its progress lives on in the supervisor only."""
        self._local_progress.pop(task_id, None)

    async def _fetch(self, task_id: str) -> bytes:
        data = self._stored(task_id)
        if data is not None:
            return data
        return await _ask(self._waiters, task_id, self._subscribe)

    async def _subscribe(self, task_id: str) -> None:
        if task_id not in self._pushed:  # else it comes unasked
            client = await self.broker.connection()
            client.send(Subscribe(task_id))

    async def _ask_progress(self, task_id: str) -> None:
        client = await self.broker.connection()
        client.send(GetProgress(task_id))


if sys.version_info >= (3, 11):

    async def _within(waiting: Awaitable[bytes], seconds: float | None) -> bytes:
        """``waiting`` with a time limit, in the caller's task: unlike ``wait_for`` (before
        Python 3.12) no task of its own, so a result wakes its waiter one turn sooner."""
        async with asyncio.timeout(seconds):
            return await waiting

else:  # pragma: no cover

    async def _within(waiting: Awaitable[bytes], seconds: float | None) -> bytes:
        return await asyncio.wait_for(waiting, seconds)


async def _ask(
    table: dict[str, list[asyncio.Future[bytes]]],
    task_id: str,
    request: Callable[[str], Awaitable[None]],
) -> bytes:
    """Wait for the supervisor's answer about ``task_id``; the first waiter asks for it."""
    waiter: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
    first = task_id not in table
    table.setdefault(task_id, []).append(waiter)
    try:
        if first:
            await request(task_id)
        return await waiter
    finally:
        waiters = table.get(task_id)
        if waiters and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del table[task_id]


class PoolBroker(AsyncBroker):
    """Sends tasks to the pool running in ``run_dir`` (default ``$POOL_RUN_DIR`` or ``./.pool``).

    Run the workers with ``python -m pool run module:broker``. ``kiq`` raises
    ``SendTaskError`` naming the run directory when no pool is running there (after trying
    for ``connect_timeout`` seconds), and waits (back-pressure) while the pool's queue is full.
    """

    def __init__(
        self,
        run_dir: str | Path | None = None,
        max_stored_results: int = 10_000,
        connect_timeout: float = 5.0,
        priority_aging: float = 1.0,
    ) -> None:
        super().__init__()
        self.formatter = model_json.PoolFormatter(self)  # taskiq's, faster (model_json)
        self.id_generator = uuid4_hex
        # Seconds of waiting worth one level of the ``priority`` label (taskqueue's doc).
        self.priority_aging = priority_aging
        # Limits declared with limit(), by task name (the supervisor enforces them).
        self.limits: dict[str, list[Limit]] = {}
        # Outside a pool the state is this process's own, with pool's API; a worker of the
        # pool replaces it with the shared one before WORKER_STARTUP.
        self.state = TaskiqState()
        self.pool_results = PoolResultBackend(self, max_stored_results)
        self.result_backend = self.pool_results
        self.decorator_class = PoolDecoratedTask
        self.run_dir = run_dir
        self.connect_timeout = connect_timeout
        # Set in a worker process of the pool: where listen() reads and results go.
        self.worker_link: WorkerLink | None = None
        self._client: ControlClient | None = None
        # (task id, Kick frame) sent and not yet confirmed on disk by the supervisor
        self._unconfirmed: deque[tuple[str, bytes]] = deque()
        self._confirmed = 0
        self._all_confirmed: asyncio.Event | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._connecting: asyncio.Lock | None = None
        self._reconnecting: asyncio.Task[None] | None = None
        self._closing = False

    async def connection(self) -> ControlClient:
        """The open connection to the supervisor, made on first use (and again after loss)."""
        from pool.runtime.client import connect

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
            results = self.pool_results
            client = await connect(
                self.run_dir, results.deliver, results.deliver_progress, self.connect_timeout
            )
            client.lost_callbacks.append(self._connection_lost)
            client.on_accepted = self._accepted
            self._client = client
            self._client_loop = loop
            self._confirmed = 0
            for task_id, frame in self._unconfirmed:  # sent before, never confirmed
                client.send_raw(frame)
                results.expect(task_id)
            results.reconnected(client)
            await client.drain()
            return client

    def _connection_lost(self) -> None:
        self.pool_results.connection_lost()
        if self._closing or not self.pool_results.awaited:
            return
        if self._reconnecting is None or self._reconnecting.done():
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        """The pool went away while handles wait for results: connect again at once (which
        asks for them again) rather than when somebody next waits; a pool restarted on the
        run directory within ``connect_timeout`` then pushes each result as it comes."""
        try:
            await self.connection()
        except (ConnectionError, SendTaskError) as exc:
            logger.warning("could not reconnect to the pool to wait for results: %s", exc)

    def _accepted(self, count: int) -> None:
        """The supervisor has the first ``count`` tasks sent on this connection on disk."""
        window = self._unconfirmed
        for _ in range(min(count - self._confirmed, len(window))):
            window.popleft()
        self._confirmed = count
        if not window and self._all_confirmed is not None:
            self._all_confirmed.set()

    async def kick(self, message: BrokerMessage) -> None:
        """Send the task; it is kept here until the supervisor confirms it has it on disk,
        and sent again on the next connection if this one is lost before that."""
        control = control_of(message, self)
        if control is None:
            frame = Kick(message.task_id, message.task_name, message.message).encode()
        else:
            frame = KickWith(message.task_id, message.task_name, message.message, control).encode()
            if "rerun" in control:
                self.pool_results.discard(message.task_id)
        if len(frame) > protocol.MAX_FRAME:
            raise MessageTooLargeError(
                reason=f"the message of task {message.task_name!r} is {len(frame)} bytes, over "
                f"the pool's frame limit of {protocol.MAX_FRAME} (POOL_MAX_FRAME)"
            )
        client = self._client
        if client is None or not client.is_open or self._client_loop is not _running_loop():
            client = await self.connection()
        client.send_raw(frame)
        self._unconfirmed.append((message.task_id, frame))
        self.pool_results.expect(message.task_id)
        while True:
            try:
                if client.write_paused:  # else every byte is in the kernel already
                    await client.drain()
                return
            except ConnectionError:
                # Lost while waiting (the pool stops or restarts): a new connection sends
                # every unconfirmed task again, this one included; after connect_timeout
                # without a pool, PoolUnavailableError says so.
                try:
                    client = await self.connection()
                except ConnectionError:
                    continue

    async def listen(self) -> AsyncGenerator[bytes | AckableMessage, None]:
        """In a worker of the pool: the tasks the supervisor hands this worker."""
        link = self.worker_link
        if link is None:
            raise RuntimeError(
                "PoolBroker tasks are received by the workers of `python -m pool run`"
            )
        inbox = link.inbox
        acknowledge = link.acknowledge
        while True:
            delivery, task_id, data = await inbox.get()
            yield AckableMessage(data=data, ack=_Ack(acknowledge, delivery, task_id))

    async def startup(self) -> None:
        self._closing = False
        await super().startup()

    async def shutdown(self) -> None:
        await super().shutdown()
        await self._wait_confirmed()
        self._closing = True
        if self._reconnecting is not None:
            self._reconnecting.cancel()
            self._reconnecting = None
        if self._client is not None:
            self._client.close()
            self._client = None

    async def _wait_confirmed(self) -> None:
        """Before closing: every task sent is on the supervisor's disk, or a warning says
        how many may be lost (the pool stayed away for ``connect_timeout``)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        while self._unconfirmed and loop.time() < deadline:
            self._all_confirmed = asyncio.Event()
            try:
                await self.connection()  # a new connection sends them again
                await asyncio.wait_for(self._all_confirmed.wait(), deadline - loop.time())
            except (asyncio.TimeoutError, ConnectionError, SendTaskError):
                await asyncio.sleep(0.05)
            finally:
                self._all_confirmed = None
        if self._unconfirmed:
            logger.warning(
                "%d task(s) sent to the pool in %s were never confirmed by it",
                len(self._unconfirmed),
                self.run_dir or "the default run directory",
            )

    async def cancel(self, task_id: str) -> Cancellation:
        """Cancel a queued or running task: a queued one never starts; a running async one
        gets ``CancelledError``; a running sync one is stopped by replacing its worker.
        Its producer gets a ``TaskCancelledError`` result. The answer says what the task
        was (``queued``, ``running``, ``finished``, ``unknown``)."""
        reply = await self.request({"cmd": "cancel", "task_id": task_id})
        if not reply.get("ok"):
            raise ValueError(f"the pool refused to cancel {task_id}: {reply.get('error')}")
        return Cancellation(reply["cancelled"], reply["state"], reply["detail"])

    def limit(
        self,
        task: Any,
        concurrency: int | None = None,
        rate: str | float | None = None,
        key: str | None = None,
        scope: str | None = None,
    ) -> Limit:
        """Limit ``task`` (a task or its name) pool-wide: at most ``concurrency`` at once,
        at most ``rate`` starts (``"10/s"``); with ``key`` (a label or argument), per value
        of it; ``scope`` names a limit several tasks share. Declare it in the app's module:
        the supervisor (which imports it) enforces it. See ``taskcontrol.Limit``."""
        name = task if isinstance(task, str) else task.task_name
        declared = Limit(concurrency, rate, key, scope)
        self.limits.setdefault(name, []).append(declared)
        return declared

    async def request(self, payload: dict[str, Any], timeout: float | None = 30.0) -> Any:
        """Send a control command (``{"cmd": "stats"}``) to the supervisor.

        On a connection of its own: the tasks' connection is not read while the pool's
        queue is full, and a command must not wait behind them."""
        from pool.runtime.client import request

        return await request(payload, self.run_dir, timeout, self.connect_timeout)


class _Ack:
    """The ``ack`` of one delivery (a plain callable: cheaper than a closure per task)."""

    __slots__ = ("acknowledge", "delivery", "task_id")

    def __init__(self, acknowledge: Any, delivery: int, task_id: str) -> None:
        self.acknowledge = acknowledge
        self.delivery = delivery
        self.task_id = task_id

    def __call__(self) -> None:
        self.acknowledge(self.delivery, self.task_id)
