"""The app of the scheduler subprocess tests: ``python -m pool scheduler scheduler_app:...``.

The task runs in the scheduler process (InMemoryBroker) and appends ``<tag> <pid>`` to the
file ``$POOL_TEST_MARK``.

* ``scheduler``: one in-memory schedule, ``mark("interval")`` every second.
* ``redis_scheduler``: the schedules of a ``RedisScheduleSource`` (hash
  ``$POOL_TEST_SCHEDULE_PREFIX``) with its run claim, so several such processes send each
  run once.
"""

from __future__ import annotations

import os

from pool import InMemoryBroker, TaskiqScheduler
from pool.scheduler import InMemoryScheduleSource, ScheduledTask

URL = os.environ.get("POOL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("POOL_TEST_SCHEDULE_PREFIX", "pooltest:scheduler-app")

broker = InMemoryBroker()


@broker.task("mark")
def mark(tag: str) -> None:
    with open(os.environ["POOL_TEST_MARK"], "a") as out:
        out.write(f"{tag} {os.getpid()}\n")


scheduler = TaskiqScheduler(
    broker, [InMemoryScheduleSource([ScheduledTask("mark", interval=1, args=["interval"])])]
)


not_a_scheduler = broker


def __getattr__(name: str) -> object:
    # built on first access, so the in-memory scheduler works without redis-py
    if name == "redis_scheduler":
        from pool.redis import RedisScheduleSource

        value = TaskiqScheduler(broker, [RedisScheduleSource(URL, prefix=PREFIX)])
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
