"""pool's own exceptions, each a ``taskiq.exceptions.TaskiqError``."""

from __future__ import annotations

from typing import Any

from taskiq.exceptions import SendTaskError, TaskiqError, UnknownTaskError


class _WithReason:
    """taskiq's errors take keyword fields only; these also take their reason positionally,
    so that a copy rebuilt from a serialized result (from the exception's args) keeps it."""

    __template__ = "{reason}"
    reason: str

    def __init__(self, reason: str | None = None, **kwargs: Any) -> None:
        if reason is not None:
            kwargs["reason"] = reason
        super().__init__(**kwargs)


class WorkerCrashedError(_WithReason, TaskiqError):
    """A task killed the workers that ran it too often; it gets this error as its result."""

    reason: str = "the worker running the task died"


class PoolUnavailableError(_WithReason, SendTaskError):
    """No pool answers in the run directory (``kiq`` raises it; it names the directory)."""

    reason: str = "no pool is running"


class MessageTooLargeError(_WithReason, SendTaskError):
    """A task's message is bigger than a frame of the pool (``POOL_MAX_FRAME``)."""

    reason: str = "the task's message is too large"


class TaskNotFoundError(_WithReason, UnknownTaskError):
    """The pool has no task of that name: the result a producer waiting for it gets.

    Its args are ``(reason, task_name)``, so a copy rebuilt from a saved result keeps both.
    """

    reason: str = "no task of that name is registered"
    task_name: str = ""

    def __init__(self, reason: str | None = None, task_name: str | None = None, **kwargs: Any):
        if task_name is not None:
            kwargs["task_name"] = task_name
        super().__init__(reason, **kwargs)
        self.args = (self.reason, self.task_name)

    def __str__(self) -> str:
        return self.reason


class TaskCancelledError(_WithReason, TaskiqError):
    """The result of a task cancelled with ``handle.cancel()``, ``broker.cancel()`` or
    ``python -m pool cancel`` (PoolBroker)."""

    reason: str = "the task was cancelled"


class TaskTimeLimitError(_WithReason, TaskiqError):
    """The result of a task that ran past its ``timeout`` label and was stopped by
    replacing its worker (PoolBroker)."""

    reason: str = "the task ran past its timeout"
