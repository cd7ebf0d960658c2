"""One peer's producer: ``python -m bench.peer_apps.drive PEER --tasks N --calls M [--count]``.

Waits for the peer's workers (a first task that comes back), warms up, then either times
(``--tasks`` in batches of ``--batch`` sent at once, the same sent one after another, then
``--calls`` sequential round trips; prints one JSON line) or, with ``--count``, frames the
batches sent at once and the round trips for ``bench.redis_peers``'s counting proxy: before
and after each it prints ``@<mark>`` and waits for a line on stdin.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import sys
import time
from typing import Any

from bench.stats import median, percentile


async def ready(driver: Any, limit: float = 60.0) -> None:
    """The first task that comes back (taskiq-redis skips tasks sent before its group exists)."""
    deadline = time.monotonic() + limit
    while True:
        try:
            await asyncio.wait_for(driver.one(2.0), 5.0)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise


def mark(name: str) -> None:
    print(f"@{name}", flush=True)
    sys.stdin.readline()


async def throughput(driver: Any, tasks: int, batch: int, at_once: bool = True) -> float:
    """Tasks per second, in batches: sent at once where the client can (``batch_at_once``:
    ``asyncio.gather``, saq's ``Queue.map``), else one send after another (``batch``)."""
    send = getattr(driver, "batch_at_once", driver.batch) if at_once else driver.batch
    start = time.perf_counter()
    for offset in range(0, tasks, batch):
        await send(min(batch, tasks - offset))
    return tasks / (time.perf_counter() - start)


async def round_trips(driver: Any, calls: int) -> list[float]:
    samples = []
    for _ in range(calls):
        start = time.perf_counter()
        await driver.one(30.0)
        samples.append((time.perf_counter() - start) * 1000)
    return samples


async def run(args: argparse.Namespace) -> dict[str, Any]:
    driver = importlib.import_module(f"bench.peer_apps.{args.peer}").Driver()
    await driver.start()
    try:
        await ready(driver)
        await driver.batch(min(500, args.tasks))
        if args.count:
            mark("batch")
            await throughput(driver, args.tasks, args.batch)
            mark("batch-done")
            mark("calls")
            await round_trips(driver, args.calls)
            mark("calls-done")
            return {}
        tasks_per_s = await throughput(driver, args.tasks, args.batch)
        one_by_one = await throughput(driver, args.tasks, args.batch, at_once=False)
        samples = await round_trips(driver, args.calls)
    finally:
        await driver.stop()
    return {
        "throughput_tasks_per_s": tasks_per_s,
        "sequential_tasks_per_s": one_by_one,
        "p50_ms": median(samples),
        "p99_ms": percentile(samples, 99),
        "samples_ms": samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.peer_apps.drive")
    parser.add_argument("peer")
    parser.add_argument("--tasks", type=int, default=4000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--count", action="store_true")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
