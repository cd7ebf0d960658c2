"""What Python's cyclic garbage collector costs a producer that sends in bursts.

A producer that sends 1,000 tasks at once (``asyncio.gather`` of ``kiq``) holds 1,000 chains
of coroutines, futures and messages while they wait for Redis: they outlive the young
collections and move to the oldest generation, whose growth then triggers full collections,
each of which walks every object the process holds (taskiq, pydantic, the app). Freezing the
heap once the app has started (``gc.freeze()``, Python's own advice for long-lived
processes) keeps what exists then out of those walks. pool's supervisor does so before it
forks workers; a producer is the application's process, so it is the application's call.

Rounds of ``--tasks`` on pool + ``pool.redis`` (2 workers), sent 1,000 at once, alternate:
the collector as it is, then (after ``gc.freeze()``) frozen. Prints the producer's CPU per
task and how much of it the collector took (``gc.callbacks``). ``--embedded``: on
``PoolBroker`` instead, 1,000 ``kiq`` one after another and then their results, as in
``make bench``'s throughput. Reproduce:
``python -m bench.producer_gc [--embedded] [--rounds N] [--tasks N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import time
from typing import Any

from bench.peer_apps.taskiq_redis import TaskiqDriver
from bench.pool_run import BenchPool
from bench.stats import median


class _CollectorClock:
    """CPU time spent in the collector, from ``gc.callbacks``."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.runs = 0
        self._start = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.thread_time()
        else:
            self.runs += 1
            self.seconds += time.thread_time() - self._start

    def close(self) -> None:
        gc.callbacks.remove(self._callback)


async def _round(
    driver: TaskiqDriver, tasks: int, clock: _CollectorClock, at_once: bool = True
) -> dict[str, float]:
    cpu, spent, runs = time.thread_time(), clock.seconds, clock.runs
    start = time.perf_counter()
    send = driver.batch_at_once if at_once else driver.batch
    for offset in range(0, tasks, 1000):
        await send(min(1000, tasks - offset))
    return {
        "tasks_per_s": tasks / (time.perf_counter() - start),
        "producer_cpu_us": (time.thread_time() - cpu) / tasks * 1e6,
        "collector_us": (clock.seconds - spent) / tasks * 1e6,
        "collections_per_1000": (clock.runs - runs) / tasks * 1000,
    }


async def measure(rounds: int = 3, tasks: int = 4000, embedded: bool = False) -> dict[str, Any]:
    os.environ.setdefault("BENCH_QUEUE", f"bench-gc-{os.getpid()}")
    from bench import apps
    from bench.peer_apps.pool_redis import Driver

    async with BenchPool(2, "bench.apps:broker" if embedded else "bench.redis_apps:broker") as pool:
        if embedded:
            apps.broker.run_dir = pool.run_dir
        driver = TaskiqDriver(apps.broker, apps.noop) if embedded else Driver()
        await driver.start()
        clock = _CollectorClock()
        at_once = not embedded
        try:
            await _round(driver, 2000, clock, at_once)  # warm: connections, the workers
            figures: dict[str, list[dict[str, float]]] = {"as_is": [], "frozen": []}
            for _ in range(rounds):
                for mode in figures:
                    if mode == "frozen":
                        gc.freeze()
                    figures[mode].append(await _round(driver, tasks, clock, at_once))
                    if mode == "frozen":
                        gc.unfreeze()
        finally:
            clock.close()
            await driver.stop()
    return {
        mode: {key: median([r[key] for r in runs]) for key in runs[0]}
        for mode, runs in figures.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.producer_gc", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=4000)
    parser.add_argument("--embedded", action="store_true", help="PoolBroker, not pool.redis")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.rounds, args.tasks, args.embedded)), indent=1))


if __name__ == "__main__":
    main()
