"""The broker base class: the task registry, events, middleware and builders."""

from __future__ import annotations

import logging
import os
import sys
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import AsyncGenerator, Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload
from uuid import uuid4

from pool.decor import AsyncTaskiqDecoratedTask
from pool.events import EventHandler, TaskiqEvents
from pool.exceptions import EventHandlerError
from pool.middlewares.base import TaskiqMiddleware, overrides
from pool.result_backend import AsyncResultBackend, InMemoryResultBackend
from pool.serializers import JSONSerializer, ProxyFormatter, TaskiqFormatter, TaskiqSerializer
from pool.utils import callable_name, maybe_awaitable
from shared_state import TaskiqState

if TYPE_CHECKING:
    from typing_extensions import Self

    from pool.message import BrokerMessage, RawMessage

logger = logging.getLogger("pool.broker")

_T = TypeVar("_T")


class _TaskDecorator(Protocol):
    """What ``@broker.task(...)`` returns: async functions give their awaited type."""

    @overload
    def __call__(
        self, func: Callable[..., Coroutine[Any, Any, _T]]
    ) -> AsyncTaskiqDecoratedTask[_T]: ...

    @overload
    def __call__(self, func: Callable[..., _T]) -> AsyncTaskiqDecoratedTask[_T]: ...


MIDDLEWARE_HOOKS = (
    "pre_send",
    "post_send",
    "pre_execute",
    "post_execute",
    "on_error",
    "post_save",
)


def default_id_generator() -> str:
    return uuid4().hex


def _module_name(func: Callable[..., Any]) -> str:
    """The importable module name of ``func``, also when it was defined in ``__main__``."""
    module = getattr(func, "__module__", None) or "unknown"
    if module == "__main__":
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)
        if spec is not None and spec.name:
            return str(spec.name)
        path = getattr(main, "__file__", None)
        if path:
            return os.path.splitext(os.path.basename(path))[0]
    return str(module)


