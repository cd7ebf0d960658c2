"""Pool-wide concurrency and rate limits, enforced where the embedded broker dispatches.

Each limit has a key (the task's name, or a scope several tasks share, with the value of a
label or argument when it is per key: ``charge[customer_id=42]``) and holds at most
``concurrency`` deliveries in flight (handed to a worker and not acknowledged) and at most
``count`` deliveries started in any window of ``period`` seconds. One supervisor hands out
every task, so the limits are exact across all workers.

A task over a limit is parked (out of the queue, so it holds back no other task) until
a slot frees (an acknowledgement, a worker's death, a cancellation) or the rate window
moves on (one timer per key, no polling); it then goes back into the queue at the rank it
had. A limit's figures are those the latest task with that key brought.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pool.runtime.taskqueue import Entry


class Limiter:
    def __init__(self, requeue: Callable[[list[Entry]], None]) -> None:
        self.requeue = requeue
        self.running: dict[str, int] = {}
        self.starts: dict[str, deque[float]] = {}
        self.waiting: dict[str, deque[Entry]] = {}
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.parked = 0

    def __iter__(self) -> Iterator[Entry]:
        for entries in self.waiting.values():
            yield from entries

    def admit(self, entry: Entry) -> bool:
        """Take a slot of each of ``entry``'s limits, or park it (False) on the first one
        that has none free."""
        limits = entry.get("limits", ())
        now = time.monotonic()
        for key, concurrency, count, period in limits:
            if concurrency and self.running.get(key, 0) >= concurrency:
                self._park(key, entry)
                return False
            if count:
                starts = self.starts.get(key)
                if starts:
                    while starts and starts[0] <= now - period:
                        starts.popleft()
                    if len(starts) >= count:
                        self._park(key, entry)
                        self._arm(key, starts[0] + period - now, count, period)
                        return False
        for key, concurrency, count, _ in limits:
            if concurrency:
                self.running[key] = self.running.get(key, 0) + 1
            if count:
                self.starts.setdefault(key, deque()).append(now)
        return True

    def release(self, entry: Entry) -> None:
        """``entry``, admitted before, is no longer in flight: its slots are free."""
        for key, concurrency, _, _ in entry.get("limits", ()):
            if concurrency:
                left = self.running.get(key, 1) - 1
                if left > 0:
                    self.running[key] = left
                else:
                    self.running.pop(key, None)
                self._wake(key, 1)

    def withdraw(self, entry: Entry) -> bool:
        """Take a parked entry away (it was cancelled)."""
        for key, entries in self.waiting.items():
            if entry in entries:
                entries.remove(entry)
                self.parked -= 1
                if not entries:
                    del self.waiting[key]
                return True
        return False

    def drain(self) -> list[Entry]:
        entries = list(self)
        self.waiting.clear()
        self.parked = 0
        for timer in self.timers.values():
            timer.cancel()
        self.timers.clear()
        return entries

    def _park(self, key: str, entry: Entry) -> None:
        self.waiting.setdefault(key, deque()).append(entry)
        self.parked += 1

    def _wake(self, key: str, count: int) -> None:
        entries = self.waiting.get(key)
        if not entries:
            return
        woken = [entries.popleft() for _ in range(min(count, len(entries)))]
        self.parked -= len(woken)
        if not entries:
            del self.waiting[key]
        self.requeue(woken)

    def _arm(self, key: str, delay: float, count: int, period: float) -> None:
        if key not in self.timers:
            loop = asyncio.get_running_loop()
            self.timers[key] = loop.call_later(max(0.0, delay), self._window, key, count, period)

    def _window(self, key: str, count: int, period: float) -> None:
        """The rate window of ``key`` moved on: wake as many as it now has room for."""
        del self.timers[key]
        starts = self.starts.get(key, deque())
        now = time.monotonic()
        while starts and starts[0] <= now - period:
            starts.popleft()
        if not starts:
            self.starts.pop(key, None)
        self._wake(key, count - len(starts))
        if self.waiting.get(key):  # the next window: when the oldest start leaves it
            self._arm(key, starts[0] + period - now if starts else period, count, period)
