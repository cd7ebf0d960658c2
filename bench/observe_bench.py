"""Throughput of one pool with and without an event subscriber attached, in the same run.

Rounds alternate (without, with, without, with, ...) on the same pool, so that both see the
same machine; the figure of each is the median of its rounds. The subscriber is ``python -m pool
events --json`` in a process of its own (``--in-process``: ``pool.events`` in the producer's
loop, which then shares the producer's CPU; ``--dashboard``: the dashboard open in headless
Chromium, reading the stream as server-sent events).

    python -m bench.observe_bench [--workers 2] [--tasks 20000] [--rounds 5]
                                  [--in-process | --dashboard]

Beside throughput (noisy on a shared machine) it reports the CPU time per task summed over
every process involved (the producer, the supervisor and its children, the subscriber's
processes): that cost does not depend on what else the machine runs.

A round with a subscriber starts once the subscriber has subscribed and its processes have
settled (Chromium's start takes seconds of CPU: that is not the cost of an open page). The
figures also say how many events per task the subscriber saw, so that a subscriber which
kept up is told from one that dropped what it could not read.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
        # what ``pool events --json`` printed; closed in __aexit__
        self.output = tempfile.TemporaryFile()  # noqa: SIM115

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
                [*args, "--run-dir", self.bench_pool.run_dir], stdout=self.output
            )
        deadline = time.monotonic() + 30
        while (await self.bench_pool.stats())["event_subscribers"] < 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the subscriber did not subscribe in 30 s")
            await asyncio.sleep(0.02)
        if self.proc is not None:
            await asyncio.to_thread(settle, self.proc.pid)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self.proc is not None:
            stop(self.proc)
            if not self.page:
                self.output.seek(0)
                for line in self.output:
                    item = json.loads(line)
                    if item["event"] == "dropped":
                        self.dropped += item["count"]
                    else:
                        self.events += 1
        self.output.close()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes and their children, as far as they still run."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for proc in [root, *root.children(recursive=True)]:
                times = proc.cpu_times()
                total += times.user + times.system
        except psutil.Error:
            pass
    return total


async def measured_round(
    broker: Any, noop: Any, total: int, pids: list[int]
) -> tuple[float, float]:
    """Tasks/s of one round, and its CPU µs per task over ``pids`` (and their children)."""
    before = cpu_seconds(pids)
    rate = await throughput(broker, noop, total)
    return rate, (cpu_seconds(pids) - before) * 1e6 / total


def settle(pid: int, idle_percent: float = 10.0, timeout: float = 20.0) -> None:
    """Wait until the process ``pid`` and its children use less than ``idle_percent`` of a
    core over half a second (a browser's start is not the cost of its open page)."""
    import psutil

    root = psutil.Process(pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs = [root, *root.children(recursive=True)]
        before = sum(sum(p.cpu_times()[:2]) for p in procs if p.is_running())
        time.sleep(0.5)
        after = sum(sum(p.cpu_times()[:2]) for p in procs if p.is_running())
        if (after - before) / 0.5 * 100 < idle_percent:
            return


async def measure(
    workers: int = 2,
    total: int = 20000,
    rounds: int = 5,
    in_process: bool = False,
    dashboard: bool = False,
) -> dict[str, Any]:
    from bench.apps import broker, noop

    without: list[float] = []
    with_sub: list[float] = []
    cpu_without: list[float] = []
    cpu_with: list[float] = []
    seen = dropped = 0
    if dashboard and shutil.which("chromium") is None:
        raise SystemExit("--dashboard needs chromium (apt-get install chromium)")
    extra = ["--dashboard-port", "0"] if dashboard else []
    async with BenchPool(workers, "bench.apps:broker", *extra) as bench_pool:
        page = (await bench_pool.stats())["dashboard_url"] if dashboard else ""
        broker.run_dir = bench_pool.run_dir
        await broker.startup()
        try:
            await throughput(broker, noop, 1000)  # warm up
            assert bench_pool.proc is not None
            pids = [os.getpid(), bench_pool.proc.pid]
            for _ in range(rounds):
                rate, cpu = await measured_round(broker, noop, total, pids)
                without.append(rate)
                cpu_without.append(cpu)
                async with Subscriber(bench_pool, in_process, page) as sub:
                    subscriber = [sub.proc.pid] if sub.proc is not None else []
                    rate, cpu = await measured_round(broker, noop, total, pids + subscriber)
                    with_sub.append(rate)
                    cpu_with.append(cpu)
                seen, dropped = seen + sub.events, dropped + sub.dropped
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
        "cpu_us_per_task_without": round(median(cpu_without), 1),
        "cpu_us_per_task_with": round(median(cpu_with), 1),
        "cpu_cost_percent": round(100 * (median(cpu_with) / median(cpu_without) - 1), 1),
        # 3 when it kept up (received, started, succeeded); None: the page's digest is not
        # counted
        "events_seen_per_task": None if dashboard else round(seen / (total * rounds), 2),
        "events_dropped": None if dashboard else dropped,
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
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
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
