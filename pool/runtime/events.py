"""The task event stream: what happens in the pool, as it happens, for whoever subscribes.

Events (each a JSON object with ``event``, ``time`` (Unix seconds) and the fields below)::

    received    task_id, task_name[, worker]   the pool took the task (PoolBroker: the
                                               supervisor queued it; other brokers: the
                                               worker's receiver took the message)
    started     task_id, task_name, worker     the task began to run
    succeeded   task_id, task_name, worker, duration
    failed      task_id, task_name, worker, duration, error, traceback
    retried     task_id, task_name, worker, attempt   a retry of a failed task started
                                               (taskiq's retry middlewares' ``_retries``)
    cancelled   task_id, task_name[, worker, reason]  (``EventHub.task_cancelled``: the
                                               hook for a cancel command)
    worker_up   worker, pid                    a worker is ready
    worker_gone worker, pid, reason, exitcode  a worker process ended (drained, crashed,
                                               killed by the supervisor, failed to start)
    dropped     count                          this subscriber missed ``count`` events

Where they come from: the supervisor (received for a PoolBroker, worker_*, cancelled) and
the workers (the rest, in one ``Request`` frame per turn of the worker's loop, sent only
while somebody subscribes: without subscribers the stream costs one test per task).

Bounded per subscriber: each holds at most ``SUBSCRIBER_BUFFER`` events in the supervisor
and ``SUBSCRIBER_UNREAD`` bytes in its connection; past that, the oldest events are dropped
and the subscriber gets a ``dropped`` event with their count. The supervisor's memory never
grows with a slow subscriber.

Subscribe with ``async for event in pool.events(run_dir)`` or ``python -m pool events``.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pool.runtime.control import ControlConnection
    from pool.runtime.supervisor import Supervisor, WorkerHandle

SUBSCRIBER_BUFFER = 2000
SUBSCRIBER_UNREAD = 256 * 1024
BATCH = 500
FLUSH_RETRY = 0.05  # s: a subscriber whose connection is full is tried again after this
TRACEBACK_LIMIT = 16 * 1024
KINDS = (
    "received",
    "started",
    "succeeded",
    "failed",
    "retried",
    "cancelled",
    "worker_up",
    "worker_gone",
    "dropped",
)


def event(kind: str, **fields: Any) -> dict[str, Any]:
    return {"event": kind, "time": time.time(), **fields}


def format_traceback(error: BaseException) -> str:
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return text if len(text) <= TRACEBACK_LIMIT else "...\n" + text[-TRACEBACK_LIMIT:]


# ----------------------------------------------------------------- supervisor side
class _Subscriber:
    __slots__ = ("conn", "dropped", "pending", "request_id")

    def __init__(self, conn: ControlConnection, request_id: Any) -> None:
        self.conn = conn
        self.request_id = request_id
        self.pending: deque[dict[str, Any]] = deque()
        self.dropped = 0


class EventHub:
    """The supervisor's end of the stream: fans events out to its subscribers."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.subscribers: dict[ControlConnection, _Subscriber] = {}
        self._flush_scheduled = False
        self._retry: asyncio.TimerHandle | None = None
        self.published = 0

    @property
    def active(self) -> bool:
        return bool(self.subscribers)

    def subscribe(self, conn: ControlConnection, request_id: Any) -> None:
        was_active = self.active
        self.subscribers[conn] = _Subscriber(conn, request_id)
        if not was_active:
            self._tell_workers(True)

    def forget(self, conn: ControlConnection) -> None:
        if self.subscribers.pop(conn, None) is not None and not self.active:
            self._tell_workers(False)

    def _tell_workers(self, on: bool) -> None:
        for handle in self.supervisor.workers.values():
            self.tell_worker(handle, on)

    def tell_worker(self, handle: WorkerHandle, on: bool | None = None) -> None:
        """Ask a worker to send its task events (or to stop); at its start, and on changes."""
        from pool.runtime.protocol import Request

        if handle.pipe is not None and not handle.gone:
            handle.pipe.send(Request({"events": self.active if on is None else on}))

    # ------------------------------------------------------------- publishing
    def publish(self, item: dict[str, Any]) -> None:
        if not self.subscribers:
            return
        self.published += 1
        for sub in self.subscribers.values():
            if len(sub.pending) >= SUBSCRIBER_BUFFER:
                sub.pending.popleft()
                sub.dropped += 1
            sub.pending.append(item)
        self._schedule_flush()

    def emit(self, kind: str, **fields: Any) -> None:
        if self.subscribers:
            self.publish(event(kind, **fields))

    def from_worker(self, handle: WorkerHandle, body: dict[str, Any]) -> None:
        """A worker's batch of task events (a ``Request`` frame on its pipe)."""
        items = body.get("events")
        if isinstance(items, list):
            for item in items:
                if isinstance(item, dict):
                    item["worker"] = handle.slot
                    self.publish(item)

    # hooks of the supervisor -------------------------------------------------
    def task_received(self, task_id: str, task_name: str) -> None:
        self.emit("received", task_id=task_id, task_name=task_name)

    def task_cancelled(
        self, task_id: str, task_name: str, worker: int | None = None, reason: str = ""
    ) -> None:
        """For a cancel command: call it when a task is cancelled (queued or running)."""
        self.emit("cancelled", task_id=task_id, task_name=task_name, worker=worker, reason=reason)

    def worker_up(self, handle: WorkerHandle) -> None:
        self.tell_worker(handle)
        self.emit("worker_up", worker=handle.slot, pid=handle.pid)

    def worker_gone(self, handle: WorkerHandle, reason: str) -> None:
        self.emit(
            "worker_gone",
            worker=handle.slot,
            pid=handle.pid,
            reason=reason,
            exitcode=handle.process.exitcode,
        )

    # ------------------------------------------------------------- delivery
    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Send each subscriber what waits for it, as far as its connection takes it."""
        from pool.runtime.protocol import Reply

        self._flush_scheduled = False
        behind = False
        for sub in list(self.subscribers.values()):
            conn = sub.conn
            if not conn.is_open:
                self.forget(conn)
                continue
            while sub.pending or sub.dropped:
                if conn.unread_bytes > SUBSCRIBER_UNREAD:
                    behind = True
                    break
                batch: list[dict[str, Any]] = []
                if sub.dropped:
                    batch.append(event("dropped", count=sub.dropped))
                    sub.dropped = 0
                while sub.pending and len(batch) < BATCH:
                    batch.append(sub.pending.popleft())
                conn.send(Reply({"id": sub.request_id, "events": batch}))
        if behind and self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(FLUSH_RETRY, self._retry_flush)

    def _retry_flush(self) -> None:
        self._retry = None
        self.flush()


def log_exit(handle: WorkerHandle) -> str:
    """One line for a worker process that ended, unless one was logged already; returns why
    it ended: drained, crashed, killed or failed to start."""
    import logging

    logger = logging.getLogger("pool.runtime.supervisor")
    code = handle.process.exitcode
    if handle.killed is not None:
        return "killed"  # the supervisor logged why it killed it
    if not handle.was_ready:
        return "failed to start"  # logged as soon as its pipe closed
    if handle.drain_reason is None:
        return "crashed"  # logged as soon as its pipe closed ("died unexpectedly")
    if code == 0:
        logger.info(
            "worker %d (pid %d) drained and exited (%s)",
            handle.slot,
            handle.pid,
            handle.drain_reason,
        )
        return "drained"
    logger.warning(
        "worker %d (pid %d) exited with status %s while draining (%s)",
        handle.slot,
        handle.pid,
        code,
        handle.drain_reason,
    )
    return "crashed"


# ----------------------------------------------------------------- worker side
class WorkerEvents:
    """A worker's task events, batched into one frame per turn of its loop; sent only
    while the supervisor says somebody subscribes."""

    def __init__(self, send: Callable[[dict[str, Any]], None], announce_received: bool) -> None:
        self.send = send
        self.enabled = False
        # a PoolBroker's supervisor announces "received" itself
        self.announce_received = announce_received
        self._batch: list[dict[str, Any]] = []

    def _add(self, item: dict[str, Any]) -> None:
        if not self._batch:
            asyncio.get_running_loop().call_soon(self._flush)
        self._batch.append(item)

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        if batch:
            self.send({"events": batch})

    def started(self, message: Any) -> None:
        if not self.enabled:
            return
        ids = {"task_id": message.task_id, "task_name": message.task_name}
        if self.announce_received:
            self._add(event("received", **ids))
        retries = message.labels.get("_retries")
        if retries:
            self._add(event("retried", attempt=_int(retries), **ids))
        trace = _trace_ids()
        self._add(event("started", **ids, **trace))

    def finished(self, message: Any, error: BaseException | None, duration: float) -> None:
        if not self.enabled:
            return
        ids = {"task_id": message.task_id, "task_name": message.task_name}
        if error is None:
            self._add(event("succeeded", duration=duration, **ids))
            return
        self._add(
            event(
                "failed",
                duration=duration,
                error=f"{type(error).__name__}: {error}",
                traceback=format_traceback(error),
                **ids,
            )
        )


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _trace_ids() -> dict[str, str]:
    """The OpenTelemetry trace and span of the running task, when taskiq's
    ``OpenTelemetryMiddleware`` made one (opentelemetry is imported by the app, never here)."""
    import sys

    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return {}
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


# ----------------------------------------------------------------- subscriber side
CLIENT_BUFFER = 10_000


async def events(
    run_dir: str | Path | None = None, connect_timeout: float = 5.0
) -> AsyncIterator[dict[str, Any]]:
    """The pool's events as they happen (see the module's doc), until the pool stops.

    ``async for event in pool.events(run_dir): ...``. A consumer that falls behind gets a
    ``dropped`` event telling how many it missed.
    """
    from pool.runtime.client import connect

    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    missed = 0

    def on_events(reply: dict[str, Any]) -> None:
        nonlocal missed
        for item in reply.get("events", ()):
            if queue.qsize() >= CLIENT_BUFFER:
                missed += 1
            else:
                queue.put_nowait(item)

    client = await connect(run_dir, timeout=connect_timeout)
    client.on_events = on_events
    client.lost_callbacks.append(lambda: queue.put_nowait(None))
    try:
        reply = await client.request({"cmd": "events"}, connect_timeout)
        if not reply.get("ok"):
            raise RuntimeError(f"the pool refused the subscription: {reply.get('error')}")
        while True:
            item = await queue.get()
            if missed:
                yield event("dropped", count=missed)
                missed = 0
            if item is None:
                return
            yield item
    finally:
        client.close()
