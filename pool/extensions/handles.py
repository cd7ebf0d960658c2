"""Task handles whose ``wait_result`` is woken by a pushed result instead of polling.

taskiq's ``AsyncTaskiqTask.wait_result`` asks ``is_result_ready`` every ``check_interval``.
A result backend of pool's (the embedded one, Redis) is told when a result arrives, so a
broker of pool's hands out these subclasses: the wait ends the moment the result is there.
With any other result backend they behave exactly like taskiq's.
"""

from __future__ import annotations

from copy import copy
from dataclasses import dataclass
from typing import Any, ParamSpec, Protocol, TypeVar

from taskiq.abc.broker import AsyncTaskiqDecoratedTask
from taskiq.exceptions import SendTaskError
from taskiq.kicker import AsyncKicker
from taskiq.task import AsyncTaskiqTask

_Params = ParamSpec("_Params")
_Return = TypeVar("_Return")


class PushedResults(Protocol):
    """A result backend that can wait for a result without polling."""

    async def wait_ready(self, task_id: str, timeout: float | None) -> None:
        """Return once the result of ``task_id`` is ready; ``TaskiqResultTimeoutError`` after
        ``timeout`` seconds (``None``: no limit)."""


@dataclass(frozen=True)
class Cancellation:
    """What ``cancel`` did: ``cancelled``, and what the task was when asked (``queued``,
    ``running``, ``finished`` or ``unknown``), with a sentence saying so."""

    cancelled: bool
    state: str
    detail: str

    def __bool__(self) -> bool:
        return self.cancelled


class PoolTask(AsyncTaskiqTask[_Return]):
    """taskiq's task handle; waits on a pushed result when the backend offers one."""

    async def wait_result(
        self,
        check_interval: float = 0.2,
        timeout: float = -1.0,
        with_logs: bool = False,
    ) -> Any:
        wait_ready = getattr(self.result_backend, "wait_ready", None)
        if wait_ready is None:  # not a PushedResults backend
            return await super().wait_result(check_interval, timeout, with_logs)
        # taskiq's meaning: a timeout of 0 or less waits for ever
        await wait_ready(self.task_id, timeout if timeout > 0 else None)
        return await self.get_result(with_logs=with_logs)

    async def cancel(self) -> Cancellation:
        """Cancel this task (a ``PoolBroker``'s: see ``PoolBroker.cancel``)."""
        broker = getattr(self.result_backend, "broker", None)
        cancel = getattr(broker, "cancel", None)
        if cancel is None:
            raise NotImplementedError("only the tasks of a PoolBroker can be cancelled")
        result: Cancellation = await cancel(self.task_id)
        return result


class PoolKicker(AsyncKicker[_Params, _Return]):
    """taskiq's kicker; ``kiq`` returns a :class:`PoolTask`."""

    async def kiq(self, *args: Any, **kwargs: Any) -> Any:
        try:
            task = await super().kiq(*args, **kwargs)
        except SendTaskError as exc:
            # taskiq's kicker wraps every failure in a bare SendTaskError; ours says why
            if isinstance(exc.__cause__, SendTaskError):
                raise exc.__cause__ from None
            raise
        handle = PoolTask(task.task_id, task.result_backend, task.return_type)
        track = getattr(task.result_backend, "track", None)
        if track is not None:
            track(task.task_id, handle)
        return handle


class PoolDecoratedTask(AsyncTaskiqDecoratedTask[_Params, _Return]):
    """taskiq's decorated task; its kicker is a :class:`PoolKicker`."""

    def kicker(self) -> PoolKicker[_Params, _Return]:
        return PoolKicker(
            task_name=self.task_name,
            broker=self.broker,
            labels=copy(self.labels),
            return_type=self.return_type,
        )
