"""What a running task can learn about itself, through dependency injection."""

from __future__ import annotations

from taskiq_dependencies import Depends as TaskiqDepends

# Imported at run time, not only for type checking: dependency injection reads the type
# hints of ``Context.__init__`` and warns on every task graph when they cannot be resolved.
from pool.broker import AsyncBroker
from pool.exceptions import NoResultError, TaskRejectedError
from pool.message import TaskiqMessage
from shared_state import TaskiqState


class Context:
    """Per-run context: the message being executed and the broker running it.

    Every run gets its own instance, so concurrent tasks never see each other's message.
    """

    def __init__(self, message: TaskiqMessage, broker: AsyncBroker) -> None:
        self.message = message
        self.broker = broker

    @property
    def state(self) -> TaskiqState:
        return self.broker.state

    async def requeue(self) -> None:
        """Send this message again and finish this run without a result."""
        labels = dict(self.message.labels)
        labels["X-Taskiq-requeue"] = int(labels.get("X-Taskiq-requeue", 0)) + 1
        self.message.labels = labels
        await self.broker.kick(self.broker.formatter.dumps(self.message))
        raise NoResultError

    def reject(self) -> None:
        """Refuse this message: it is acknowledged and no result is saved."""
        raise TaskRejectedError(f"task {self.message.task_name} ({self.message.task_id}) rejected")


__all__ = ["Context", "TaskiqDepends"]
