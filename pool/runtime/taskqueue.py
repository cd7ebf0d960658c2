"""The tasks the supervisor holds: one entry each, and the queue of those not yet handed out.

The queue serves redelivered entries first, then the others by rank: a task's rank is the
time it was queued, minus ``aging`` seconds per level of its ``priority`` label. So a
higher priority goes first, and a task waiting ``aging`` seconds catches up one level:
a priority-0 task waits at most ``aging x (highest priority - 0)`` seconds behind tasks
queued after it (no starvation without bound). Tasks without a priority stay a FIFO.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

# Seconds of waiting worth one level of priority (see the module's doc).
PRIORITY_AGING = 1.0


class Entry:
    """One task the pool owes a result for."""

    __slots__ = (
        "cancelled",
        "control",
        "failures",
        "payload",
        "producer",
        "rank",
        "retry",
        "suspect",
        "task_id",
        "task_name",
    )

    def __init__(
        self,
        task_id: str,
        task_name: str,
        payload: bytes,
        failures: int = 0,
        producer: Any = None,
        control: dict[str, Any] | None = None,
    ) -> None:
        self.task_id = task_id
        self.task_name = task_name
        self.payload = payload
        # Deaths of a worker this task was alone on, and stops whose wait it outlived:
        # the poison rule counts only those.
        self.failures = failures
        self.producer = producer
        # It was in flight on a worker that died with others: it runs alone from now on.
        self.suspect = False
        # pool's task control read from its labels by the producer (taskcontrol.py)
        self.control = control
        self.rank = 0.0
        # a retry of this task (the same task id) sent while this attempt runs
        self.retry: Entry | None = None
        self.cancelled = False

    def get(self, key: str, default: Any = None) -> Any:
        """One field of the task's control (``eta``, ``priority``, ...)."""
        control = self.control
        return default if control is None else control.get(key, default)


class TaskQueue:
    """Entries not handed out yet: redelivered ones first, then by rank (module doc)."""

    def __init__(self, limit: int, aging: float = PRIORITY_AGING) -> None:
        self.limit = limit
        self.aging = aging
        self.front: deque[Entry] = deque()  # redelivered
        self.plain: deque[Entry] = deque()  # no priority: ranks only grow
        self.ranked: list[tuple[float, int, Entry]] = []  # the others, a heap
        self._seq = itertools.count()
        # tasks held out of the queue that count toward its limit (delayed, over a limit)
        self.elsewhere: Callable[[], int] = lambda: 0

    def __len__(self) -> int:
        return len(self.front) + len(self.plain) + len(self.ranked)

    def __bool__(self) -> bool:
        return bool(self.front or self.plain or self.ranked)

    def __iter__(self) -> Iterator[Entry]:
        yield from self.front
        yield from self.plain
        yield from (item[2] for item in self.ranked)

    @property
    def full(self) -> bool:
        return len(self) + self.elsewhere() >= self.limit

    def put(self, entry: Entry) -> None:
        priority = entry.get("priority", 0)
        entry.rank = time.monotonic() - priority * self.aging
        if priority:
            heapq.heappush(self.ranked, (entry.rank, next(self._seq), entry))
        else:
            self.plain.append(entry)

    def put_back(self, entry: Entry) -> None:
        """Queue again an entry taken out of the queue, at the rank it had."""
        if not self.plain or entry.rank >= self.plain[-1].rank:
            self.plain.append(entry)
        else:
            heapq.heappush(self.ranked, (entry.rank, next(self._seq), entry))

    def put_front(self, entry: Entry) -> None:
        self.front.appendleft(entry)

    def peek(self) -> Entry:
        if self.front:
            return self.front[0]
        if self.ranked and (not self.plain or self.ranked[0][0] < self.plain[0].rank):
            return self.ranked[0][2]
        return self.plain[0]

    def pop(self) -> Entry:
        if self.front:
            return self.front.popleft()
        if self.ranked and (not self.plain or self.ranked[0][0] < self.plain[0].rank):
            return heapq.heappop(self.ranked)[2]
        return self.plain.popleft()

    def remove(self, entry: Entry) -> bool:
        """Take ``entry`` out (a cancellation: rare, so a linear search)."""
        for items in (self.front, self.plain):
            if entry in items:
                items.remove(entry)
                return True
        for i, item in enumerate(self.ranked):
            if item[2] is entry:
                self.ranked[i] = self.ranked[-1]
                self.ranked.pop()
                heapq.heapify(self.ranked)
                return True
        return False
