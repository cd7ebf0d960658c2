"""The task event stream: what happens in the pool, as it happens, for whoever subscribes.

Events (each a JSON object with ``event``, ``time`` (Unix seconds) and the fields below)::

    received    task_id, task_name[, worker]   the pool took the task (PoolBroker: the
                                               supervisor queued it; other brokers: the
                                               worker's receiver took the message)
    started     task_id, task_name, worker     the task began to run
    succeeded   task_id, task_name, worker, duration (s, to the microsecond)
    failed      task_id, task_name, worker, duration, error, traceback
    retried     task_id, task_name, worker, attempt   a retry of a failed task started
                                               (taskiq's retry middlewares' ``_retries``)
    cancelled   task_id, task_name[, worker, reason]  (``EventHub.task_cancelled``: the
                                               hook for a cancel command)
    worker_up   worker, pid                    a worker is ready
    worker_gone worker, pid, reason, exitcode  a worker process ended (drained, crashed,
                                               killed by the supervisor, failed to start)
    dropped     count                          this subscriber missed ``count`` events

Where they come from: for a PoolBroker, the supervisor derives received, retried and started
(when it hands the task to a worker, which runs it at once unless ``--max-prefetch`` holds
it) and succeeded (from the worker's acknowledgement, which carries the outcome and the duration)
from what it sees anyway; a worker sends only what the supervisor cannot see: failed with
its traceback, and, when taskiq's ``OpenTelemetryMiddleware`` traces its tasks, started
(and retried) with the trace's ids. For other brokers the workers send every task event. A
worker's events go in one ``Request`` frame per turn of its loop, and only while somebody
subscribes: without subscribers the stream costs one test per task.

Bounded per subscriber: each holds at most ``SUBSCRIBER_BUFFER`` events in the supervisor
and ``SUBSCRIBER_UNREAD`` bytes in its connection; past that, the oldest events are dropped
and the subscriber gets a ``dropped`` event with their count. The supervisor's memory never
grows with a slow subscriber.

Subscribe with ``async for event in pool.events(run_dir)`` or ``python -m pool events``.
"""

from __future__ import annotations

import asyncio
import json
import marshal
import time
import traceback
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

if TYPE_CHECKING:
    from pool.runtime.control import ControlConnection
    from pool.runtime.supervisor import Supervisor, WorkerHandle
    from pool.runtime.taskqueue import Entry

SUBSCRIBER_BUFFER = 2000
SUBSCRIBER_UNREAD = 256 * 1024
BATCH = 2000  # events in one frame at most
FLUSH_RETRY = 0.05  # s: a subscriber whose connection is full is tried again after this
# s: events wait this long to leave together, so that a busy pool sends its subscribers a
# few large frames rather than one per turn of its loop (each costs the supervisor a write,
# and the subscriber a wake-up and a read)
FLUSH_DELAY = 0.05
TRACEBACK_LIMIT = 16 * 1024
MARSHAL_VERSION = 4  # of the Events frames (encode_items)
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


def traces_tasks(broker: Any) -> bool:
    """Whether taskiq's OpenTelemetry middleware traces the app's tasks: then a worker sends
    its ``started`` events itself (they carry the span's ids, which only the worker knows).

    The supervisor and its workers load the same app, so both answer alike."""
    return any(
        type(m).__name__ == "OpenTelemetryMiddleware" for m in getattr(broker, "middlewares", ())
    )


def format_traceback(error: BaseException) -> str:
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return text if len(text) <= TRACEBACK_LIMIT else "...\n" + text[-TRACEBACK_LIMIT:]


_ENCODER = json.JSONEncoder(separators=(",", ":"))
_NAMES: dict[str, str] = {}  # task name -> its JSON string (the app's few names)


