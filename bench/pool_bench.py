"""End-to-end figures of pool + PoolBroker: throughput and sequential round trip."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
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


class CpuMeter:
    """CPU time (user + system) each process of a pool spends, per task: the producer (this
    process), the supervisor, each worker, and the supervisor's other children together."""

    def __init__(self, supervisor_pid: int, worker_pids: list[int]) -> None:
        import psutil

        supervisor = psutil.Process(supervisor_pid)
        others = [p for p in supervisor.children() if p.pid not in worker_pids]
        self.procs: dict[str, list[Any]] = {
            "producer": [psutil.Process()],
            "supervisor": [supervisor],
            **{f"worker {i}": [psutil.Process(pid)] for i, pid in enumerate(worker_pids)},
            "other children": others,
        }
        self.start = self._read()

    def _read(self) -> dict[str, float]:
        def cpu(proc: Any) -> float:
            times = proc.cpu_times()
            return float(times.user + times.system)

        return {name: sum(cpu(p) for p in procs) for name, procs in self.procs.items()}

    def per_task_us(self, tasks: int) -> dict[str, float]:
        end = self._read()
        per_task = {name: (end[name] - self.start[name]) / tasks * 1e6 for name in end}
        per_task["total"] = sum(per_task.values())
        return per_task


@contextlib.asynccontextmanager
async def warm_pool(workers: int, env: dict[str, str] | None = None) -> AsyncIterator[BenchPool]:
    """A pool of ``bench.apps`` with its broker connected and 1,000 tasks run through it."""
    from bench.apps import broker, noop

    async with BenchPool(workers, env=env) as pool:
        broker.run_dir = pool.run_dir
        await broker.startup()
        try:
            await throughput(broker, noop, 1000)
            yield pool
        finally:
            await broker.shutdown()


async def measure(workers: int = 2, total: int = 10_000, calls: int = 1000) -> dict[str, Any]:
    from bench.apps import broker, noop, state_bench

    async with warm_pool(workers) as pool:
        assert pool.proc is not None
        stats = await pool.stats()
        meter = CpuMeter(pool.proc.pid, [w["pid"] for w in stats["workers"]])
        tasks_per_s = await throughput(broker, noop, total)
        cpu_us = meter.per_task_us(total)
        latency = await round_trips(noop, calls)
        in_worker = await (await state_bench.kiq(5000)).wait_result(timeout=120)
    return {
        "workers": workers,
        "tasks": total,
        "throughput_tasks_per_s": tasks_per_s,
        "cpu_us_per_task": cpu_us,
        **latency,
        "one_cpu_p50_ms": await one_cpu_round_trip(workers, calls),
        "state_in_worker": in_worker.raise_for_error().return_value,
    }


async def one_cpu_round_trip(workers: int, calls: int) -> float:
    """The round trip p50 with this producer and the whole pool on one CPU: without the
    wake-ups across CPUs that a VM may charge dearly for (``bench.limit.measure``)."""
    from bench.apps import noop
    from bench.limit import on_one_cpu

    with on_one_cpu():
        async with warm_pool(workers):
            return (await round_trips(noop, calls))["p50_ms"]


if __name__ == "__main__":
    import json

    print(json.dumps(asyncio.run(measure()), indent=1))
