"""The middleware base class: hooks around sending, running and saving a task."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from pool.broker import AsyncBroker
    from pool.message import TaskiqMessage
    from pool.result import TaskiqResult


class TaskiqMiddleware:
    """Override any hook; each may be sync or async.

    Order (as in taskiq): ``pre_send`` and ``post_send`` around sending; in the worker
    ``pre_execute``, the task, ``on_error`` (when it raised), ``post_execute``, the result
    is saved, then ``post_save``.
    """

    def __init__(self) -> None:
        self.broker: AsyncBroker

    def set_broker(self, broker: AsyncBroker) -> None:
        self.broker = broker

    def startup(self) -> Union[Coroutine[Any, Any, None], None]:  # noqa: UP007
        """Called by ``broker.startup()``."""
        return None

    def shutdown(self) -> Union[Coroutine[Any, Any, None], None]:  # noqa: UP007
        """Called by ``broker.shutdown()``."""
        return None

    def pre_send(
        self, message: TaskiqMessage
    ) -> Union[TaskiqMessage, Coroutine[Any, Any, TaskiqMessage]]:  # noqa: UP007
        """Before a message is sent; may return a changed message."""
        return message

    def post_send(self, message: TaskiqMessage) -> Union[Coroutine[Any, Any, None], None]:  # noqa: UP007
        """After a message was sent."""
        return None

    def pre_execute(
        self, message: TaskiqMessage
    ) -> Union[TaskiqMessage, Coroutine[Any, Any, TaskiqMessage]]:  # noqa: UP007
        """In the worker, before the task runs; may return a changed message."""
        return message

    def post_execute(
        self, message: TaskiqMessage, result: TaskiqResult[Any]
    ) -> Union[Coroutine[Any, Any, None], None]:  # noqa: UP007
        """In the worker, after the task ran (successfully or not)."""
        return None

    def on_error(
        self, message: TaskiqMessage, result: TaskiqResult[Any], exception: BaseException
    ) -> Union[Coroutine[Any, Any, None], None]:  # noqa: UP007
        """In the worker, when the task raised."""
        return None

    def post_save(
        self, message: TaskiqMessage, result: TaskiqResult[Any]
    ) -> Union[Coroutine[Any, Any, None], None]:  # noqa: UP007
        """In the worker, after the result was saved."""
        return None


def overrides(middleware: TaskiqMiddleware, hook: str) -> bool:
    """True when ``middleware`` defines ``hook`` itself, so untouched hooks cost nothing."""
    return getattr(type(middleware), hook) is not getattr(TaskiqMiddleware, hook)