# The supervisor's own task events (received, started, succeeded: one of each per task) go
# as runs: the events of one kind, task name and worker in one turn of its loop (which
# share their time) are one tuple (event, time, task_name, worker, task_ids, durations);
# worker None for received, durations empty but for succeeded. A busy pool's turn holds
# some 45 events in 1 or 2 runs: a subscriber renders a run's lines with one join, where a
# tuple per event cost it an f-string each. Every other event is a dict.
TaskRun: TypeAlias = "tuple[str, float, str, int | None, list[str], list[float]]"
Item: TypeAlias = "dict[str, Any] | TaskRun"
RUN_KINDS = ("received", "started", "succeeded")  # what a run may be, in the order told


def _json_name(name: str) -> str:
    quoted = _NAMES.get(name)
    if quoted is None:
        quoted = _ENCODER.encode(name)
        if len(_NAMES) < 1024:
            _NAMES[name] = quoted
    return quoted


_UNSAFE_IN_JSON = bytes(range(32)) + b'"\\'


def _plain(text: str) -> bool:
    """Whether ``text`` goes into a JSON string as it is (nothing to escape)."""
    return text.isascii() and len(text.encode().translate(None, _UNSAFE_IN_JSON)) == len(text)


def render_lines(items: list[Item]) -> bytes:
    """Events as JSON objects, one per line (no newline at the end).

    The subscriber renders some 50,000 of these a second beside a busy pool: what the
    events of a run share (kind, time, name, worker) is rendered once and their ids are
    joined between it (a succeeded's duration is the one thing rendered per event). The
    other events go through the JSON encoder."""
    out: list[str] = []
    append = out.append
    for item in items:
        if type(item) is not tuple:
            append(_ENCODER.encode(item))
            continue
        kind, at, name, worker, task_ids, durations = item
        if not _plain("".join(task_ids)):
            task_ids = [_ENCODER.encode(task_id)[1:-1] for task_id in task_ids]
        head = f'{{"event":"{kind}","time":{at!r},"task_id":"'
        fields = f'","task_name":{_json_name(name)}'
        if kind == "succeeded":
            fields += f',"worker":{_ENCODER.encode(worker)},"duration":'
            lines = map(fields.join, zip(task_ids, map(repr, durations), strict=True))
            append(head + ("}\n" + head).join(lines) + "}")
            continue
        if kind == "started":
            fields += f',"worker":{_ENCODER.encode(worker)}'
        append(head + (fields + "}\n" + head).join(task_ids) + fields + "}")
    return "\n".join(out).encode()


def as_dicts(item: Item) -> list[dict[str, Any]]:
    """An item's events as ``pool.events`` yields them (a run's, one dict per task)."""
    if type(item) is not tuple:
        return [item]  # type: ignore[list-item]
    kind, at, name, worker, task_ids, durations = item
    told = [{"event": kind, "time": at, "task_id": task_id, "task_name": name}
            for task_id in task_ids]  # fmt: skip
    if kind != "received":
        for one in told:
            one["worker"] = worker
    if kind == "succeeded":
        for one, duration in zip(told, durations, strict=True):
            one["duration"] = duration
    return told


def count_events(items: list[Item]) -> int:
    return sum(len(item[4]) if type(item) is tuple else 1 for item in items)


# ----------------------------------------------------------------- supervisor side
class Batch:
    """The events of one flush, shared by every subscriber: encoded once, when a subscriber
    first asks for its frames (the dashboard's digest reads the items themselves)."""

    __slots__ = ("_chunks", "items")

    def __init__(self, items: list[Item]) -> None:
        self.items = items
        self._chunks: list[tuple[bytes, int]] | None = None

    def chunks(self) -> list[tuple[bytes, int]]:
        """The frames' bodies, ``BATCH`` events at a time, each with its count of events."""
        if self._chunks is None:
            self._chunks = [(encode_items(part), count) for part, count in _parts(self.items)]
        return self._chunks


def _parts(items: list[Item]) -> Iterator[tuple[list[Item], int]]:
    """The items cut into lists of at most ``BATCH`` events (a longer run is cut too)."""
    part: list[Item] = []
    room = BATCH
    for item in items:
        if type(item) is not tuple:
            part.append(item)
            room -= 1
        else:
            kind, at, name, worker, task_ids, durations = item
            while len(task_ids) > room:
                part.append((kind, at, name, worker, task_ids[:room], durations[:room]))
                yield part, BATCH
                task_ids, durations = task_ids[room:], durations[room:]
                part, room = [], BATCH
            if task_ids:
                part.append((kind, at, name, worker, task_ids, durations))
                room -= len(task_ids)
        if not room:
            yield part, BATCH
            part, room = [], BATCH
    if part:
        yield part, BATCH - room


