"""Retrying failed tasks: at once (:class:`SimpleRetryMiddleware`) or after a delay
(:class:`SmartRetryMiddleware`).

A task is retried when it raised and its ``retry_on_error`` label is true (or the label is
absent and the middleware's ``default_retry_label`` is true). The retry is a new message
with the same task id, the same arguments and labels, and the ``_retries`` label counting
the retries made so far.

``max_retries`` (label, default ``default_retry_count``) is the number of retries
**after** the first attempt: ``max_retries=2`` runs the task at most 3 times, and
``max_retries=0`` never retries. (taskiq 0.13 counts the first attempt, so its
``max_retries=2`` runs only twice.)

While a retry is pending, the failed attempt's result is not saved (with
``no_result_on_retry=True``, the default), so ``wait_result()`` on the original handle
returns the outcome of the last attempt: the value of the first success, or the error of
the final failure.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from pool.exceptions import NoResultError, TaskRejectedError
from pool.kicker import AsyncKicker
from pool.middlewares.base import TaskiqMiddleware

if TYPE_CHECKING:
    from pool.message import TaskiqMessage
    from pool.result import TaskiqResult
    from pool.scheduler import ScheduleSource

logger = logging.getLogger("pool.retry")

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}


def _flag(value: Any) -> bool | None:
    """A label read as a boolean (labels may have become strings on the way)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        return None
    return bool(value)


def _int_label(message: TaskiqMessage, name: str, default: int) -> int:
    value = message.labels.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        logger.warning("ignoring invalid %s label %r of task %s", name, value, message.task_id)
        return default


class SimpleRetryMiddleware(TaskiqMiddleware):
    """Send a failed task again at once.

    :param default_retry_count: retries allowed when the task has no ``max_retries`` label.
        Retries come **after** the first attempt: 3 means up to 4 runs in total.
    :param default_retry_label: retry tasks that have no ``retry_on_error`` label.
    :param no_result_on_retry: do not save the result of an attempt that is being retried.
    """

    def __init__(
        self,
        default_retry_count: int = 3,
        default_retry_label: bool = False,
        no_result_on_retry: bool = True,
    ) -> None:
        super().__init__()
        if default_retry_count < 0:
            raise ValueError("default_retry_count must be >= 0")
        self.default_retry_count = default_retry_count
        self.default_retry_label = default_retry_label
        self.no_result_on_retry = no_result_on_retry

    def is_retry_on_error(self, message: TaskiqMessage) -> bool:
        """Whether a failure of this message should be retried (its ``retry_on_error``)."""
        flag = _flag(message.labels.get("retry_on_error"))
        return self.default_retry_label if flag is None else flag

    def should_retry(self, message: TaskiqMessage, exception: BaseException) -> bool:
        """Whether this failure may be retried at all (before counting retries)."""
        if isinstance(exception, (NoResultError, TaskRejectedError)):
            return False
        return self.is_retry_on_error(message)

    def retry_kicker(self, message: TaskiqMessage, retries: int) -> AsyncKicker[Any]:
        """A kicker that sends ``message`` again as retry number ``retries``."""
        return (
            AsyncKicker(message.task_name, self.broker, dict(message.labels))
            .with_task_id(message.task_id)
            .with_labels(_retries=retries)
        )

    async def send_retry(
        self, kicker: AsyncKicker[Any], message: TaskiqMessage, retries: int
    ) -> None:
        """Send the retry (at once here; :class:`SmartRetryMiddleware` adds a delay)."""
        await kicker.kiq(*message.args, **message.kwargs)

    async def on_error(
        self, message: TaskiqMessage, result: TaskiqResult[Any], exception: BaseException
    ) -> None:
        if not self.should_retry(message, exception):
            return
        done = _int_label(message, "_retries", 0)  # retries already made
        allowed = _int_label(message, "max_retries", self.default_retry_count)
        if done >= allowed:
            logger.warning(
                "task %s (%s) failed after %d retr%s; giving up: %s: %s",
                message.task_name,
                message.task_id,
                done,
                "y" if done == 1 else "ies",
                type(exception).__name__,
                exception,
            )
            return
        retries = done + 1
        try:
            await self.send_retry(self.retry_kicker(message, retries), message, retries)
        except Exception:
            # Keep the failed result: it is saved, so nobody waits for a retry that never comes.
            logger.exception(
                "cannot send retry %d/%d of task %s (%s)",
                retries,
                allowed,
                message.task_name,
                message.task_id,
            )
            return
        logger.info(
            "task %s (%s) failed (%s: %s); retry %d/%d sent",
            message.task_name,
            message.task_id,
            type(exception).__name__,
            exception,
            retries,
            allowed,
        )
        if self.no_result_on_retry:
            result.error = NoResultError(f"task {message.task_id} is being retried")


