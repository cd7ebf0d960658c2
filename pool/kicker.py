"""Sending a task: build the message, run the send hooks, hand it to the broker."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pool.exceptions import SendTaskError
from pool.message import TaskiqMessage
from pool.task import AsyncTaskiqTask
from pool.utils import maybe_awaitable

if TYPE_CHECKING:
    from datetime import datetime, timedelta

    from typing_extensions import Self

    from pool.broker import AsyncBroker
    from pool.scheduler import CreatedSchedule, CronSpec, ScheduleSource

_ReturnType = TypeVar("_ReturnType")


class AsyncKicker(Generic[_ReturnType]):
    """A task call being prepared: labels and task id can be set before ``kiq``."""

    def __init__(
        self,
        task_name: str,
        broker: AsyncBroker,
        labels: dict[str, Any] | None = None,
    ) -> None:
        self.task_name = task_name
        self.broker = broker
        self.labels: dict[str, Any] = dict(labels or {})
        self.custom_task_id: str | None = None

    def with_labels(self, **labels: Any) -> Self:
        """Add or override labels for this call."""
        self.labels.update(labels)
        return self

    def with_task_id(self, task_id: str) -> Self:
        """Use this task id instead of a generated one."""
        self.custom_task_id = task_id
        return self

    def with_broker(self, broker: AsyncBroker) -> Self:
        """Send through another broker."""
        self.broker = broker
        return self

    def _prepare_message(self, *args: Any, **kwargs: Any) -> TaskiqMessage:
        return TaskiqMessage(
            task_id=self.custom_task_id or self.broker.id_generator(),
            task_name=self.task_name,
            labels=dict(self.labels),
            args=list(args),
            kwargs=dict(kwargs),
        )

    async def kiq(self, *args: Any, **kwargs: Any) -> AsyncTaskiqTask[_ReturnType]:
        """Send the task; returns a handle to wait for its result."""
        broker = self.broker
        message = self._prepare_message(*args, **kwargs)
        for middleware in broker.hooks("pre_send"):
            message = await maybe_awaitable(middleware.pre_send(message))
        try:
            broker_message = broker.formatter.dumps(message)
        except Exception as exc:
            raise SendTaskError(
                f"cannot serialize the call of task {self.task_name!r} with "
                f"{type(broker.serializer).__name__}: {exc}"
            ) from exc
        try:
            await broker.kick(broker_message)
        except SendTaskError:
            raise
        except Exception as exc:
            # as in taskiq, any failure to send is a SendTaskError (the cause is kept)
            raise SendTaskError(f"cannot send task {self.task_name!r}: {exc}") from exc
        for middleware in broker.hooks("post_send"):
            await maybe_awaitable(middleware.post_send(message))
        handle = AsyncTaskiqTask(message.task_id, result_backend=broker.result_backend)
        broker.result_backend.track(handle)
        return handle

    # ----------------------------------------------------------------- scheduling
    async def schedule_by_cron(
        self, source: ScheduleSource, cron: str | CronSpec, *args: Any, **kwargs: Any
    ) -> CreatedSchedule[_ReturnType]:
        """Send this call on a cron schedule (5 fields, UTC; a ``CronSpec`` may set a zone).

        Returns a handle whose ``cancel()`` removes the schedule from ``source``.
        """
        from pool.scheduler import schedule_by_cron

        return await schedule_by_cron(self, source, cron, *args, **kwargs)

    async def schedule_by_time(
        self, source: ScheduleSource, time: datetime, *args: Any, **kwargs: Any
    ) -> CreatedSchedule[_ReturnType]:
        """Send this call once at ``time`` (naive = UTC); ``ValueError`` if it is past."""
        from pool.scheduler import schedule_by_time

        return await schedule_by_time(self, source, time, *args, **kwargs)

    async def schedule_by_interval(
        self, source: ScheduleSource, interval: float | timedelta, *args: Any, **kwargs: Any
    ) -> CreatedSchedule[_ReturnType]:
        """Send this call every ``interval`` seconds (a number or a ``timedelta``)."""
        from pool.scheduler import schedule_by_interval

        return await schedule_by_interval(self, source, interval, *args, **kwargs)

    def __repr__(self) -> str:
        return f"AsyncKicker(task_name={self.task_name!r}, labels={self.labels!r})"