def encode_items(items: list[Item]) -> bytes:
    """An ``Events`` frame's body: the events as they are, marshalled (several times cheaper
    than JSON for the supervisor, which relays every task; the subscriber renders them).
    Format version 4 is read alike by every Python pool supports, so a subscriber under
    another interpreter than the supervisor's reads it too."""
    return marshal.dumps(items, MARSHAL_VERSION)


def decode_items(body: bytes) -> list[Item]:
    """What ``encode_items`` wrote. The supervisor is trusted (the connection proved the
    run directory's authkey), but its frame must still hold events and nothing else."""
    items = marshal.loads(body)
    if type(items) is not list or not all(_is_item(item) for item in items):
        raise ValueError("an Events frame holds something other than events")
    return items


def _is_item(item: object) -> bool:
    if type(item) is dict:
        return "event" in item
    if type(item) is not tuple or len(item) != 6 or item[0] not in RUN_KINDS:
        return False
    kind, at, _, _, task_ids, durations = item
    if type(at) is not float or type(task_ids) is not list or type(durations) is not list:
        return False
    if not task_ids or (kind == "succeeded" and len(durations) != len(task_ids)):
        return False
    return set(map(type, task_ids)) == {str} and set(map(type, durations)) <= {float}


class _Subscriber:
    """A subscriber that gets every event: the encoded batches, queued per connection."""

    __slots__ = ("conn", "dropped", "held", "pending")

    def __init__(self, conn: ControlConnection) -> None:
        self.conn = conn
        self.pending: deque[tuple[bytes, int]] = deque()
        self.held = 0  # events in pending
        self.dropped = 0

    def add(self, batch: Batch) -> None:
        pending = self.pending
        for chunk in batch.chunks():
            pending.append(chunk)
            self.held += chunk[1]
        while self.held > SUBSCRIBER_BUFFER:  # the oldest go
            _, count = pending.popleft()
            self.held -= count
            self.dropped += count

    def flush(self) -> bool:
        """Send what waits, as far as the connection takes it; True when some is left."""
        from pool.runtime.protocol import Events

        conn, pending = self.conn, self.pending
        while pending or self.dropped:
            if conn.unread_bytes > SUBSCRIBER_UNREAD:
                return True
            if self.dropped:
                conn.send(Events(encode_items([event("dropped", count=self.dropped)])))
                self.dropped = 0
                continue
            body, count = pending.popleft()
            self.held -= count
            conn.send(Events(body))
        return False


class Subscriber(Protocol):
    """What the hub needs of a subscriber (a connection's queue, or the dashboard's digest)."""

    conn: Any

    def add(self, batch: Batch) -> None: ...

    def flush(self) -> bool: ...


