"""The supervisor's side of task control (``taskcontrol``): duplicates, retries, cancels
and hard time limits. The supervisor calls these hooks; the queue and the limits are the
router's.

A running task is stopped in its worker when it can be (an async task gets
``CancelledError``); a sync task, or one whose worker does not stop it within
``STOP_GRACE`` seconds (a blocked event loop), is stopped by replacing its worker: the
worker is killed and its other tasks go back to the queue, unblamed (not suspects, no
failure counted), as when a worker is drained.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from typing import TYPE_CHECKING, Any

from pool.runtime.protocol import Cancel
from pool.runtime.taskcontrol import limits_of
from pool.runtime.taskqueue import Entry

if TYPE_CHECKING:
    from pool.runtime.protocol import Done
    from pool.runtime.supervisor import Supervisor, WorkerHandle

logger = logging.getLogger("pool.runtime.steering")

# s an async task has, after its timeout or its cancellation, before its worker is replaced
STOP_GRACE = 2.0


class Steering:
    def __init__(self, supervisor: Supervisor) -> None:
        self.sup = supervisor
        self.timers: dict[int, asyncio.TimerHandle] = {}
        self._sync: dict[str, bool] = {}

    # ----------------------------------------------------------------- accepting
    def joined(self, entry: Entry) -> bool:
        """True when ``entry`` is not queued: the same task id is queued, running or done
        (its producer then gets that result), or its dedup key is queued or running (its
        producer gets the first task's result under its own id). A taskiq retry (a higher
        ``_retries``) of a running task is queued once that attempt ends."""
        sup, conn = self.sup, entry.producer
        known = sup.router.live.get(entry.task_id)
        if known is not None:
            if entry.get("retry", 0) > known.get("retry", 0):
                entry.producer = known.producer
                known.retry = entry
            else:
                known.producer = conn or known.producer
            return True
        rerun = entry.get("retry") or entry.get("rerun")
        if entry.task_id in sup.results.results and not rerun:
            if conn is not None:
                sup.results.subscribe(entry.task_id, conn)
            return True
        first = sup.router.duplicate_of(entry)
        if first is not None:
            logger.info(
                "task %s (%s) has the dedup key of %s: it gets that task's result",
                entry.task_id,
                entry.task_name,
                first.task_id,
            )
            sup.results.alias(first.task_id, entry.task_id, conn)
            return True
        return False

    def declare(self, entry: Entry) -> None:
        """Resolve the limits of ``entry``: its labels' and those the app's broker declares
        for its task (``PoolBroker.limit``); a limit that cannot be resolved is logged."""
        broker = self.sup.broker
        declared = getattr(broker, "limits", None)
        if not (entry.control and "limit" in entry.control) and not (
            declared and entry.task_name in declared
        ):
            return
        control = entry.control = dict(entry.control or {})
        try:
            control["limits"] = limits_of(broker, entry)
        except (ValueError, TypeError) as exc:
            logger.error("task %s (%s): no limit applied: %s", entry.task_id, entry.task_name, exc)
        control.pop("limit", None)

    def followed(self, entry: Entry) -> None:
        """``entry``'s attempt ended: queue the retry sent meanwhile, if one was."""
        retry = entry.retry
        if retry is None or entry.cancelled:
            return
        entry.retry = None
        self.declare(retry)
        self.sup.journal.accept(retry)
        self.sup.events.task_received(retry.task_id, retry.task_name)
        self.sup.router.enqueue(retry)

    # ----------------------------------------------------------------- running
    def is_sync(self, task_name: str) -> bool:
        known = self._sync.get(task_name)
        if known is None:
            task = self.sup.broker.find_task(task_name)
            func = getattr(task, "original_func", None)
            known = func is not None and not inspect.iscoroutinefunction(func)
            self._sync[task_name] = known
        return known

    def dispatched(self, handle: WorkerHandle, delivery: int, entry: Entry) -> None:
        """Called for each delivery of a task with a control: arms its hard time limit."""
        timeout = entry.get("timeout")
        if timeout is None:
            return
        limit = float(timeout) + (0.0 if self.is_sync(entry.task_name) else STOP_GRACE)
        self.timers[delivery] = asyncio.get_running_loop().call_later(
            limit, self._time_up, handle, delivery, entry
        )

    def done(self, entry: Entry | None, frame: Done) -> bool:
        """A delivery was acknowledged; True when its result is to be ignored (the task
        was cancelled: the producer has its cancellation)."""
        timer = self.timers.pop(frame.delivery, None)
        if timer is not None:
            timer.cancel()
        return entry is not None and entry.cancelled

    def _time_up(self, handle: WorkerHandle, delivery: int, entry: Entry) -> None:
        self.timers.pop(delivery, None)
        if handle.in_flight.get(delivery) is not entry or handle.gone:
            return
        from pool.extensions.errors import TaskTimeLimitError

        timeout = entry.get("timeout")
        reason = f"task {entry.task_name!r} ({entry.task_id}) ran past its timeout of {timeout} s"
        logger.warning("%s; replacing worker %d (pid %d)", reason, handle.slot, handle.pid)
        entry.cancelled = True
        self.sup._store_error(entry, TaskTimeLimitError(reason=reason))
        self.replace(handle, delivery, "a task ran past its timeout")

    # ----------------------------------------------------------------- cancelling
    def cancel(self, task_id: str) -> dict[str, Any]:
        """Cancel a queued or running task; the reply says what became of it."""
        sup = self.sup
        entry = sup.router.live.get(task_id)
        if entry is None:
            if self._drop_duplicate(task_id):
                return _reply(True, "queued", f"task {task_id} (a duplicate) was cancelled")
            if task_id in sup.results.results:
                return _reply(False, "finished", f"task {task_id} already finished")
            return _reply(False, "unknown", f"no task {task_id} is queued or running here")
        if entry.cancelled:
            return _reply(True, "running", f"task {task_id} is already being cancelled")
        from pool.extensions.errors import TaskCancelledError

        held = _holder(sup, entry)
        entry.cancelled = True
        error = TaskCancelledError(reason=f"task {entry.task_name!r} ({task_id}) was cancelled")
        if held is None:
            sup.router.withdraw(entry)
            sup._store_error(entry, error)
            sup.events.task_cancelled(task_id, entry.task_name, reason="before it started")
            logger.info("task %s (%s) cancelled before it started", task_id, entry.task_name)
            return _reply(True, "queued", f"task {task_id} was cancelled before it started")
        handle, delivery = held
        sup._store_error(entry, error)
        sup.events.task_cancelled(task_id, entry.task_name, handle.slot, "while it ran")
        if self.is_sync(entry.task_name) or handle.pipe is None:
            self.replace(handle, delivery, "a sync task it ran was cancelled")
        else:
            handle.pipe.send(Cancel(delivery, task_id))
            asyncio.get_running_loop().call_later(
                STOP_GRACE, self._stopped_or_replace, handle, delivery, entry
            )
        logger.info("task %s (%s) cancelled while running", task_id, entry.task_name)
        return _reply(True, "running", f"task {task_id} was cancelled while it ran")

    def _drop_duplicate(self, task_id: str) -> bool:
        """Cancel a duplicate (a dedup key) waiting for another task's result: it no longer
        waits, and the task it joined goes on."""
        from pool.extensions.errors import TaskCancelledError

        for first, aliases in self.sup.results.aliases.items():
            for alias in aliases:
                if alias[0] == task_id:
                    aliases.remove(alias)
                    duplicate = Entry(task_id, "", b"", producer=alias[1])
                    reason = f"task {task_id} (a duplicate of {first}) was cancelled"
                    self.sup._store_error(duplicate, TaskCancelledError(reason=reason))
                    return True
        return False

    def _stopped_or_replace(self, handle: WorkerHandle, delivery: int, entry: Entry) -> None:
        if handle.in_flight.get(delivery) is entry and not handle.gone:
            self.replace(handle, delivery, f"a cancelled task did not stop in {STOP_GRACE:g} s")

    def replace(self, handle: WorkerHandle, delivery: int, reason: str) -> None:
        """Kill the worker running ``delivery`` (which is settled already); a replacement
        starts, and its other tasks go back to the queue unblamed."""
        from pool.runtime.supervisor import Phase

        self.sup.router.acknowledge(handle, delivery)
        handle.stopped_by = reason
        if handle.phase in (Phase.STARTING, Phase.READY):
            handle.phase = Phase.DRAINING
        logger.warning("worker %d (pid %d) is replaced: %s", handle.slot, handle.pid, reason)
        if handle.process.is_alive():
            handle.process.kill()
        self.sup.changed.set()
        self.sup.reconcile()


def _holder(sup: Supervisor, entry: Entry) -> tuple[WorkerHandle, int] | None:
    for handle in sup.workers.values():
        for delivery, held in handle.in_flight.items():
            if held is entry:
                return handle, delivery
    return None


def _reply(cancelled: bool, state: str, detail: str) -> dict[str, Any]:
    return {"ok": True, "cancelled": cancelled, "state": state, "detail": detail}
