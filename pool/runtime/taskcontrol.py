"""Task control of the embedded broker: what a task's labels ask of the supervisor.

A producer's ``PoolBroker.kick`` reads the labels below once (``control_of``) and sends
them, parsed, beside the opaque message (a ``KickWith`` frame; a task with none of them
travels as a plain ``Kick``). The supervisor never decodes messages; it reads this dict,
and the journal keeps it with the task (``SpooledWith``), so that it survives a restart.

========================  =====================================================  ===========
label                     meaning                                                control key
========================  =====================================================  ===========
``delay``                 seconds from the kiq before it may start               ``eta``
``eta``                   when it may start: epoch seconds or ISO 8601 (UTC if   ``eta``
                          naive); with ``delay`` too, the later of the two
``priority``              an int, higher sooner (aging: see ``taskqueue``)       ``priority``
``dedup_key``             a second task with this key, queued or running, is     ``dedup``
                          not queued: its handle gets the first one's result
``dedup``                 ``False``: a task id that already finished runs again  ``rerun``
``timeout``               seconds; a hard limit (the worker is replaced)         ``timeout``
``concurrency``           at most N of this task at once, pool-wide              ``limits``
``rate_limit``            at most N starts per period (``"10/s"``, ``"5/2m"``)   ``limits``
``limit_key``             a label or argument: one limit per value of it         ``limits``
``_retries``              taskiq's retry count (a retry is not a duplicate)      ``retry``
========================  =====================================================  ===========
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import itertools
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from taskiq import BrokerMessage

    from pool.runtime.taskqueue import Entry

CONTROL_LABELS = frozenset(
    (
        "delay",
        "eta",
        "priority",
        "dedup_key",
        "dedup",
        "timeout",
        "concurrency",
        "rate_limit",
        "limit_key",
        "_retries",
    )
)
_PERIODS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*\.?\d*)\s*([smhd]?)\s*$")


@dataclass(frozen=True)
class Limit:
    """A limit declared on the broker (``PoolBroker.limit``) or by a task's labels.

    ``concurrency``: at most that many at once; ``rate``: at most ``count`` starts in any
    window of ``period`` seconds (``"10/s"``, ``"100/m"``, ``"5/2.5s"``, or a number per
    second); ``key``: the label or argument whose value has a limit of its own; ``scope``:
    the name tasks sharing the limit give (default: the task's name).
    """

    concurrency: int | None = None
    rate: str | float | None = None
    key: str | None = None
    scope: str | None = None

    def __post_init__(self) -> None:
        if self.concurrency is None and self.rate is None:
            raise ValueError("a limit needs a concurrency, a rate or both")
        if self.concurrency is not None and int(self.concurrency) < 1:
            raise ValueError("a concurrency limit must be at least 1")
        if self.rate is not None:
            parse_rate(self.rate)


def parse_rate(rate: str | float) -> tuple[int, float]:
    """``"10/s"`` -> (10, 1.0); a number is a count per second."""
    if isinstance(rate, int | float) or re.fullmatch(r"\s*\d+\s*", str(rate)):
        count, period = int(rate), 1.0
    else:
        match = _RATE.match(str(rate))
        if match is None:
            raise ValueError(f"a rate limit reads like '10/s' or '100/5m', not {rate!r}")
        count = int(match[1])
        period = float(match[2] or 1) * _PERIODS[match[3] or "s"]
    if count < 1 or period <= 0:
        raise ValueError(f"a rate limit needs a count and a period above 0, not {rate!r}")
    return count, period


def parse_eta(value: Any) -> float:
    """Epoch seconds, or an ISO 8601 time (naive: UTC)."""
    try:
        return float(value)
    except (TypeError, ValueError):
        pass
    when = datetime.fromisoformat(str(value))
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def _false(value: Any) -> bool:
    return str(value).strip().lower() in ("false", "0", "no", "off", "none")


def control_of(broker: Any, message: BrokerMessage) -> dict[str, Any] | None:
    """What the supervisor must know of ``message`` (None: nothing, a plain task)."""
    labels = message.labels
    declared: list[Limit] = broker.limits.get(message.task_name, []) if broker.limits else []
    if not declared and (not labels or CONTROL_LABELS.isdisjoint(labels)):
        return None
    control: dict[str, Any] = {}
    now = time.time()
    due = now + float(labels["delay"]) if "delay" in labels else 0.0
    if "eta" in labels:
        due = max(due, parse_eta(labels["eta"]))
    if due > now:
        control["eta"] = due
    if int(labels.get("priority", 0) or 0):
        control["priority"] = int(labels["priority"])
    if labels.get("dedup_key") not in (None, ""):
        control["dedup"] = f"{message.task_name}:{labels['dedup_key']}"
    if "dedup" in labels and _false(labels["dedup"]):
        control["rerun"] = True
    if labels.get("timeout") not in (None, "", "None"):
        control["timeout"] = float(labels["timeout"])
    if int(labels.get("_retries", 0) or 0):
        control["retry"] = int(labels["_retries"])
    limits = _limits(broker, message, declared)
    if limits:
        control["limits"] = limits
    return control or None


def _limits(broker: Any, message: BrokerMessage, declared: list[Limit]) -> list[list[Any]]:
    """Each limit as ``[key, concurrency or 0, rate count or 0, rate period or 0]``."""
    labels = message.labels
    limits = list(declared)
    if "concurrency" in labels or "rate_limit" in labels:
        limits.append(
            Limit(
                concurrency=int(labels["concurrency"]) if "concurrency" in labels else None,
                rate=labels.get("rate_limit"),
                key=labels.get("limit_key") or None,
            )
        )
    wire = []
    for limit in limits:
        key = limit.scope or message.task_name
        if limit.key:
            key += f"[{limit.key}={_value_of(broker, message, limit.key)}]"
        count, period = parse_rate(limit.rate) if limit.rate is not None else (0, 0.0)
        wire.append([key, int(limit.concurrency or 0), count, period])
    return wire


def _value_of(broker: Any, message: BrokerMessage, name: str) -> Any:
    """The value of the label or the argument ``name`` of the task in ``message``."""
    if name in message.labels:
        return message.labels[name]
    sent = broker.formatter.loads(message.message)
    if name in sent.kwargs:
        return sent.kwargs[name]
    task = broker.find_task(message.task_name)
    if task is not None:
        try:
            bound = inspect.signature(task.original_func).bind_partial(*sent.args, **sent.kwargs)
        except TypeError:
            bound = None
        if bound is not None and name in bound.arguments:
            return bound.arguments[name]
    raise ValueError(
        f"task {message.task_name!r} is limited per {name!r}, but has no label or argument "
        f"of that name"
    )


class DelayHeap:
    """Entries waiting for their ``eta``: one timer, for the earliest (no polling).

    ``release`` gets the entries that are due, never before their time (wall clock)."""

    def __init__(self, release: Callable[[list[Entry]], None]) -> None:
        self.release = release
        self.heap: list[tuple[float, int, Entry]] = []
        self.timer: asyncio.TimerHandle | None = None
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self.heap)

    def __iter__(self) -> Iterator[Entry]:
        return (item[2] for item in sorted(self.heap))

    def hold(self, entry: Entry, due: float) -> None:
        heapq.heappush(self.heap, (due, next(self._seq), entry))
        if self.heap[0][2] is entry:
            self._arm()

    def remove(self, entry: Entry) -> bool:
        for i, item in enumerate(self.heap):
            if item[2] is entry:
                self.heap[i] = self.heap[-1]
                self.heap.pop()
                heapq.heapify(self.heap)
                self._arm()
                return True
        return False

    def clear(self) -> list[Entry]:
        entries = list(self)
        self.heap.clear()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        return entries

    def _arm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.heap:
            delay = max(0.0, self.heap[0][0] - time.time())
            self.timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self.timer = None
        now = time.time()
        due: list[Entry] = []
        while self.heap and self.heap[0][0] <= now:
            due.append(heapq.heappop(self.heap)[2])
        self._arm()
        if due:
            self.release(due)