class SmartRetryMiddleware(SimpleRetryMiddleware):
    """Send a failed task again after a delay, with optional backoff and jitter.

    :param default_retry_count: retries allowed when the task has no ``max_retries`` label.
        Retries come **after** the first attempt: 3 means up to 4 runs in total.
    :param default_retry_label: retry tasks that have no ``retry_on_error`` label.
    :param no_result_on_retry: do not save the result of an attempt that is being retried.
    :param default_delay: seconds before a retry, when the task has no ``delay`` label.
    :param use_jitter: add a random 0 to 1 second to each delay.
    :param use_delay_exponent: double the delay with each retry (``delay * 2 ** n``).
    :param max_delay_exponent: the largest delay, in seconds, backoff may reach (jitter
        comes on top).
    :param schedule_source: where to put the delayed retry (a ``ScheduleSource`` with
        ``add_schedule``, read by a running :class:`~pool.scheduler.TaskiqScheduler`);
        durable if the source is. Without one the worker waits in a background asyncio
        task and then sends the retry; such pending retries are sent at once when the
        broker shuts down, and lost if the worker process dies.
    :param types_of_exceptions: retry only these exception types (default: every one).
    """

    def __init__(
        self,
        default_retry_count: int = 3,
        default_retry_label: bool = False,
        no_result_on_retry: bool = True,
        default_delay: float = 5,
        use_jitter: bool = False,
        use_delay_exponent: bool = False,
        max_delay_exponent: float = 60,
        schedule_source: ScheduleSource | None = None,
        types_of_exceptions: Iterable[type[BaseException]] | None = None,
    ) -> None:
        super().__init__(default_retry_count, default_retry_label, no_result_on_retry)
        if default_delay < 0:
            raise ValueError("default_delay must be >= 0")
        if schedule_source is not None:
            from pool.scheduler import ScheduleSource

            if not isinstance(schedule_source, ScheduleSource):
                raise TypeError(
                    f"schedule_source must be a ScheduleSource or None, got {schedule_source!r}"
                )
        self.default_delay = default_delay
        self.use_jitter = use_jitter
        self.use_delay_exponent = use_delay_exponent
        self.max_delay_exponent = max_delay_exponent
        self.schedule_source = schedule_source
        self.types_of_exceptions: tuple[type[BaseException], ...] | None = (
            tuple(types_of_exceptions) if types_of_exceptions is not None else None
        )
        # delayed retries waiting in this process: task -> (kicker, message)
        self._pending: dict[asyncio.Task[None], tuple[AsyncKicker[Any], TaskiqMessage]] = {}

    def should_retry(self, message: TaskiqMessage, exception: BaseException) -> bool:
        if self.types_of_exceptions is not None and not isinstance(
            exception, self.types_of_exceptions
        ):
            return False
        return super().should_retry(message, exception)

    def make_delay(self, retries: int, delay: float | None = None) -> float:
        """Seconds to wait before the next retry.

        :param retries: how many retries were already made (0 when the first attempt has
            just failed), i.e. the failed message's ``_retries`` label.
        :param delay: the base delay (the task's ``delay`` label); default ``default_delay``.

        The base delay, times ``2 ** retries`` when ``use_delay_exponent`` (at most
        ``max_delay_exponent``), plus a random ``[0, 1)`` s when ``use_jitter``.
        """
        value = float(self.default_delay if delay is None else delay)
        if self.use_delay_exponent:
            value = min(value * 2.0 ** max(0, retries), float(self.max_delay_exponent))
        if self.use_jitter:
            value += random.random()
        return max(0.0, value)

    def _delay_of(self, message: TaskiqMessage, retries: int) -> float:
        label = message.labels.get("delay")
        base: float | None = None
        if label is not None and label != "":
            try:
                base = float(label)
            except (TypeError, ValueError):
                logger.warning("ignoring invalid delay label %r of task %s", label, message.task_id)
        return self.make_delay(retries - 1, base)

    async def send_retry(
        self, kicker: AsyncKicker[Any], message: TaskiqMessage, retries: int
    ) -> None:
        delay = self._delay_of(message, retries)
        if delay <= 0:
            await kicker.kiq(*message.args, **message.kwargs)
            return
        if self.schedule_source is not None:
            from pool.scheduler import ScheduledTask

            when = datetime.now(timezone.utc) + timedelta(seconds=delay)
            await self.schedule_source.add_schedule(
                ScheduledTask(
                    task_name=kicker.task_name,
                    labels=dict(kicker.labels),
                    args=list(message.args),
                    kwargs=dict(message.kwargs),
                    time=when,
                    task_id=kicker.custom_task_id,
                )
            )
            logger.debug("retry of %s scheduled at %s", message.task_id, when)
            return
        job = asyncio.create_task(self._send_later(kicker, message, delay))
        self._pending[job] = (kicker, message)
        job.add_done_callback(self._forget)

    async def _send_later(
        self, kicker: AsyncKicker[Any], message: TaskiqMessage, delay: float
    ) -> None:
        await asyncio.sleep(delay)
        try:
            await kicker.kiq(*message.args, **message.kwargs)
        except Exception:
            logger.exception("cannot send delayed retry of task %s", message.task_id)

    def _forget(self, job: asyncio.Task[None]) -> None:
        self._pending.pop(job, None)

    @property
    def pending_retries(self) -> int:
        """Delayed retries waiting in this process."""
        return len(self._pending)

    async def shutdown(self) -> None:
        """Send the retries still waiting for their delay now, rather than lose them."""
        pending = list(self._pending.items())
        self._pending.clear()
        for job, _ in pending:
            job.cancel()
        for job, (kicker, message) in pending:
            try:
                await job
            except asyncio.CancelledError:
                pass
            except Exception:
                continue  # it already finished (and logged its failure)
            else:
                continue  # it already finished sending
            try:
                await kicker.kiq(*message.args, **message.kwargs)
            except Exception:
                logger.exception(
                    "cannot send pending retry of task %s at shutdown", message.task_id
                )


__all__ = ["SimpleRetryMiddleware", "SmartRetryMiddleware"]
