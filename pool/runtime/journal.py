"""The journal: every task the supervisor accepted, on disk until it is settled.

An append-only file in the run directory (the spool file) with two kinds of records: a
``Spooled`` record when a producer's task is accepted, a ``Settled`` one when a worker
acknowledged it (or it got its error result). A supervisor killed with SIGKILL leaves the
file behind; the next ``pool run`` on that run directory replays it and runs every task that
was accepted and not settled. A graceful shutdown rewrites it to the tasks not yet started.

Records are written with one ``write`` per turn of the event loop, without fsync: they
survive the death of the process (the kernel has them), not the loss of the machine.
A write that fails (a full disk) is logged loudly, and the pool stops accepting tasks
until a write succeeds again, so that nothing is accepted that is not on disk. The file
always ends on a whole record: what a failed write left of a record is cut off again, so
that later appends (and the next run) read every record before it. It is rewritten to the
tasks still held once it has grown past a quarter of the free space it found (at most
``COMPACT_AT``), so that a small disk holds the tasks, not the history.
"""

from __future__ import annotations

import errno
import logging
import os
import time
import weakref
from collections.abc import Iterable, Mapping
from pathlib import Path

from pool.runtime.protocol import (
    FrameError,
    FrameReader,
    Settled,
    Spooled,
    SpooledWith,
    decode_frame,
)
from pool.runtime.taskqueue import Entry

logger = logging.getLogger("pool.runtime.journal")

COMPACT_AT = 32 * 1024 * 1024  # bytes written since the last rewrite, at most
COMPACT_MIN = 64 * 1024  # ... and at least, however little room the disk has


