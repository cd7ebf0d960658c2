"""pool + RedisStreamBroker + RedisResultBackend, measured like the other setups."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from typing import Any

from bench.pool_bench import round_trips, throughput
from bench.pool_run import BenchPool
from bench.taskiq_peer import REDIS_URL, _cleanup


async def measure(workers: int = 2, total: int = 10_000, calls: int = 1000) -> dict[str, Any]:
    queue = f"bench-pool-{uuid.uuid4().hex[:8]}"
    os.environ.update({"BENCH_QUEUE": queue, "BENCH_REDIS_URL": REDIS_URL})
    sys.modules.pop("bench.redis_apps", None)
    from bench import redis_apps

    try:
        async with BenchPool(workers, "bench.redis_apps:broker"):
            broker = redis_apps.broker
            await broker.startup()
            try:
                await throughput(broker, redis_apps.noop, 1000)
                tasks_per_s = await throughput(broker, redis_apps.noop, total)
                latency = await round_trips(redis_apps.noop, calls)
            finally:
                await broker.shutdown()
    finally:
        await _cleanup(queue)
    return {"workers": workers, "tasks": total, "throughput_tasks_per_s": tasks_per_s, **latency}


if __name__ == "__main__":
    import json

    print(json.dumps(asyncio.run(measure()), indent=1))
