"""Task routing of the embedded broker: the queue, delivery to workers, redelivery.

The supervisor owns the workers; this owns the tasks it was given. A task is held here
from the moment a producer's ``kiq`` reaches the supervisor until a worker acknowledges
it, and goes back to the front of the queue when the worker holding it dies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from pool.runtime.limits import Limiter
from pool.runtime.protocol import Task
from pool.runtime.taskcontrol import DelayHeap
from pool.runtime.taskqueue import Entry, TaskQueue

if TYPE_CHECKING:
    from pool.runtime.control import ControlConnection
    from pool.runtime.supervisor import WorkerHandle

logger = logging.getLogger("pool.runtime.routing")

GiveUp = Callable[[Entry, str], None]


class TaskRouter:
    """Queue and in-flight bookkeeping; ``give_up`` is called for a task that killed
    ``max_failures`` workers (it gets an error result instead of another delivery)."""

    def __init__(self, queue_size: int, capacity: int, max_failures: int, give_up: GiveUp):
        self.queue = TaskQueue(queue_size)
        self.capacity = capacity
        self.max_failures = max_failures
        self.give_up = give_up
        self.held_back: set[ControlConnection] = set()
        # every task held here, queued or in flight, by id; and by dedup key (taskcontrol)
        self.live: dict[str, Entry] = {}
        self.keys: dict[str, Entry] = {}
        self.next_delivery = 0
        self.frozen = False  # no producer is read while set (the journal cannot be written)
        self.rotation = 0
        # tasks whose eta is to come (taskcontrol); wake() once some are queued
        self.delayed = DelayHeap(self._due)
        # tasks over a concurrency or rate limit wait there (limits.py)
        self.limits = Limiter(self._unparked)
        self.queue.elsewhere = lambda: len(self.delayed) + self.limits.parked
        self.wake: Callable[[], None] = lambda: None
        # called for each delivery of a task with a control (steering arms its timeout)
        self.dispatched: Callable[[WorkerHandle, int, Entry], None] | None = None
        # called for each delivery while somebody subscribes to the task events (events.py)
        self.started: Callable[[WorkerHandle, Entry], None] | None = None

    def __len__(self) -> int:
        return len(self.queue)

    def enqueue(self, entry: Entry) -> None:
        self.live[entry.task_id] = entry
        if entry.control is None:
            self.queue.put(entry)
            return
        key = entry.control.get("dedup")
        if key is not None:
            self.keys[key] = entry
        if entry.get("eta", 0) > time.time():
            self.delayed.hold(entry, entry.control["eta"])
        else:
            self.queue.put(entry)

    def duplicate_of(self, entry: Entry) -> Entry | None:
        """The task queued or running with the dedup key of ``entry``, if there is one."""
        key = entry.get("dedup")
        return None if key is None else self.keys.get(key)

    def release(self, entry: Entry) -> None:
        """``entry`` is no longer held here (done, given up, cancelled)."""
        if self.live.get(entry.task_id) is entry:
            del self.live[entry.task_id]
        if entry.control is not None:
            key = entry.control.get("dedup")
            if key is not None and self.keys.get(key) is entry:
                del self.keys[key]

    def withdraw(self, entry: Entry) -> None:
        """Take a task that was not handed out yet away (it was cancelled)."""
        if not self.queue.remove(entry) and not self.delayed.remove(entry):
            self.limits.withdraw(entry)
        self.release(entry)

    def _unparked(self, entries: list[Entry]) -> None:
        for entry in entries:
            self.queue.put_back(entry)
        self.wake()

    def _due(self, entries: list[Entry]) -> None:
        for entry in entries:
            self.queue.put(entry)
        self.wake()

    def hold_back(self, conn: ControlConnection) -> None:
        """Stop reading from a producer while the queue is full (or the journal cannot be
        written): its ``kiq`` waits."""
        if conn not in self.held_back:
            self.held_back.add(conn)
            conn.pause()

    def forget(self, conn: ControlConnection) -> None:
        self.held_back.discard(conn)

    def redeliver(self, entry: Entry, reason: str, log: bool = True) -> None:
        entry.failures += 1
        if entry.failures >= self.max_failures:
            logger.error(
                "task %s (%s) failed %d deliveries (%s); giving up with an error result",
                entry.task_id,
                entry.task_name,
                entry.failures,
                reason,
            )
            self.release(entry)
            self.give_up(entry, reason)
            return
        if log:
            logger.warning("redelivering task %s (%s): %s", entry.task_id, entry.task_name, reason)
        self.queue.put_front(entry)

    def take_back(self, handle: WorkerHandle, crashed: bool) -> None:
        """The worker is gone: what it held goes back to the front of the queue.

        A death is charged to a task only when the task was alone on that worker; a worker
        that died with several tasks in flight makes each of them a suspect, which runs
        alone from then on, so that the task that kills workers is found and the others
        are not blamed.
        """
        lost = list(handle.in_flight.items())
        handle.in_flight.clear()
        for _, entry in lost:
            if entry.control is not None:
                self.limits.release(entry)
        handle.exclusive = False
        if lost and crashed:
            logger.warning(
                "worker %d (pid %d) died with %d task(s) in flight; delivering them again: %s",
                handle.slot,
                handle.pid,
                len(lost),
                ", ".join(f"{e.task_name} ({e.task_id})" for _, e in lost[:5])
                + (", ..." if len(lost) > 5 else ""),
            )
        alone = len(lost) == 1
        for delivery, entry in reversed(lost):
            if not crashed and delivery in handle.interrupted:
                # still running when a stop's wait ran out: a task that never ends is not
                # run again on every restart without bound
                self.redeliver(entry, "it was still running when its worker's stop timed out")
            elif not crashed:
                self.queue.put_front(entry)  # handed out but never started
            elif alone:
                entry.suspect = True
                self.redeliver(entry, f"worker {handle.slot} (pid {handle.pid}) died", log=False)
            else:
                entry.suspect = True
                self.queue.put_front(entry)

    def acknowledge(self, handle: WorkerHandle, delivery: int) -> Entry | None:
        entry = handle.in_flight.pop(delivery, None)
        if not handle.in_flight:
            handle.exclusive = False
        if entry is not None:
            self.release(entry)
            if entry.control is not None:
                self.limits.release(entry)
        return entry

    def dispatch(self, ready: Iterable[WorkerHandle]) -> None:
        """Hand queued tasks to ready workers, least busy first, up to their capacity.

        A suspect task waits at the head of the queue for an idle worker, which then takes
        nothing else until it is done.
        """
        queue = self.queue
        if not queue:
            self._resume_producers()
            return
        workers = [h for h in ready if not h.exclusive]
        if not workers:
            return
        self.rotation = (self.rotation + 1) % len(workers)  # ties go round-robin
        workers = workers[self.rotation :] + workers[: self.rotation]
        capacity = self.capacity
        started = self.started
        frames: dict[WorkerHandle, list[bytes]] = {}
        while queue and workers:
            handle = min(workers, key=lambda h: len(h.in_flight))
            busy = len(handle.in_flight)
            if busy >= capacity:
                break
            entry = queue.peek()
            if entry.suspect and busy:
                break  # no idle worker now; one will be, as its tasks finish
            limited = entry.control is not None and "limits" in entry.control
            if limited and not self.limits.admit(entry):
                queue.pop()  # parked until its limit has room
                continue
            if entry.suspect:
                handle.exclusive = True
                workers.remove(handle)
            queue.pop()
            self.next_delivery += 1
            handle.in_flight[self.next_delivery] = entry
            if entry.control is not None and self.dispatched is not None:
                self.dispatched(handle, self.next_delivery, entry)
            if started is not None:
                started(handle, entry)
            frames.setdefault(handle, []).append(
                Task(self.next_delivery, entry.task_id, entry.payload).encode()
            )
        for handle, batch in frames.items():
            if handle.pipe is not None:
                handle.pipe.send_raw(b"".join(batch))
        self._resume_producers()

    def _resume_producers(self) -> None:
        queued = len(self.queue) + self.queue.elsewhere()
        if self.held_back and queued < self.queue.limit * 0.9 and not self.frozen:
            for conn in self.held_back:
                conn.resume()
            self.held_back.clear()

    def drain_queue(self) -> list[Entry]:
        leftovers: list[Entry] = [*self.delayed.clear(), *self.limits.drain()]
        while self.queue:
            leftovers.append(self.queue.pop())
        return leftovers
