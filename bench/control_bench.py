"""Throughput of the embedded broker with task control, against plain tasks, in one run.

One pool; the same no-op task sent plain, with a ``priority`` label (0-9), under a
concurrency limit that binds (8 at once pool-wide) and one that does not (a cost-only
figure), and under a rate limit that does not bind. Each figure is tasks per second,
sending in batches and awaiting every result (``pool_bench.throughput``'s method); the
modes take turns, ``--rounds`` times, and each figure is the median of its rounds (a
machine whose load changes during the run then weighs on every mode alike).

    python -m bench.control_bench [--workers 2] [--tasks 10000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from bench.pool_run import BenchPool

MODES: dict[str, Any] = {
    "plain": None,
    "priority_0_9": lambda i: {"priority": i % 10},
    "concurrency_8": lambda i: {"concurrency": 8},
    "concurrency_unbound": lambda i: {"concurrency": 100_000},
    "rate_unbound": lambda i: {"rate_limit": "1000000/s"},
}


async def throughput(task: Any, labels: Any, total: int, batch: int = 1000) -> float:
    start = time.perf_counter()
    for offset in range(0, total, batch):
        handles = []
        for i in range(offset, min(offset + batch, total)):
            kicker = task.kicker()
            if labels is not None:
                kicker = kicker.with_labels(**labels(i))
            handles.append(await kicker.kiq())
        for handle in handles:
            (await handle.wait_result(timeout=120)).raise_for_error()
    return total / (time.perf_counter() - start)


async def measure(workers: int = 2, total: int = 10_000, rounds: int = 3) -> dict[str, Any]:
    from bench.apps import broker, noop
    from bench.stats import median

    samples: dict[str, list[float]] = {name: [] for name in MODES}
    async with BenchPool(workers) as pool:
        broker.run_dir = pool.run_dir
        await broker.startup()
        try:
            await throughput(noop, None, 1000)  # warm up
            for _ in range(rounds):
                for name, labels in MODES.items():
                    samples[name].append(await throughput(noop, labels, total))
        finally:
            await broker.shutdown()
    figures = {name: round(median(values), 1) for name, values in samples.items()}
    plain = figures["plain"]
    return {
        "workers": workers,
        "tasks": total,
        "rounds": rounds,
        "tasks_per_s": figures,
        "vs_plain": {name: round(value / plain, 3) for name, value in figures.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.control_bench")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.workers, args.tasks, args.rounds)), indent=1))


if __name__ == "__main__":
    main()
