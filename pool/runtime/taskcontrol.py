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
``concurrency``           at most N of this task at once, pool-wide              ``limit``
``rate_limit``            at most N starts per period (``"10/s"``, ``"5/2m"``)   ``limit``
``limit_key``             a label or argument: one limit per value of it         ``limit``
``_retries``              taskiq's retry count (a retry is not a duplicate)      ``retry``
========================  =====================================================  ===========

The supervisor turns ``limit`` and the limits declared on the app's broker into
``limits`` (``limits_of``), once, before the task is journaled.
"""

from __future__ import annotations

import asyncio
import functools
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


def control_of(message: BrokerMessage, broker: Any = None) -> dict[str, Any] | None:
    """What the supervisor must know of ``message`` (None: nothing, a plain task)."""
    labels = message.labels
    if not labels or CONTROL_LABELS.isdisjoint(labels):
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
    if "concurrency" in labels or "rate_limit" in labels:
        control["limit"] = _limit_label(message, broker)
    return control or None


def _limit_label(message: BrokerMessage, broker: Any) -> dict[str, Any]:
    """The limit a task's labels declare (checked here; its key's value when it is a label
    or a keyword argument, else the supervisor finds it)."""
    labels = message.labels
    concurrency = labels.get("concurrency")
    spec: dict[str, Any] = {
        "concurrency": int(concurrency) if concurrency not in (None, "", "None") else None,
        "rate": labels.get("rate_limit") or None,
        "key": labels.get("limit_key") or None,
    }
    _checked(spec["concurrency"], spec["rate"], spec["key"])
    if spec["key"]:
        try:
            spec["value"] = _Sent(message.message, labels).value_of(
                spec["key"], message.task_name, broker
            )
        except ValueError:
            pass
    return spec


@functools.lru_cache(maxsize=1024)
def _checked(concurrency: int | None, rate: str | None, key: str | None) -> Limit:
    return Limit(concurrency, rate, key)


@functools.lru_cache(maxsize=4096)
def _wired(limit: Limit, task_name: str, value: Any) -> list[Any]:
    key = limit.scope or task_name
    if limit.key:
        key += f"[{limit.key}={value}]"
    count, period = parse_rate(limit.rate) if limit.rate is not None else (0, 0.0)
    return [key, int(limit.concurrency or 0), count, period]


def limits_of(broker: Any, entry: Entry) -> list[list[Any]]:
    """In the supervisor: the limits of ``entry``, those of its labels and those declared on
    ``broker`` (``PoolBroker.limit``), each ``[key, concurrency, rate count, period]``."""
    declared = (
        list(broker.limits.get(entry.task_name, ())) if getattr(broker, "limits", None) else []
    )
    spec = entry.get("limit")
    sent = _Sent(entry.payload, None)
    wire = [wire_limit(limit, entry.task_name, sent, broker) for limit in declared]
    if spec:
        limit = _checked(spec.get("concurrency"), spec.get("rate"), spec.get("key"))
        wire.append(wire_limit(limit, entry.task_name, sent, broker, spec.get("value")))
    return wire


def wire_limit(
    limit: Limit, task_name: str, sent: _Sent, broker: Any = None, value: Any = None
) -> list[Any]:
    """A limit as ``[key, concurrency or 0, rate count or 0, rate period or 0]``."""
    if limit.key and value is None:
        value = sent.value_of(limit.key, task_name, broker)
    try:
        return _wired(limit, task_name, value)
    except TypeError:  # a value that cannot be hashed: the same key, uncached
        return _wired.__wrapped__(limit, task_name, value)


class _Sent:
    """A task's message, decoded only if a limit's key needs its labels or arguments."""

    def __init__(self, payload: bytes, labels: dict[str, Any] | None) -> None:
        self.payload = payload
        self.labels = labels
        self._message: Any = None

    def value_of(self, name: str, task_name: str, broker: Any) -> Any:
        if self.labels is not None and name in self.labels:
            return self.labels[name]
        if self._message is None:
            from taskiq.formatters.json_formatter import JSONFormatter

            formatter = getattr(broker, "formatter", None) or JSONFormatter()
            self._message = formatter.loads(self.payload)
        sent = self._message
        if name in sent.labels:
            return sent.labels[name]
        if name in sent.kwargs:
            return sent.kwargs[name]
        task = broker.find_task(task_name) if broker is not None else None
        if task is not None:
            try:
                bound = inspect.signature(task.original_func).bind_partial(
                    *sent.args, **sent.kwargs
                )
            except TypeError:
                bound = None
            if bound is not None and name in bound.arguments:
                return bound.arguments[name]
        raise ValueError(
            f"task {task_name!r} is limited per {name!r}, but has no label or keyword "
            f"argument of that name"
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
