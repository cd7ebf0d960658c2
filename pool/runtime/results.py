"""The supervisor's result store: what workers saved, kept for the producers that wait.

Results and progress stay opaque bytes (the broker's serializer made them in a worker);
the supervisor never decodes them. Both tables are bounded, oldest dropped first.
A result is pushed with ``ControlConnection.push_result``: to a peer that does not read, it
waits as these very bytes (no copy), and it stays here when such a peer is dropped.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from pool.runtime.protocol import Progress

if TYPE_CHECKING:
    from pool.runtime.control import ControlConnection


class ResultStore:
    def __init__(self, max_results: int) -> None:
        self.max_results = max_results
        self.results: OrderedDict[str, bytes] = OrderedDict()
        self.progress: OrderedDict[str, bytes] = OrderedDict()
        self.subscribers: dict[str, set[ControlConnection]] = {}
        # duplicates (a dedup key) waiting for the result of the first: (their id, producer)
        self.aliases: dict[str, list[tuple[str, ControlConnection | None]]] = {}

    def __len__(self) -> int:
        return len(self.results)

    def store(self, task_id: str, payload: bytes, producer: ControlConnection | None) -> None:
        """Keep a result and push it to its producer and to whoever subscribed to it."""
        _bounded_put(self.results, task_id, payload, self.max_results)
        if self.progress:
            self.progress.pop(task_id, None)
        targets = self.subscribers.pop(task_id, None) if self.subscribers else None
        if targets is None:  # the common case: only its producer waits
            if producer is not None:
                producer.push_result(task_id, payload)
        else:
            if producer is not None:
                targets.add(producer)
            for conn in targets:
                conn.subscriptions.discard(task_id)
                conn.push_result(task_id, payload)
        if self.aliases:
            for alias, waiting in self.aliases.pop(task_id, ()):
                self.store(alias, payload, waiting)

    def alias(self, task_id: str, alias: str, conn: ControlConnection | None) -> None:
        """The result of ``task_id`` is also that of ``alias`` (a duplicate), for ``conn``."""
        self.aliases.setdefault(task_id, []).append((alias, conn))

    def subscribe(self, task_id: str, conn: ControlConnection) -> None:
        """Send ``conn`` the result of ``task_id`` now if it is here, else when it arrives."""
        payload = self.results.get(task_id)
        if payload is not None:
            conn.push_result(task_id, payload)
            return
        self.subscribers.setdefault(task_id, set()).add(conn)
        conn.subscriptions.add(task_id)

    def forget(self, conn: ControlConnection) -> None:
        for task_id in conn.subscriptions:
            waiting = self.subscribers.get(task_id)
            if waiting is not None:
                waiting.discard(conn)
                if not waiting:
                    del self.subscribers[task_id]
        conn.subscriptions.clear()

    def save_progress(self, task_id: str, payload: bytes) -> None:
        _bounded_put(self.progress, task_id, payload, self.max_results)

    def progress_of(self, task_id: str) -> Progress:
        return Progress(task_id, self.progress.get(task_id, b""))


def _bounded_put(table: OrderedDict[str, bytes], key: str, value: bytes, limit: int) -> None:
    if key in table:
        table.move_to_end(key)
    table[key] = value
    if len(table) > limit:
        table.popitem(last=False)