class AsyncBroker(ABC):
    """Base of every broker. Subclasses implement ``kick`` (send) and ``listen`` (receive)."""

    def __init__(
        self,
        result_backend: AsyncResultBackend[Any] | None = None,
        task_id_generator: Callable[[], str] | None = None,
    ) -> None:
        self.result_backend: AsyncResultBackend[Any] = result_backend or InMemoryResultBackend()
        self.id_generator: Callable[[], str] = task_id_generator or default_id_generator
        self.middlewares: list[TaskiqMiddleware] = []
        self._hooks: dict[str, list[TaskiqMiddleware]] = {hook: [] for hook in MIDDLEWARE_HOOKS}
        self.local_task_registry: dict[str, AsyncTaskiqDecoratedTask[Any]] = {}
        self.event_handlers: defaultdict[TaskiqEvents, list[EventHandler]] = defaultdict(list)
        self.state: TaskiqState = TaskiqState()
        self.serializer: TaskiqSerializer = JSONSerializer()
        self.formatter: TaskiqFormatter = ProxyFormatter(self)
        self.is_worker_process = False
        self.is_scheduler_process = False
        self.custom_dependency_context: dict[Any, Any] = {}
        self.dependency_overrides: dict[Any, Any] = {}
        self.decorator_class = AsyncTaskiqDecoratedTask

    # ----------------------------------------------------------------- transport
    @abstractmethod
    async def kick(self, message: BrokerMessage) -> None:
        """Send a formatted message to the workers."""

    @abstractmethod
    def listen(self) -> AsyncGenerator[RawMessage, None]:
        """Yield incoming messages (bytes, or an :class:`AckableMessage`)."""

    # ----------------------------------------------------------------- lifecycle
    async def startup(self) -> None:
        """Fire the startup event of this process's role, then start middleware and backend."""
        event = (
            TaskiqEvents.WORKER_STARTUP if self.is_worker_process else TaskiqEvents.CLIENT_STARTUP
        )
        await self.run_event(event)
        for middleware in self.middlewares:
            await maybe_awaitable(middleware.startup())
        await self.result_backend.startup()

    async def shutdown(self) -> None:
        """Fire the shutdown event of this process's role, then stop middleware and backend."""
        event = (
            TaskiqEvents.WORKER_SHUTDOWN if self.is_worker_process else TaskiqEvents.CLIENT_SHUTDOWN
        )
        await self.run_event(event)
        for middleware in self.middlewares:
            try:
                await maybe_awaitable(middleware.shutdown())
            except Exception:
                logger.exception("middleware %s failed to shut down", callable_name(middleware))
        await self.result_backend.shutdown()

    async def run_event(self, event: TaskiqEvents) -> None:
        """Run the handlers of ``event`` in registration order.

        A failing startup handler stops the start (``EventHandlerError`` from the original);
        a failing shutdown handler is logged and the remaining handlers still run.
        """
        stopping = event in (TaskiqEvents.WORKER_SHUTDOWN, TaskiqEvents.CLIENT_SHUTDOWN)
        for handler in list(self.event_handlers.get(event, ())):
            try:
                await maybe_awaitable(handler(self.state))
            except Exception as exc:
                if stopping:
                    logger.exception("%s handler %s failed", event.value, callable_name(handler))
                    continue
                raise EventHandlerError(
                    f"{event.value} handler {callable_name(handler)} failed: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc

    # ----------------------------------------------------------------- events
    def on_event(self, *events: TaskiqEvents) -> Callable[[EventHandler], EventHandler]:
        """Decorator registering a handler for one or more events."""

        def register(handler: EventHandler) -> EventHandler:
            for event in events:
                self.add_event_handler(event, handler)
            return handler

        return register

    def add_event_handler(self, event: TaskiqEvents, handler: EventHandler) -> None:
        """Register ``handler`` (sync or async, one argument: the state) for ``event``."""
        if not callable(handler):
            raise TypeError(f"event handler must be callable, got {handler!r}")
        self.event_handlers[TaskiqEvents(event)].append(handler)

    def with_event_handlers(self, event: TaskiqEvents, *handlers: EventHandler) -> Self:
        """Register handlers and return the broker, for chaining."""
        for handler in handlers:
            self.add_event_handler(event, handler)
        return self

    # ----------------------------------------------------------------- tasks
    @overload
    def task(
        self, task_name: Callable[..., Coroutine[Any, Any, _T]], **labels: Any
    ) -> AsyncTaskiqDecoratedTask[_T]: ...

    @overload
    def task(self, task_name: Callable[..., _T], **labels: Any) -> AsyncTaskiqDecoratedTask[_T]: ...

    @overload
    def task(self, task_name: str | None = None, **labels: Any) -> _TaskDecorator: ...

    def task(self, task_name: Any = None, **labels: Any) -> Any:
        """Register a task: ``@broker.task``, ``@broker.task()``, ``@broker.task("name", x=1)``."""
        if callable(task_name):
            return self.register_task(task_name, None, **labels)

        def decorator(func: Callable[..., _T]) -> AsyncTaskiqDecoratedTask[_T]:
            return self.register_task(func, task_name, **labels)

        return decorator

    def register_task(
        self, func: Callable[..., _T], task_name: str | None = None, **labels: Any
    ) -> AsyncTaskiqDecoratedTask[_T]:
        """Register ``func`` under ``task_name`` (default ``module:function``)."""
        if not callable(func):
            raise TypeError(f"a task must be callable, got {func!r}")
        if task_name is not None and not isinstance(task_name, str):
            raise TypeError(f"task_name must be a str, got {type(task_name).__name__}")
        name = task_name or f"{_module_name(func)}:{getattr(func, '__name__', 'task')}"
        decorated: AsyncTaskiqDecoratedTask[_T] = self.decorator_class(
            broker=self, task_name=name, original_func=func, labels=labels
        )
        self.local_task_registry[name] = decorated
        return decorated

    def find_task(self, task_name: str) -> AsyncTaskiqDecoratedTask[Any] | None:
        return self.local_task_registry.get(task_name)

    def get_all_tasks(self) -> dict[str, AsyncTaskiqDecoratedTask[Any]]:
        return dict(self.local_task_registry)

    # ----------------------------------------------------------------- middleware
    def add_middlewares(self, *middlewares: TaskiqMiddleware) -> None:
        for middleware in middlewares:
            if not isinstance(middleware, TaskiqMiddleware):
                raise TypeError(f"{middleware!r} is not a TaskiqMiddleware")
            middleware.set_broker(self)
            self.middlewares.append(middleware)
            for hook in MIDDLEWARE_HOOKS:
                if overrides(middleware, hook):
                    self._hooks[hook].append(middleware)

    def hooks(self, hook: str) -> list[TaskiqMiddleware]:
        """The middlewares that implement ``hook``, in registration order."""
        return self._hooks[hook]

    def add_dependency_context(self, new_ctx: dict[Any, Any]) -> None:
        """Values injected by type into tasks' dependencies."""
        self.custom_dependency_context.update(new_ctx)

    # ----------------------------------------------------------------- builders
    def with_result_backend(self, result_backend: AsyncResultBackend[Any]) -> Self:
        self.result_backend = result_backend
        return self

    def with_middlewares(self, *middlewares: TaskiqMiddleware) -> Self:
        self.add_middlewares(*middlewares)
        return self

    def with_id_generator(self, task_id_generator: Callable[[], str]) -> Self:
        self.id_generator = task_id_generator
        return self

    def with_serializer(self, serializer: TaskiqSerializer) -> Self:
        self.serializer = serializer
        return self

    def with_formatter(self, formatter: TaskiqFormatter) -> Self:
        self.formatter = formatter
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tasks={len(self.local_task_registry)})"
