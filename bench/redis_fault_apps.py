"""The fault tasks of ``bench.faults`` (``fault_run``, ``poison``) on pool + RedisStreamBroker.

``$BENCH_QUEUE`` names the stream (and prefixes every key the run creates), so that a run
cleans up only its own keys.
"""

from __future__ import annotations

import os

from bench import apps
from pool.redis import RedisResultBackend, RedisStreamBroker

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("BENCH_QUEUE", "bench-pool-faults")


def make_broker(url: str = REDIS_URL, queue: str = QUEUE) -> RedisStreamBroker:
    """The same broker for the workers and for the producer; a dead worker's tasks are
    taken over after 2 s (the default, 10 minutes, is for production)."""
    return RedisStreamBroker(
        url, queue_name=queue, consumer_group_name=queue, idle_timeout=2000, xread_block=200
    ).with_result_backend(RedisResultBackend(url, prefix_str=f"{queue}:result", result_ex_time=600))


broker = make_broker()


# the very tasks of the embedded broker's fault runs (bench.apps), on this broker
broker.task(task_name="fault_run")(apps.fault_run.original_func)
broker.task(task_name="poison")(apps.poison.original_func)


def unreachable(url: str = REDIS_URL) -> str | None:
    """Why Redis at ``url`` cannot be used, or None."""
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"no Redis at {url} ({type(exc).__name__}: {exc})"
    finally:
        client.close()
    return None


def delete_keys(queue: str, url: str = REDIS_URL) -> None:
    """Delete the keys of one run (``queue`` and ``queue:*``), never any other."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=10)
    try:
        keys = [queue, *client.scan_iter(match=f"{queue}:*", count=1000)]
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])
    finally:
        client.close()
