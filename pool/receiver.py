"""Running one message: parse, find the task, inject dependencies, run, save, acknowledge.

Shared by :class:`InMemoryBroker` and the pool's worker processes, so both behave the same.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
import time
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Any

from taskiq_dependencies import DependencyGraph

from pool.context import Context
from pool.exceptions import NoResultError, ResultSetError, TaskRejectedError, UnknownTaskError
from pool.message import AckableMessage, TaskiqMessage
from pool.result import TaskiqResult
from pool.utils import maybe_awaitable
from shared_state import TaskiqState

if TYPE_CHECKING:
    from pool.broker import AsyncBroker
    from pool.message import RawMessage

logger = logging.getLogger("pool.receiver")


class Receiver:
    """Executes messages for ``broker``; sync tasks run on ``executor`` (a thread pool).

    With ``propagate_exceptions`` (taskiq's default) a task's exception is thrown into its
    generator dependencies at teardown, so they can see that the task failed.
    """

    def __init__(
        self,
        broker: AsyncBroker,
        executor: Executor | None = None,
        propagate_exceptions: bool = True,
    ) -> None:
        self.broker = broker
        self.executor = executor
        self.propagate_exceptions = propagate_exceptions
        # keyed by the function, not the task name: a name can be registered again
        self._graphs: dict[Any, DependencyGraph | None] = {}
        self._is_async: dict[Any, bool] = {}

    def parse(self, raw: RawMessage) -> TaskiqMessage | None:
        """The message, or ``None`` (logged with the reason) when it cannot be parsed."""
        data = raw.data if isinstance(raw, AckableMessage) else raw
        try:
            return self.broker.formatter.loads(data)
        except Exception as exc:
            preview = (
                bytes(data[:120]) if isinstance(data, (bytes, bytearray)) else repr(data)[:120]
            )
            logger.warning("dropping a message that cannot be parsed (%s): %r", exc, preview)
            return None

    async def callback(
        self, raw: RawMessage, parsed: TaskiqMessage | None = None
    ) -> TaskiqResult[Any] | None:
        """Run one message to the end. Returns the saved result (``None`` when none was saved).

        The message is acknowledged only after its result is saved; a failed save leaves
        it unacknowledged so the broker can deliver it again. ``parsed`` saves parsing
        ``raw`` again when the caller already did.
        """
        message = parsed if parsed is not None else self.parse(raw)
        if message is None:
            await _ack(raw)  # it can never succeed: log (done) and drop
            return None
        task = self.broker.find_task(message.task_name)
        if task is None:
            logger.warning(
                "task %r is not registered (task id %s)", message.task_name, message.task_id
            )
            result: TaskiqResult[Any] = TaskiqResult(
                is_err=True,
                labels=message.labels,
                error=UnknownTaskError(message.task_name),
            )
        else:
            try:
                for middleware in self.broker.hooks("pre_execute"):
                    message = await maybe_awaitable(middleware.pre_execute(message))
            except Exception as exc:
                # The task does not run, but its caller still gets an answer.
                logger.exception("pre_execute failed for task %s", message.task_id)
                result = TaskiqResult(is_err=True, labels=message.labels, error=exc)
            else:
                result = await self.run_task(task.original_func, message)
                await self._after("post_execute", message, result)
        if isinstance(result.error, (NoResultError, TaskRejectedError)):
            await _ack(raw)
            return None
        if not await self._save(message, result):
            return None
        await self._after("post_save", message, result)
        await _ack(raw)
        return result

    async def _after(self, hook: str, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        """Run a hook of every middleware; one that raises is logged and the rest still run."""
        for middleware in self.broker.hooks(hook):
            try:
                await maybe_awaitable(getattr(middleware, hook)(message, result))
            except Exception:
                logger.exception("%s of %r failed for task %s", hook, middleware, message.task_id)

    async def _save(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> bool:
        backend = self.broker.result_backend
        try:
            await backend.set_result(message.task_id, result)
            return True
        except Exception as exc:
            logger.warning("saving the result of task %s failed: %s", message.task_id, exc)
            first_error = exc
        # Often the value could not be serialized: save an error result that says so.
        fallback: TaskiqResult[Any] = TaskiqResult(
            is_err=True,
            execution_time=result.execution_time,
            labels=result.labels,
            error=ResultSetError(
                f"the result of task {message.task_name!r} could not be saved: "
                f"{type(first_error).__name__}: {first_error}"
            ),
        )
        try:
            await backend.set_result(message.task_id, fallback)
            result.is_err, result.return_value, result.error = True, None, fallback.error
            return True
        except Exception:
            logger.exception(
                "result of task %s not saved; message not acknowledged", message.task_id
            )
            return False

    def _graph(self, target: Any) -> DependencyGraph | None:
        if target not in self._graphs:
            graph = DependencyGraph(target)
            self._graphs[target] = graph if graph.dependencies else None
            self._is_async[target] = _is_async(target)
        return self._graphs[target]

    async def run_task(self, target: Any, message: TaskiqMessage) -> TaskiqResult[Any]:
        """Run the task function and capture what it returned or raised."""
        graph = self._graph(target)
        kwargs = message.kwargs
        resolver = None
        timeout = _timeout_of(message)
        started = time.perf_counter()
        returned: Any = None
        error: BaseException | None = None
        try:
            if graph is not None:
                context = Context(message, self.broker)  # one per run: never shared
                initial = {
                    Context: context,
                    TaskiqState: self.broker.state,
                    type(self.broker): self.broker,
                    **self.broker.custom_dependency_context,
                }
                resolver = graph.async_ctx(initial, self.broker.dependency_overrides or None)
                # a failing dependency is the task's error, not a lost message;
                # arguments sent with the message win over resolved ones, as in taskiq
                kwargs = {**await resolver.resolve_kwargs(), **kwargs}
            if self._is_async[target]:
                returned = await asyncio.wait_for(target(*message.args, **kwargs), timeout)
            else:
                loop = asyncio.get_running_loop()
                call = functools.partial(target, *message.args, **kwargs)
                ctx = contextvars.copy_context()
                future = loop.run_in_executor(self.executor, ctx.run, call)
                returned = await asyncio.wait_for(future, timeout)
                if inspect.isawaitable(returned):
                    returned = await asyncio.wait_for(returned, timeout)
        except asyncio.TimeoutError as exc:
            # wait_for's own timeout comes from a cancellation; a TimeoutError the task
            # raised itself is kept as it is
            if timeout is not None and isinstance(exc.__cause__, asyncio.CancelledError):
                error = TimeoutError(f"task {message.task_name!r} timed out after {timeout} s")
            else:
                error = exc
        except Exception as exc:
            error = exc
        elapsed = time.perf_counter() - started
        if resolver is not None:
            try:
                if error is not None and self.propagate_exceptions:
                    # taskiq_dependencies wants exc_info, as __exit__ takes it
                    await resolver.close(type(error), error, error.__traceback__)
                else:
                    await resolver.close()
            except Exception:
                logger.exception("closing dependencies of task %s failed", message.task_id)
        result: TaskiqResult[Any] = TaskiqResult(
            is_err=error is not None,
            return_value=returned,
            execution_time=elapsed,
            labels=message.labels,
            error=error,
        )
        if error is not None:
            for middleware in self.broker.hooks("on_error"):
                await maybe_awaitable(middleware.on_error(message, result, error))
        return result


async def _ack(raw: RawMessage) -> None:
    if isinstance(raw, AckableMessage):
        await maybe_awaitable(raw.ack())


def _timeout_of(message: TaskiqMessage) -> float | None:
    value = message.labels.get("timeout")
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        logger.warning("ignoring invalid timeout label %r of task %s", value, message.task_id)
        return None
    return seconds if seconds > 0 else None


def _is_async(target: Any) -> bool:
    return inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(
        getattr(target, "__call__", None)  # noqa: B004
    )
