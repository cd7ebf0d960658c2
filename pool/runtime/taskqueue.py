"""Tasks that wait in the supervisor's memory, and their spool file across restarts."""

from __future__ import annotations

import logging
import os
from collections import deque
from pathlib import Path
from typing import Any

from pool.runtime.protocol import FrameError, FrameReader, Spooled, decode_frame

logger = logging.getLogger("pool.runtime.spool")


class Entry:
    """One task the pool owes a result for."""

    __slots__ = ("failures", "payload", "producer", "suspect", "task_id", "task_name")

    def __init__(
        self, task_id: str, task_name: str, payload: bytes, failures: int = 0, producer: Any = None
    ) -> None:
        self.task_id = task_id
        self.task_name = task_name
        self.payload = payload
        # Deaths of a worker this task was alone on: the poison rule counts only those.
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


def save(path: Path, entries: list[Entry]) -> None:
    """Write entries atomically (mode 0600); no file when there is nothing to keep."""
    if not entries:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        return
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        for entry in entries:
            record = Spooled(entry.task_id, entry.task_name, entry.payload, entry.failures)
            handle.write(record.encode())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load(path: Path) -> list[Entry]:
    """Read a spool file; unreadable records are logged and skipped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    entries: list[Entry] = []
    reader = FrameReader()
    try:
        for op, body in reader.feed(data):
            try:
                record = decode_frame(op, body)
                if not isinstance(record, Spooled):
                    raise FrameError(f"unexpected record {type(record).__name__}")
                entries.append(
                    Entry(record.task_id, record.task_name, record.message, record.failures)
                )
            except FrameError as exc:
                logger.warning("skipping an unreadable spooled task: %s", exc)
    except FrameError as exc:
        logger.warning("spool file %s is damaged after %d task(s): %s", path, len(entries), exc)
    if reader.buffer:
        logger.warning("spool file %s ends with a truncated record", path)
    return entries
