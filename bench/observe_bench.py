"""Throughput of one pool with and without an event subscriber attached, in the same run.

Rounds alternate (without, with, without, with, ...) on the same pool, so that both see the
same machine; the figure of each is the median of its rounds. The subscriber is ``python -m pool
events --json`` in a process of its own (``--in-process``: ``pool.events`` in the producer's
loop, which then shares the producer's CPU; ``--dashboard``: the dashboard open in headless
Chromium, reading the stream as server-sent events).

    python -m bench.observe_bench [--workers 2] [--tasks 5000] [--rounds 3]
                                  [--in-process | --dashboard]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.pool_bench import throughput
from bench.pool_run import BenchPool, stop
from bench.stats import median


class Subscriber:
    """``pool events --json`` in a process of its own, as an operator would run it (its
    output is discarded); or, with ``in_process``, ``pool.events`` in the producer's loop."""

    def __init__(self, bench_pool: BenchPool, in_process: bool = False, page: str = "") -> None:
        self.bench_pool = bench_pool
        self.in_process = in_process
        self.page = page  # the dashboard's address: open it in headless Chromium instead
        self.events = 0
        self.dropped = 0
        self.task: asyncio.Task[None] | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    async def _read(self) -> None:
        import pool

        async for item in pool.events(self.bench_pool.run_dir):
            if item["event"] == "dropped":
                self.dropped += item["count"]
            else:
                self.events += 1

    async def __aenter__(self) -> Subscriber:
        if self.in_process:
            self.task = asyncio.create_task(self._read())
        elif self.page:
            profile = tempfile.mkdtemp(prefix="pb-chromium-")
            args = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
            self.proc = subprocess.Popen(
                [*args, f"--user-data-dir={profile}", "--remote-debugging-port=0", self.page],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        else:
            args = [sys.executable, "-m", "pool", "events", "--json"]
            self.proc = subprocess.Popen(
                [*args, "--run-dir", self.bench_pool.run_dir], stdout=subprocess.DEVNULL
            )
        deadline = time.monotonic() + 30
        while (await self.bench_pool.stats())["event_subscribers"] < 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the subscriber did not subscribe in 30 s")
            await asyncio.sleep(0.02)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self.proc is not None:
            stop(self.proc)


async def measure(
    workers: int = 2,
    total: int = 5000,
    rounds: int = 3,
    in_process: bool = False,
    dashboard: bool = False,
) -> dict[str, Any]:
    from bench.apps import broker, noop

    without: list[float] = []
    with_sub: list[float] = []
    if dashboard and shutil.which("chromium") is None:
        raise SystemExit("--dashboard needs chromium (apt-get install chromium)")
    extra = ["--dashboard-port", "0"] if dashboard else []
    async with BenchPool(workers, "bench.apps:broker", *extra) as bench_pool:
        page = (await bench_pool.stats())["dashboard_url"] if dashboard else ""
        broker.run_dir = bench_pool.run_dir
        await broker.startup()
        try:
            await throughput(broker, noop, 1000)  # warm up
            for _ in range(rounds):
                without.append(await throughput(broker, noop, total))
                async with Subscriber(bench_pool, in_process, page):
                    with_sub.append(await throughput(broker, noop, total))
        finally:
            await broker.shutdown()
    base, observed = median(without), median(with_sub)
    return {
        "workers": workers,
        "tasks_per_round": total,
        "rounds": rounds,
        "without_subscriber_tasks_per_s": round(base, 1),
        "with_subscriber_tasks_per_s": round(observed, 1),
        "cost_percent": round(100 * (1 - observed / base), 1),
        "subscriber": (
            "the dashboard in headless chromium"
            if dashboard
            else "pool.events in the producer"
            if in_process
            else "pool events --json"
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--in-process", action="store_true", help="subscribe in the producer's own loop"
    )
    parser.add_argument(
        "--dashboard", action="store_true", help="the dashboard open in headless chromium"
    )
    args = parser.parse_args()
    figures = asyncio.run(
        measure(args.workers, args.tasks, args.rounds, args.in_process, args.dashboard)
    )
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
