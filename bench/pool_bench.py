"""End-to-end figures of pool + PoolBroker: throughput and sequential round trip."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.pool_run import BenchPool
from bench.stats import median, percentile


async def throughput(broker: Any, task: Any, total: int, batch: int = 1000) -> float:
    """Tasks per second: send ``total`` tasks in batches, await every result."""
    start = time.perf_counter()
    for offset in range(0, total, batch):
        handles = [await task.kiq() for _ in range(min(batch, total - offset))]
        for handle in handles:
            (await handle.wait_result(timeout=120)).raise_for_error()
    return total / (time.perf_counter() - start)


async def round_trips(task: Any, count: int, check_interval: float = 0.2) -> dict[str, float]:
    """Sequential kiq + wait_result, in milliseconds."""
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await (await task.kiq()).wait_result(check_interval=check_interval, timeout=30)
        samples.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": median(samples), "p99_ms": percentile(samples, 99)}


async def measure(workers: int = 2, total: int = 10_000, calls: int = 1000) -> dict[str, Any]:
    from bench.apps import broker, noop, state_bench

    async with BenchPool(workers) as pool:
        broker.run_dir = pool.run_dir
        await broker.startup()
        try:
            await throughput(broker, noop, 1000)  # warm up
            tasks_per_s = await throughput(broker, noop, total)
            latency = await round_trips(noop, calls)
            in_worker = await (await state_bench.kiq(5000)).wait_result(timeout=120)
        finally:
            await broker.shutdown()
    return {
        "workers": workers,
        "tasks": total,
        "throughput_tasks_per_s": tasks_per_s,
        **latency,
        "state_in_worker": in_worker.raise_for_error().return_value,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(asyncio.run(measure()), indent=1))
