"""taskiq's ``Receiver``, with the few changes pool's workers need (each in the README).

1. Every running task resolves its dependencies from a context of its own. taskiq fills one
   dictionary per broker (``broker.custom_dependency_context``) with the running task's
   ``Context`` and hands that same dictionary to every task, so a task that resolves a
   dependency after an ``await`` can see another task's message.
2. ``shared_state.TaskiqState`` (pool's subclass) resolves to ``broker.state`` too, as
   ``taskiq.TaskiqState`` does.
3. A task cancelled because the worker stops (its drain timeout passed) is neither saved
   nor acknowledged, and middlewares' ``on_error`` does not hear of it, so the broker
   delivers it again (and a retry middleware does not retry it as well); taskiq saves the
   cancellation as the task's error and acknowledges it.
4. A sync task with a ``timeout`` label from a ``PoolBroker`` runs without taskiq's soft
   timeout (which cannot stop a thread): the supervisor enforces it by replacing the worker.
   A delivery the supervisor cancels (``cancel``) gets ``CancelledError`` and, like an
   abandoned task, is neither saved nor retried.
5. Each finished task is reported (name, failed or not, duration) for the pool's stats,
   and the running ones are known, so that a drain can cancel what outlived its timeout.
6. taskiq's log line for a failing task ("Exception found while executing function.", with
   the traceback) names the task and its id; its lines about stopping to listen are DEBUG.
7. A message the broker has ready (the rest of a batch it read) is taken without the two
   tasks and waits taskiq's prefetcher spends on each one, so that a batch reaches the
   runner in one turn of the loop and its tasks run, save and acknowledge together.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from taskiq import AckableMessage, TaskiqMessage, TaskiqResult
from taskiq import TaskiqState as TaskiqBaseState
from taskiq.acks import AckController
from taskiq.receiver import Receiver
from taskiq_dependencies import DependencyGraph

from pool.runtime.eager import eager
from shared_state import TaskiqState

if TYPE_CHECKING:
    from taskiq.receiver.receiver import _PrefetchState

Finished = Callable[[TaskiqMessage, TaskiqResult[Any], float], None]
Started = Callable[[TaskiqMessage], None]

# the message of the task running in this asyncio task, and the error it raised (if logged)
_running: contextvars.ContextVar[tuple[TaskiqMessage, list[BaseException]] | None] = (
    contextvars.ContextVar("pool_running_task", default=None)
)
_TASKIQ_FAILED = "Exception found while executing function."
_TASKIQ_QUIET = {
    "Listening started.",
    "Stopping prefetching messages...",
    "No more tasks to wait for. Shutting down.",
    "Max number of tasks executed.",
    "Waiting for %d running tasks to complete...",
}


class _TaskiqReceiverLog(logging.Filter):
    """Names the task in taskiq's failure line; its listen/stop chatter shows at DEBUG only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == _TASKIQ_FAILED:
            running = _running.get()
            if running is not None:
                message, errors = running
                record.msg = "task %s (%s) failed"
                record.args = (message.task_name, message.task_id)
                if record.exc_info and record.exc_info[1] is not None:
                    errors.append(record.exc_info[1])
            return True
        if record.msg in _TASKIQ_QUIET and record.levelno > logging.DEBUG:
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


def _install_log_filter() -> None:
    taskiq_logger = logging.getLogger("taskiq.receiver.receiver")
    if not any(isinstance(f, _TaskiqReceiverLog) for f in taskiq_logger.filters):
        taskiq_logger.addFilter(_TaskiqReceiverLog())


def task_error(result: TaskiqResult[Any]) -> BaseException | None:
    """The exception a finished task raised: the original one, also when a retry middleware
    replaced the result's error (``NoResultError``) after taskiq logged it."""
    running = _running.get()
    if running is not None and running[1]:
        return running[1][-1]
    error = result.error
    return error if isinstance(error, BaseException) else None


class _ContextPerTask:
    """A dependency graph that copies the initial context each time a task starts."""

    __slots__ = ("graph",)

    def __init__(self, graph: DependencyGraph) -> None:
        self.graph = graph

    def async_ctx(
        self, initial_cache: dict[Any, Any] | None = None, *args: Any, **kwargs: Any
    ) -> Any:
        context = dict(initial_cache or {})
        state = context.get(TaskiqBaseState)
        if state is not None:
            context.setdefault(TaskiqState, state)
        return self.graph.async_ctx(context, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.graph, name)


