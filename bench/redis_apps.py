"""The no-op task on pool + RedisStreamBroker, for the benchmarks."""

from __future__ import annotations

import os

from pool.redis import RedisResultBackend, RedisStreamBroker

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("BENCH_QUEUE", "bench-pool")

broker = RedisStreamBroker(
    REDIS_URL, queue_name=QUEUE, consumer_group_name=QUEUE, maxlen=200_000, xread_count=100
).with_result_backend(
    RedisResultBackend(REDIS_URL, prefix_str=f"{QUEUE}:result", result_ex_time=600)
)


@broker.task(task_name="noop")
async def noop() -> None:
    return None