class EventHub:
    """The supervisor's end of the stream: fans events out to its subscribers.

    Events wait in one list for ``FLUSH_DELAY``; then each subscriber gets that batch: one
    append per event whatever the number of subscribers, and one encoding for all. The
    supervisor's own task events gather first in the runs of the current segment: one turn
    of its loop, up to a dict event (which keeps its place among them). A segment's runs go
    in ``RUN_KINDS`` order, so a task received and started in one turn is told in that
    order."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.subscribers: dict[Any, Subscriber] = {}
        self._waiting: list[Item] = []
        self._waiting_events = 0
        self._segment_at: float | None = None  # the time of the segment's turn
        # the segment's runs of each kind, by task name and worker
        self._received: dict[tuple[str, int | None], TaskRun] = {}
        self._started: dict[tuple[str, int | None], TaskRun] = {}
        self._succeeded: dict[tuple[str, int | None], TaskRun] = {}
        self._flush_scheduled = False
        self._retry: asyncio.TimerHandle | None = None
        self._turn_time: float | None = None

    def now(self) -> float:
        """The time of this turn of the supervisor's loop: the events of a burst share it
        (they happened within microseconds), which makes them cheaper to render."""
        now = self._turn_time
        if now is None:
            now = self._turn_time = time.time()
            asyncio.get_running_loop().call_soon(self._next_turn)
        return now

    def _next_turn(self) -> None:
        self._turn_time = None

    @property
    def active(self) -> bool:
        return bool(self.subscribers)

    def subscribe(self, conn: ControlConnection) -> None:
        """A connection that asked for every event (``{"cmd": "events"}``)."""
        self.attach(_Subscriber(conn))

    def attach(self, sub: Subscriber) -> None:
        was_active = self.active
        self.subscribers[sub.conn] = sub
        if not was_active:
            self._turned(True)

    def forget(self, conn: Any) -> None:
        if self.subscribers.pop(conn, None) is not None and not self.active:
            self._turned(False)

    def _turned(self, on: bool) -> None:
        """The first subscriber came, or the last left: the supervisor's own task events
        (started at dispatch; a PoolBroker's only) and the workers' follow."""
        sup = self.supervisor
        derive = on and sup.embedded and not traces_tasks(sup.broker)
        sup.router.started = self.task_started if derive else None
        for handle in sup.workers.values():
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
        self._close_segment()
        self._waiting.append(item)
        self._added()

    def _task_event(
        self,
        runs: dict[tuple[str, int | None], TaskRun],
        kind: str,
        task_id: str,
        name: str,
        worker: int | None,
        duration: float | None = None,
    ) -> None:
        now = self._turn_time or self.now()
        if now != self._segment_at:
            self._close_segment()
            self._segment_at = now
        run = runs.get((name, worker))
        if run is None:
            run = runs[name, worker] = (kind, now, name, worker, [], [])
        run[4].append(task_id)
        if duration is not None:
            run[5].append(duration)
        self._added()

    def _added(self) -> None:
        self._waiting_events += 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_later(FLUSH_DELAY, self.flush)
        elif self._waiting_events >= SUBSCRIBER_BUFFER:  # a burst: its memory stays bounded
            self.flush()

    def _close_segment(self) -> None:
        self._segment_at = None
        for runs in (self._received, self._started, self._succeeded):
            if runs:
                self._waiting.extend(runs.values())
                runs.clear()

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
        if self.subscribers:
            self._task_event(self._received, "received", task_id, task_name, None)

    def task_started(self, handle: WorkerHandle, entry: Entry) -> None:
        """A PoolBroker's task handed to a worker (the router calls it while subscribed)."""
        retry = entry.control and entry.control.get("retry")
        if retry:
            self.publish(
                event(
                    "retried",
                    task_id=entry.task_id,
                    task_name=entry.task_name,
                    worker=handle.slot,
                    attempt=retry,
                )
            )
        self._task_event(self._started, "started", entry.task_id, entry.task_name, handle.slot)

    def task_succeeded(
        self, handle: WorkerHandle, task_id: str, task_name: str, duration: float
    ) -> None:
        """A PoolBroker's task acknowledged as succeeded (its ``Done`` frame says so)."""
        if self.subscribers:
            self._task_event(
                self._succeeded, "succeeded", task_id, task_name, handle.slot, duration
            )

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
    def flush(self) -> None:
        """Hand each subscriber the waiting events and send what its connection takes."""
        self._flush_scheduled = False
        self._close_segment()
        items, self._waiting = self._waiting, []
        self._waiting_events = 0
        batch = Batch(items) if items else None
        behind = False
        for sub in list(self.subscribers.values()):
            if not sub.conn.is_open:
                self.forget(sub.conn)
                continue
            if batch is not None:
                sub.add(batch)
            behind = sub.flush() or behind
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

    def __init__(self, send: Callable[[dict[str, Any]], None]) -> None:
        self.send = send
        self.enabled = False
        # a PoolBroker's: the supervisor announces received, started and succeeded itself
        self.supervisor_sees = False
        # taskiq's OpenTelemetry middleware traces the tasks: started carries the span's ids
        self.traced = False
        self._batch: list[dict[str, Any]] = []

    def serve(self, broker: Any, supervisor_sees: bool) -> None:
        self.supervisor_sees = supervisor_sees
        self.traced = traces_tasks(broker)

    def _add(self, item: dict[str, Any]) -> None:
        if not self._batch:
            asyncio.get_running_loop().call_soon(self._flush)
        self._batch.append(item)

    def _flush(self) -> None:
        batch, self._batch = self._batch, []
        if batch:
            self.send({"events": batch})

    def started(self, message: Any) -> None:
        if not self.enabled or (self.supervisor_sees and not self.traced):
            return  # nobody listens, or the supervisor tells it
        ids = {"task_id": message.task_id, "task_name": message.task_name}
        if not self.supervisor_sees:
            self._add(event("received", **ids))
        retries = message.labels.get("_retries")
        if retries:
            self._add(event("retried", attempt=_int(retries), **ids))
        self._add(event("started", **ids, **_trace_ids()))

    def finished(
        self, message: Any, error: BaseException | None, duration: float, acknowledged: bool
    ) -> None:
        """``acknowledged``: before it ended (``--ack-type when_received``), so the
        supervisor's ``Done`` frame could not tell how it ended."""
        if not self.enabled:
            return
        if error is None:
            if not self.supervisor_sees or acknowledged:
                ids = {"task_id": message.task_id, "task_name": message.task_name}
                self._add(event("succeeded", duration=duration, **ids))
            return
        ids = {"task_id": message.task_id, "task_name": message.task_name}
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
    batches = event_batches(run_dir, connect_timeout)
    try:
        async for batch in batches:
            for item in batch:
                yield item
    finally:
        await batches.aclose()  # closes the connection as soon as this reader stops


async def event_batches(
    run_dir: str | Path | None = None, connect_timeout: float = 5.0
) -> AsyncGenerator[list[dict[str, Any]], None]:
    """The events as they arrive, a list at a time (one per frame from the supervisor)."""
    frames = event_items(run_dir, connect_timeout)
    try:
        async for items in frames:
            yield [event for item in items for event in as_dicts(item)]
    finally:
        await frames.aclose()


async def event_lines(
    run_dir: str | Path | None = None, connect_timeout: float = 5.0
) -> AsyncGenerator[bytes, None]:
    """The events as JSON objects, one per line (no newline at the end), a frame at a time;
    ``pool events --json`` writes them as they are."""
    frames = event_items(run_dir, connect_timeout)
    try:
        async for items in frames:
            yield render_lines(items)
    finally:
        await frames.aclose()


async def event_items(
    run_dir: str | Path | None = None, connect_timeout: float = 5.0
) -> AsyncGenerator[list[Item], None]:
    """The events as the supervisor sent them (``Item``s), a frame at a time."""
    from pool.runtime.client import connect

    arrived: deque[tuple[list[Item], int] | None] = deque()
    woken = asyncio.Event()
    held = missed = 0

    def on_events(body: bytes) -> None:
        nonlocal held, missed
        items = decode_items(body)
        count = count_events(items)
        if held + count > CLIENT_BUFFER:  # this reader is behind: a frame is dropped whole
            missed += count
            return
        held += count
        arrived.append((items, count))
        woken.set()

    def on_lost() -> None:
        arrived.append(None)
        woken.set()

    client = await connect(run_dir, timeout=connect_timeout)
    client.on_events = on_events
    client.lost_callbacks.append(on_lost)
    try:
        reply = await client.request({"cmd": "events"}, connect_timeout)
        if not reply.get("ok"):
            raise RuntimeError(f"the pool refused the subscription: {reply.get('error')}")
        while True:
            await woken.wait()
            woken.clear()
            while arrived:
                frame = arrived.popleft()
                if missed:
                    yield [event("dropped", count=missed)]
                    missed = 0
                if frame is None:
                    return
                items, count = frame
                held -= count
                yield items
    finally:
        client.close()