class PoolReceiver(Receiver):
    """taskiq's receiver; ``on_finished`` hears of every task that ran to its end."""

    def __init__(
        self,
        *args: Any,
        on_finished: Finished | None = None,
        on_started: Started | None = None,
        **kwargs: Any,
    ) -> None:
        self.on_finished = on_finished
        self.on_started = on_started
        # running callbacks whose task already ended (reported; result or ack pending)
        self.reported: set[asyncio.Task[Any]] = set()
        _install_log_filter()
        # the callbacks running now: counted in heartbeats, cancelled after a drain timeout
        self.running: set[asyncio.Task[Any]] = set()
        self.abandoned: set[asyncio.Task[Any]] = set()
        # PoolBroker: the callback running each delivery, so that it can be cancelled
        self.deliveries: dict[int, asyncio.Task[Any]] = {}
        self._guarded = 0  # middlewares whose on_error is guarded (they are only added)
        super().__init__(*args, **kwargs)

    def _guard_middlewares(self) -> None:
        """Make each middleware's ``on_error`` deaf to abandoned tasks (a retry middleware
        would otherwise retry a task that the broker delivers again). Middlewares may be
        added after the receiver is made, so this runs before each task; it does nothing
        unless middlewares were added since."""
        if len(self.broker.middlewares) == self._guarded:
            return
        self._guarded = len(self.broker.middlewares)
        for middleware in self.broker.middlewares:
            if "_pool_on_error" in middleware.__dict__:
                continue
            on_error = middleware.on_error
            middleware.__dict__["_pool_on_error"] = on_error

            def guarded(*args: Any, _on_error: Any = on_error, **kwargs: Any) -> Any:
                if asyncio.current_task() in self.abandoned:
                    return None
                return _on_error(*args, **kwargs)

            middleware.on_error = guarded  # type: ignore[method-assign]

    def abandon(self) -> None:
        """Cancel the running tasks without saving or acknowledging them: they are
        delivered again (taskiq would save the cancellation as the task's error result)."""
        self.abandoned = set(self.running)
        for task in self.abandoned:
            task.cancel()

    async def callback(self, message: bytes | AckableMessage, raise_err: bool = False) -> None:
        task = asyncio.current_task()
        if task is None:
            return await super().callback(message, raise_err)
        self.running.add(task)
        delivery = getattr(getattr(message, "ack", None), "delivery", None)
        if delivery is not None:
            self.deliveries[delivery] = task
        try:
            return await super().callback(message, raise_err)
        finally:
            self.running.discard(task)
            self.reported.discard(task)
            if delivery is not None:
                self.deliveries.pop(delivery, None)

    @property
    def unreported(self) -> int:
        """Tasks running whose end was not reported yet (what a heartbeat counts)."""
        return len(self.running) - len(self.reported)

    def cancel(self, delivery: int) -> asyncio.Task[Any] | None:
        """Cancel the task running ``delivery`` (not saved, not retried); None if none."""
        task = self.deliveries.get(delivery)
        if task is None or task.done():
            return None
        self.abandoned.add(task)
        task.add_done_callback(self.abandoned.discard)
        task.cancel()
        return task

    async def _get_prefetched_message(
        self,
        state: _PrefetchState,
        finish_event: asyncio.Event,
        finish_waiter: asyncio.Task[bool],
    ) -> bytes | AckableMessage | None:
        """taskiq's, with a fast path (7. above): with a delivery slot free, the broker's
        next message is asked for at once; only when the broker has to wait for one does
        the rest of that wait become a task, raced with the finish signal as in taskiq."""
        if self.sem_prefetch.locked() or finish_event.is_set():
            return await super()._get_prefetched_message(state, finish_event, finish_waiter)
        await self.sem_prefetch.acquire()  # a slot is free: returns without waiting
        state.owns_delivery_slot = True
        try:
            current = eager(anext(state.iterator))
            if not current.done():
                assert isinstance(current, asyncio.Task)  # the rest of the broker's wait
                state.current_message = current
                either: list[asyncio.Future[Any]] = [current, finish_waiter]
                await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
                if not current.done():
                    return None  # stopping: taskiq's prefetcher takes a late delivery
                state.current_message = None
            return current.result()
        except BaseException:
            self._release_delivery_slot(state)
            raise

    def _prepare_task(self, name: str, handler: Callable[..., Any]) -> None:
        super()._prepare_task(name, handler)
        graph = self.dependency_graphs[name]
        self.dependency_graphs[name] = _ContextPerTask(graph)  # type: ignore[assignment]

    async def run_task(
        self,
        target: Callable[..., Any],
        message: TaskiqMessage,
        ack_controller: AckController | None = None,
    ) -> TaskiqResult[Any]:
        self._guard_middlewares()
        labels = message.labels
        if "timeout" in labels and getattr(self.broker, "worker_link", None) is not None:  # noqa: SIM102
            if not asyncio.iscoroutinefunction(target):
                del labels["timeout"]  # the supervisor's hard limit (see above)
        token = _running.set((message, []))
        try:
            if self.on_started is not None:
                self.on_started(message)
            started = time.perf_counter()
            result = await super().run_task(target, message, ack_controller)
            current = asyncio.current_task()
            if current in self.abandoned:
                raise asyncio.CancelledError
            if current in self.running:
                self.reported.add(current)
            if self.on_finished is not None:
                self.on_finished(message, result, time.perf_counter() - started)
            return result
        finally:
            _running.reset(token)
