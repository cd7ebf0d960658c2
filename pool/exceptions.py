"""Exceptions, with taskiq's hierarchy so ``except`` clauses written for taskiq keep working."""

from __future__ import annotations


class TaskiqError(Exception):
    """Base of every error pool raises on purpose."""


class BrokerError(TaskiqError):
    """Something went wrong in a broker."""


class SendTaskError(BrokerError):
    """A task could not be sent (bad arguments, no pool running, ...)."""


class ListenError(BrokerError):
    """A broker could not receive messages."""


class ResultBackendError(TaskiqError):
    """Something went wrong in a result backend."""


class ResultGetError(ResultBackendError):
    """A result could not be read."""


class ResultSetError(ResultBackendError):
    """A result could not be saved."""


class ResultIsReadyError(ResultBackendError):
    """Readiness of a result could not be checked."""


class NoResultError(TaskiqError):
    """The task asked not to save a result (or a retry replaced it)."""


class TaskiqResultTimeoutError(TaskiqError):
    """``wait_result`` ran out of time."""


class SecurityError(TaskiqError):
    """A message failed an authenticity or safety check."""


class UnknownTaskError(TaskiqError):
    """A message names a task that no broker registered."""

    def __init__(self, task_name: str = "") -> None:
        self.task_name = task_name
        super().__init__(
            f"task {task_name!r} is not registered in this broker" if task_name else ""
        )

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return (type(self), (self.task_name,))


class TaskRejectedError(TaskiqError):
    """A task was rejected by its context (``context.reject()``)."""


class TaskFailedError(TaskiqError):
    """Stands in for a task's exception whose class cannot be rebuilt on this side."""

    def __init__(self, message: str = "", exc_type: str = "") -> None:
        self.exc_type = exc_type
        super().__init__(f"{exc_type}: {message}" if exc_type else message)


class EventHandlerError(TaskiqError):
    """An event handler raised; the original exception is the ``__cause__``."""


class WorkerCrashedError(TaskiqError):
    """A task killed the worker processes that ran it too many times (a poison task)."""


__all__ = [
    "BrokerError",
    "EventHandlerError",
    "ListenError",
    "NoResultError",
    "ResultBackendError",
    "ResultGetError",
    "ResultIsReadyError",
    "ResultSetError",
    "SecurityError",
    "SendTaskError",
    "TaskFailedError",
    "TaskRejectedError",
    "TaskiqError",
    "TaskiqResultTimeoutError",
    "UnknownTaskError",
    "WorkerCrashedError",
]
