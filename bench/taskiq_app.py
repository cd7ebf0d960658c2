"""The peer: taskiq 0.13 with taskiq-redis, as its docs set it up (bench only)."""

from __future__ import annotations

import os

from taskiq_redis import RedisAsyncResultBackend, RedisStreamBroker

from bench.workloads import spin

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("BENCH_QUEUE", "bench-taskiq")

broker = RedisStreamBroker(
    REDIS_URL, queue_name=QUEUE, consumer_group_name=QUEUE, maxlen=200_000
).with_result_backend(
    RedisAsyncResultBackend(REDIS_URL, result_ex_time=600, prefix_str=f"{QUEUE}-result")
)


@broker.task(task_name="noop")
async def noop() -> None:
    return None


@broker.task(task_name="cpu")
def cpu(n: int) -> int:
    return spin(n)
