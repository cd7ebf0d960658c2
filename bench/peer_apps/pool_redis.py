"""pool + ``pool.redis`` (``bench.redis_apps``), workers under ``python -m pool run``.

Results are pushed to the producer (``check_interval`` is passed and not needed).
"""

from __future__ import annotations

from bench.peer_apps.taskiq_redis import TaskiqDriver


def Driver() -> TaskiqDriver:
    from bench import redis_apps

    return TaskiqDriver(redis_apps.broker, redis_apps.noop)
