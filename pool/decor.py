"""What ``@broker.task`` returns: the function, plus ways to send it."""

from __future__ import annotations

from collections.abc import Callable
from functools import update_wrapper
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from pool.kicker import AsyncKicker
from pool.task import AsyncTaskiqTask

if TYPE_CHECKING:
    from datetime import datetime, timedelta

    from pool.broker import AsyncBroker
    from pool.scheduler import CreatedSchedule, CronSpec, ScheduleSource

_ReturnType = TypeVar("_ReturnType")


class AsyncTaskiqDecoratedTask(Generic[_ReturnType]):
    """A registered task. Calling it runs the function here; ``kiq`` sends it to a worker."""

    def __init__(
        self,
        broker: AsyncBroker,
        task_name: str,
        original_func: Callable[..., Any],
        labels: dict[str, Any],
    ) -> None:
        self.broker = broker
        self.task_name = task_name
        self.original_func = original_func
        self.labels = labels
        update_wrapper(self, original_func)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.original_func(*args, **kwargs)

    def kicker(self) -> AsyncKicker[_ReturnType]:
        """A kicker to set labels or the task id before sending."""
        return AsyncKicker(task_name=self.task_name, broker=self.broker, labels=self.labels)

    async def kiq(self, *args: Any, **kwargs: Any) -> AsyncTaskiqTask[_ReturnType]:
        """Send the task with these arguments."""
        return await self.kicker().kiq(*args, **kwargs)

    async def schedule_by_cron(
        self, source: ScheduleSource, cron: str | CronSpec, *args: Any, **kwargs: Any
    ) -> CreatedSchedule[_ReturnType]:
        """Send the task on a cron schedule; see :meth:`AsyncKicker.schedule_by_cron`."""
        return await self.kicker().schedule_by_cron(source, cron, *args, **kwargs)

    async def schedule_by_time(
        self, source: ScheduleSource, time: datetime, *args: Any, **kwargs: Any
    ) -> CreatedSchedule[_ReturnType]:
        """Send the task once at ``time``; see :meth:`AsyncKicker.schedule_by_time`."""
        return await self.kicker().schedule_by_time(source, time, *args, **kwargs)

    async def schedule_by_interval(
        self, source: ScheduleSource, interval: float | timedelta, *args: Any, **kwargs: Any
    ) -> CreatedSchedule[_ReturnType]:
        """Send the task every ``interval`` seconds (a number or a ``timedelta``)."""
        return await self.kicker().schedule_by_interval(source, interval, *args, **kwargs)

    def __repr__(self) -> str:
        return f"AsyncTaskiqDecoratedTask({self.task_name!r})"
