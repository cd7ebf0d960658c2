"""pool's own exceptions, each a ``taskiq.exceptions.TaskiqError``."""

from __future__ import annotations

from typing import Any

from taskiq.exceptions import TaskiqError


class WorkerCrashedError(TaskiqError):
    """A task killed the workers that ran it too often; it gets this error as its result.

    Accepts the reason positionally too, so that a copy rebuilt from a serialized result
    (taskiq calls the class with the exception's args) keeps its message.
    """

    __template__ = "{reason}"
    reason: str = "the worker running the task died"

    def __init__(self, reason: str | None = None, **kwargs: Any) -> None:
        if reason is not None:
            kwargs["reason"] = reason
        super().__init__(**kwargs)
