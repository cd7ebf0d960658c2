"""The app of the scheduler subprocess tests: ``python -m pool scheduler scheduler_app:...``.

The task runs in the scheduler process (InMemoryBroker) and appends ``<tag> <pid>`` to the
file ``$POOL_TEST_MARK``.

* ``scheduler``: taskiq's ``TaskiqScheduler`` with one in-memory schedule,
  ``mark("interval")`` every second.
* ``redis_scheduler``: taskiq's ``TaskiqScheduler`` on the schedules of a
  ``RedisScheduleSource`` (hash ``$POOL_TEST_SCHEDULE_PREFIX``): the CLI adds the source's run
  claim, so several such processes send each run once.
* ``label_scheduler``: taskiq's ``LabelScheduleSource`` (a one-shot at
  ``$POOL_TEST_WHEN``, ISO), for ``--claims``.
* ``make_scheduler``: a function returning a scheduler, as ``taskiq scheduler`` accepts.
"""

from __future__ import annotations

import os
from datetime import datetime

from taskiq import InMemoryBroker, ScheduledTask, TaskiqScheduler
from taskiq.schedule_sources import LabelScheduleSource

from pool.extensions.scheduler import InMemoryScheduleSource

URL = os.environ.get("POOL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("POOL_TEST_SCHEDULE_PREFIX", "pooltest:scheduler-app")
WHEN = os.environ.get("POOL_TEST_WHEN")

broker = InMemoryBroker()

_labels = {"schedule": [{"time": datetime.fromisoformat(WHEN), "args": ["label"]}]} if WHEN else {}


@broker.task("mark", **_labels)
def mark(tag: str) -> None:
    with open(os.environ["POOL_TEST_MARK"], "a") as out:
        out.write(f"{tag} {os.getpid()}\n")


def _every_second() -> InMemoryScheduleSource:
    schedule = ScheduledTask(task_name="mark", labels={}, args=["interval"], kwargs={}, interval=1)
    return InMemoryScheduleSource([schedule])


scheduler = TaskiqScheduler(broker, [_every_second()])


def make_scheduler() -> TaskiqScheduler:
    return TaskiqScheduler(broker, [_every_second()])


label_scheduler = TaskiqScheduler(broker, [LabelScheduleSource(broker)])

not_a_scheduler = broker


def __getattr__(name: str) -> object:
    # built on first access, so the in-memory scheduler works without redis-py
    if name == "redis_scheduler":
        from pool.redis import RedisScheduleSource

        value = TaskiqScheduler(broker, [RedisScheduleSource(URL, prefix=PREFIX)])
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
