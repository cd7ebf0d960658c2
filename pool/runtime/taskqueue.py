"""The tasks the supervisor holds: one entry each, and the queue of those not yet handed out."""

from __future__ import annotations

from collections import deque
from typing import Any


class Entry:
    """One task the pool owes a result for."""

    __slots__ = ("failures", "payload", "producer", "suspect", "task_id", "task_name")

    def __init__(
        self, task_id: str, task_name: str, payload: bytes, failures: int = 0, producer: Any = None
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


class TaskQueue:
    """FIFO of entries; redelivered entries go to the front."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.items: deque[Entry] = deque()

    def __len__(self) -> int:
        return len(self.items)

    @property
    def full(self) -> bool:
        return len(self.items) >= self.limit

    def put(self, entry: Entry) -> None:
        self.items.append(entry)

    def put_front(self, entry: Entry) -> None:
        self.items.appendleft(entry)

    def pop(self) -> Entry:
        return self.items.popleft()