def spooled(entry: Entry) -> bytes:
    """The journal record of an accepted task."""
    if entry.control:
        return SpooledWith(
            entry.task_id, entry.task_name, entry.payload, entry.failures, entry.control
        ).encode()
    return Spooled(entry.task_id, entry.task_name, entry.payload, entry.failures).encode()


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.pending: list[bytes] = []
        self.fd: int | None = None
        self.written = 0
        self.size = 0  # of the file: every byte up to here is a whole record
        self.compact_at = COMPACT_AT
        self.next_compaction = 0.0  # while the file cannot be written: not before
        self.healthy = True
        # a forked worker must not keep the file open: a rewritten journal's old file would
        # go on taking room on the disk for as long as that worker lives
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _close_in_child(ref))

    # ----------------------------------------------------------------- start
    def replay(self) -> tuple[list[Entry], dict[str, bytes]]:
        """The tasks accepted and not settled, in the order they were accepted, and the
        results of the settled ones."""
        results: dict[str, bytes] = {}
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return [], results
        live: dict[str, Entry] = {}
        reader = FrameReader()
        try:
            for op, body in reader.feed(data):
                try:
                    record = decode_frame(op, body)
                except FrameError as exc:
                    logger.warning("skipping an unreadable journal record: %s", exc)
                    continue
                if isinstance(record, Spooled):
                    live[record.task_id] = Entry(
                        record.task_id, record.task_name, record.message, record.failures
                    )
                elif isinstance(record, SpooledWith):
                    live[record.task_id] = Entry(
                        record.task_id,
                        record.task_name,
                        record.message,
                        record.failures,
                        control=record.control,
                    )
                elif isinstance(record, Settled):
                    live.pop(record.task_id, None)
                    if record.result:
                        results[record.task_id] = record.result
        except FrameError as exc:
            logger.warning("journal %s is damaged after %d task(s): %s", self.path, len(live), exc)
        if reader.buffer:
            logger.warning("journal %s ends with a truncated record (ignored)", self.path)
        return list(live.values()), results

    def open(self, live: Iterable[Entry], results: Mapping[str, bytes]) -> None:
        """Start a fresh journal holding what replay found, then append to it."""
        self.rewrite(live, results)

    # ----------------------------------------------------------------- records
    def accept(self, entry: Entry) -> None:
        self.pending.append(spooled(entry))

    def settle(self, task_id: str, result: bytes = b"") -> None:
        self.pending.append(Settled(task_id, result).encode())

    def flush(self) -> bool:
        """Write what was recorded this turn; False (logged) when the write failed."""
        if not self.pending:
            return self.healthy
        if self.fd is None:  # closed at shutdown: what arrives now is not accepted
            return False
        data = b"".join(self.pending)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            self._keep_whole_records(len(data) - len(view))
            if self.healthy:
                logger.critical(
                    "cannot write the task journal %s (%s): accepting no more tasks until "
                    "it can be written; tasks already accepted still run",
                    self.path,
                    exc,
                )
            self.healthy = False
            return False
        if not self.healthy:
            logger.warning("the task journal %s can be written again", self.path)
        self.healthy = True
        self.pending.clear()
        self.written += len(data)
        self.size += len(data)
        return True

    def _keep_whole_records(self, done: int) -> None:
        """After a write that stopped ``done`` bytes in: the records written whole stay
        (and leave ``pending``), the piece of the next one is cut off the file."""
        whole = count = 0
        for record in self.pending:
            if whole + len(record) > done:
                break
            whole += len(record)
            count += 1
        del self.pending[:count]
        self.written += whole
        self.size += whole
        if whole != done and self.fd is not None:
            try:
                os.ftruncate(self.fd, self.size)
            except OSError as exc:  # the next run ignores a truncated last record
                logger.critical("cannot cut a partial record off %s (%s)", self.path, exc)

    @property
    def wants_rewrite(self) -> bool:
        return self.written > self.compact_at

    def rewrite(
        self, live: Iterable[Entry], results: Mapping[str, bytes], compacting: bool = False
    ) -> bool:
        """Replace the file by one holding only ``live`` and ``results`` (atomic: a new
        file, then rename). On failure the old file and its appends stay, and the error is
        logged loudly (a warning only when ``compacting``: nothing is at stake)."""
        if compacting and not self.healthy:
            if time.monotonic() < self.next_compaction:
                return False
            self.next_compaction = time.monotonic() + 1.0
        entries = list(live)
        try:
            try:
                data = self._replace_file(entries, results)
            except OSError as exc:
                if exc.errno != errno.ENOSPC or not results:
                    raise
                # the tasks come first: without the stored results (producers still
                # connected get theirs from memory) the new file may fit beside the old
                data = self._replace_file(entries, {})
                logger.warning(
                    "no room for %d stored result(s) in the task journal %s: it keeps the "
                    "%d task(s) only; a pool restarted after a crash will not have them",
                    len(results),
                    self.path,
                    len(entries),
                )
        except OSError as exc:
            logger.log(
                logging.WARNING if compacting else logging.CRITICAL,
                "cannot rewrite the task journal %s (%s); %d task(s) stay in the old one",
                self.path,
                exc,
                len(entries),
            )
            self.compact_at = self.written + COMPACT_MIN  # not again at every turn
            return False
        self.close()
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        if not self.healthy:
            logger.warning("the task journal %s can be written again", self.path)
            self.healthy = True
        self.pending.clear()
        self.written = 0
        self.size = len(data)
        try:
            room = os.fstatvfs(self.fd)
            free = room.f_bavail * room.f_frsize
        except OSError:
            free = COMPACT_AT
        self.compact_at = min(COMPACT_AT, max(COMPACT_MIN, free // 4))
        return True

    def _replace_file(self, entries: list[Entry], results: Mapping[str, bytes]) -> bytes:
        """Write a new file holding ``results`` and ``entries``, then rename it over the
        journal (atomic); the data written, or OSError with no new file left behind."""
        tmp = self.path.with_suffix(".tmp")
        data = b"".join(
            [
                *(Settled(task_id, result).encode() for task_id, result in results.items()),
                *(spooled(e) for e in entries),
            ]
        )
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError:
            try:
                tmp.unlink()
            except OSError:
                pass
            raise
        return data

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _close_in_child(ref: weakref.ref[Journal]) -> None:
    journal = ref()
    if journal is not None and journal.fd is not None:
        try:
            os.close(journal.fd)
        except OSError:
            pass
        journal.fd = None


class NullJournal(Journal):
    """``pool run --no-journal``: accepted tasks live in the supervisor's memory only.

    Faster, and a supervisor killed with SIGKILL loses what it held. A graceful stop still
    writes the unstarted tasks for the next run, and the next run reads them once.
    """

    def open(self, live: Iterable[Entry], results: Mapping[str, bytes]) -> None:
        try:
            self.path.unlink()  # what it held is in memory now
        except FileNotFoundError:
            pass

    def accept(self, entry: Entry) -> None:
        pass

    def settle(self, task_id: str, result: bytes = b"") -> None:
        pass

    def flush(self) -> bool:
        return True

    @property
    def wants_rewrite(self) -> bool:
        return False
