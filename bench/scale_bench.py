"""Operations figures: time to scale from 2 to 8 workers, memory, worker-count scaling,
and what reading stats costs the throughput."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import psutil

from bench.pool_bench import throughput
from bench.pool_run import BenchPool


async def scale_up(start_method: str) -> dict[str, Any]:
    from pool.runtime.client import request

    async with BenchPool(2, "bench.apps:broker", "--start-method", start_method) as pool:
        began = time.perf_counter()
        reply = await request({"cmd": "scale", "workers": 8, "timeout": 120}, pool.run_dir, 130)
        seconds = time.perf_counter() - began
        assert reply["ok"], reply
        await asyncio.sleep(1.0)  # let the new workers settle before reading their memory
        stats = await pool.stats()
        assert pool.proc is not None
        supervisor_rss = psutil.Process(pool.proc.pid).memory_info().rss
    return {
        "start_method": start_method,
        "scale_2_to_8_s": seconds,
        "idle_worker_rss_mib": statistics.median(w["rss_bytes"] for w in stats["workers"]) / 2**20,
        "supervisor_rss_mib": supervisor_rss / 2**20,
    }


async def by_workers(counts: tuple[int, ...] = (1, 2, 4), total: int = 10_000) -> dict[str, Any]:
    from bench.apps import broker, cpu, noop

    rows: dict[str, Any] = {}
    for workers in counts:
        async with BenchPool(workers) as pool:
            broker.run_dir = pool.run_dir
            await broker.startup()
            try:
                await throughput(broker, noop, 1000)
                rows[f"noop_{workers}w"] = await throughput(broker, noop, total)
                cpu_kicker = cpu.kicker()

                class Mix:
                    async def kiq(self, kicker: Any = cpu_kicker) -> Any:
                        return await kicker.kiq(20_000)

                rows[f"cpu_{workers}w"] = await throughput(broker, Mix(), 2000, batch=500)
            finally:
                await broker.shutdown()
    return rows


async def stats_cost(total: int = 10_000, rounds: int = 3) -> dict[str, float]:
    """Throughput with nobody reading stats and with a reader polling every second,
    alternated ``rounds`` times (medians), since one short run is mostly noise here."""
    from bench.apps import broker, noop

    quiet: list[float] = []
    watched: list[float] = []
    async with BenchPool(2) as pool:
        broker.run_dir = pool.run_dir
        await broker.startup()
        try:
            await throughput(broker, noop, 1000)
            for _ in range(rounds):
                quiet.append(await throughput(broker, noop, total))
                stop = asyncio.Event()

                async def watch(stop: asyncio.Event = stop) -> None:
                    while not stop.is_set():
                        await pool.stats()
                        try:
                            await asyncio.wait_for(stop.wait(), 1.0)
                        except asyncio.TimeoutError:
                            pass

                watcher = asyncio.create_task(watch())
                watched.append(await throughput(broker, noop, total))
                stop.set()
                await watcher
        finally:
            await broker.shutdown()
    without, with_watch = statistics.median(quiet), statistics.median(watched)
    return {"without_watch": without, "with_watch": with_watch, "ratio": with_watch / without}


async def measure() -> dict[str, Any]:
    return {
        "scale": [await scale_up("fork"), await scale_up("spawn")],
        "by_workers": await by_workers(),
        "stats_cost": await stats_cost(),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(asyncio.run(measure()), indent=1))
