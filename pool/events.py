"""Lifecycle events and the handler type."""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Optional, Union

if TYPE_CHECKING:
    from shared_state import TaskiqState


class TaskiqEvents(str, enum.Enum):
    """Lifecycle events. A ``str`` enum, so ``TaskiqEvents.WORKER_STARTUP == "WORKER_STARTUP"``."""

    CLIENT_STARTUP = "CLIENT_STARTUP"
    CLIENT_SHUTDOWN = "CLIENT_SHUTDOWN"
    WORKER_STARTUP = "WORKER_STARTUP"
    WORKER_SHUTDOWN = "WORKER_SHUTDOWN"

    def __str__(self) -> str:
        return self.value


EventHandler = Callable[["TaskiqState"], Optional[Awaitable[None]]]  # noqa: UP045
"""A sync or async callable taking the state as its only argument."""

AnyCallable = Callable[..., Union[Any, Awaitable[Any]]]  # noqa: UP007
