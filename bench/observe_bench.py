"""Throughput of one pool with and without an event subscriber attached, in the same run.

Rounds alternate (without, with, without, ..., without) on the same pool, so that both see
the same machine. The cost is the median over the rounds with a subscriber of each one's
drop against the mean of the two rounds without around it (so that the machine's drift
between rounds cancels), with its quartiles. What watches the pool
(``--subscriber``): by default the dashboard open in headless Chromium together with
``python -m pool events --json`` in a process of its own; or one of them alone; or
``pool.events`` in the producer's own loop, which then shares the producer's CPU.

    python -m bench.observe_bench [--workers 2] [--tasks 20000] [--rounds 9]
                                  [--subscriber both|cli|in_process|dashboard]

Beside throughput (noisy on a shared machine: the subscriber's processes share its cores)
it reports the CPU time per task of the producer and the pool's processes (the supervisor and
its children), and apart from it that of the subscriber's own processes: those costs do not
depend on what else the machine runs.

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

SUBSCRIBERS = {
    "both": "the dashboard open in headless chromium and `pool events --json`",
    "cli": "`pool events --json`",
    "in_process": "`pool.events` in the producer's own loop",
    "dashboard": "the dashboard open in headless chromium",
}


# Chromium's own background work (updaters, sync, metrics, field trials), which a browser
# on an operator's laptop does anyway, is not the cost of the page: switched off, as browser
# automation does (Playwright's and Puppeteer's defaults hold these flags)
CHROMIUM_QUIET = [
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-sync",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
    "--metrics-recording-only",
    "--mute-audio",
]


class Subscriber:
    """What watches the pool during a round (``SUBSCRIBERS``): ``pool events --json`` in a
    process of its own, as an operator would run it; ``pool.events`` in the producer's loop;
    the dashboard in headless Chromium; or the page and ``pool events`` together."""

    def __init__(self, bench_pool: BenchPool, kind: str, page: str = "") -> None:
        self.bench_pool = bench_pool
        self.kind = kind
        self.page = page
        self.events = 0
        self.dropped = 0
        self.task: asyncio.Task[None] | None = None
        self.procs: list[subprocess.Popen[bytes]] = []
        self.profile = ""  # Chromium's profile directory, removed at the end
        # what ``pool events --json`` printed; closed in __aexit__
        self.output = tempfile.TemporaryFile()  # noqa: SIM115

    @property
    def counts_events(self) -> bool:
        return self.kind != "dashboard"

    def _count(self, item: dict[str, Any]) -> None:
        if item["event"] == "dropped":
            self.dropped += item["count"]
        else:
            self.events += 1

    async def _read(self) -> None:
        import pool

        async for item in pool.events(self.bench_pool.run_dir):
            self._count(item)

    async def __aenter__(self) -> Subscriber:
        if self.kind == "in_process":
            self.task = asyncio.create_task(self._read())
        if self.kind in ("dashboard", "both"):
            self.profile = tempfile.mkdtemp(prefix="pb-chromium-")
            args = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", *CHROMIUM_QUIET]
            self.procs.append(subprocess.Popen(
                [*args, f"--user-data-dir={self.profile}", "--remote-debugging-port=0", self.page],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ))  # fmt: skip
        if self.kind in ("cli", "both"):
            args = [sys.executable, "-m", "pool", "events", "--json"]
            self.procs.append(subprocess.Popen(
                [*args, "--run-dir", self.bench_pool.run_dir], stdout=self.output
            ))  # fmt: skip
        want = 2 if self.kind == "both" else 1
        deadline = time.monotonic() + 30
        while (await self.bench_pool.stats())["event_subscribers"] < want:
            if time.monotonic() > deadline:
                raise RuntimeError("the subscriber did not subscribe in 30 s")
            await asyncio.sleep(0.02)
        for proc in self.procs:
            await asyncio.to_thread(settle, proc.pid)
        return self

    async def _caught_up(self, quiet: float = 0.3, timeout: float = 10.0) -> None:
        """Until the subscriber has read what the round sent: what it read stops growing (the
        events of the round's last tasks are still on their way when the round ends)."""
        size, still_since = -1, time.monotonic()
        deadline = still_since + timeout
        while time.monotonic() < deadline:
            now_size = self.events + os.fstat(self.output.fileno()).st_size
            if now_size != size:
                size, still_since = now_size, time.monotonic()
            elif time.monotonic() - still_since >= quiet:
                return
            await asyncio.sleep(0.05)

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self.procs]

    async def __aexit__(self, *exc: object) -> None:
        if self.counts_events:
            await self._caught_up()
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        for proc in self.procs:
            stop(proc)
        if self.profile:
            shutil.rmtree(self.profile, ignore_errors=True)
        if self.kind in ("cli", "both"):
            self.output.seek(0)
            for line in self.output:
                self._count(json.loads(line))
        self.output.close()


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes and their children, as far as they still run
    (this process's own alone: the pool and the subscribers are its children)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            tree = [root] if pid == os.getpid() else [root, *root.children(recursive=True)]
            for proc in tree:
                times = proc.cpu_times()
                total += times.user + times.system
        except psutil.Error:
            pass
    return total


async def measured_round(
    broker: Any, noop: Any, total: int, pool_pids: list[int], watcher_pids: list[int]
) -> tuple[float, float, float]:
    """Tasks/s of one round, and its CPU µs per task: over the producer and the pool, and over
    the subscriber's own processes (each with their children)."""
    before, watchers_before = cpu_seconds(pool_pids), cpu_seconds(watcher_pids)
    rate = await throughput(broker, noop, total)
    pool_cpu = (cpu_seconds(pool_pids) - before) * 1e6 / total
    return rate, pool_cpu, (cpu_seconds(watcher_pids) - watchers_before) * 1e6 / total


def bracketed_costs(without: list[float], with_: list[float]) -> list[float]:
    """For each round with a subscriber, in percent, how much lower it is than the mean of
    the rounds without just before and just after it (``without`` has one round more)."""
    return [
        100 * (1 - value / ((without[i] + without[i + 1]) / 2)) for i, value in enumerate(with_)
    ]


def quartiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 4], ordered[(3 * (len(ordered) - 1) + 3) // 4]


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
    workers: int = 2, total: int = 20000, rounds: int = 9, kind: str = "both"
) -> dict[str, Any]:
    """Alternating rounds without and with the subscriber ``kind`` (``SUBSCRIBERS``)."""
    from bench.apps import broker, noop

    rates: dict[str, list[float]] = {"without": [], "with": []}
    pool_cpu: dict[str, list[float]] = {"without": [], "with": []}
    watcher_cpu: list[float] = []
    seen = dropped = 0
    page_needed = kind in ("dashboard", "both")
    if page_needed and shutil.which("chromium") is None:
        raise SystemExit(f"{kind} needs chromium (apt-get install chromium)")
    extra = ["--dashboard-port", "0"] if page_needed else []
    async with BenchPool(workers, "bench.apps:broker", *extra) as bench_pool:
        page = (await bench_pool.stats())["dashboard_url"] if page_needed else ""
        broker.run_dir = bench_pool.run_dir
        await broker.startup()
        try:
            await throughput(broker, noop, 1000)  # warm up
            assert bench_pool.proc is not None
            pids = [os.getpid(), bench_pool.proc.pid]
            for n in range(rounds + 1):  # without, with, ..., without: each with between two
                rate, cpu, _ = await measured_round(broker, noop, total, pids, [])
                rates["without"].append(rate)
                pool_cpu["without"].append(cpu)
                if n == rounds:
                    break
                async with Subscriber(bench_pool, kind, page) as sub:
                    rate, cpu, watching = await measured_round(broker, noop, total, pids, sub.pids)
                    rates["with"].append(rate)
                    pool_cpu["with"].append(cpu)
                    watcher_cpu.append(watching)
                seen, dropped = seen + sub.events, dropped + sub.dropped
        finally:
            await broker.shutdown()
    base, observed = median(rates["without"]), median(rates["with"])
    cpu_without, cpu_with = median(pool_cpu["without"]), median(pool_cpu["with"])
    watching = median(watcher_cpu)
    counted = kind != "dashboard"
    costs = bracketed_costs(rates["without"], rates["with"])
    cpu_costs = [-c for c in bracketed_costs(pool_cpu["without"], pool_cpu["with"])]
    return {
        "workers": workers,
        "tasks_per_round": total,
        "rounds": rounds,
        "kind": kind,
        "subscriber": SUBSCRIBERS[kind],
        "without_subscriber_tasks_per_s": round(base, 1),
        "with_subscriber_tasks_per_s": round(observed, 1),
        # the median over the rounds with a subscriber of each one's cost against the two
        # rounds without around it (the machine's drift cancels), and their spread
        "cost_percent": round(median(costs), 1),
        "cost_percent_quartiles": [round(q, 1) for q in quartiles(costs)],
        # CPU per task of the producer and the pool's processes
        "pool_cpu_us_per_task_without": round(cpu_without, 1),
        "pool_cpu_us_per_task_with": round(cpu_with, 1),
        "pool_cpu_cost_percent": round(median(cpu_costs), 1),
        # and of the subscriber's own processes (chromium, pool events)
        "subscriber_cpu_us_per_task": round(watching, 1),
        "all_cpu_cost_percent": round(100 * ((cpu_with + watching) / cpu_without - 1), 1),
        # 3 when it kept up (received, started, succeeded); None: the page's digest only
        "events_seen_per_task": round(seen / (total * rounds), 2) if counted else None,
        "events_dropped": dropped if counted else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument(
        "--subscriber",
        choices=sorted(SUBSCRIBERS),
        default="both",
        help="what watches the pool: " + "; ".join(f"{k}: {v}" for k, v in SUBSCRIBERS.items()),
    )
    args = parser.parse_args()
    figures = asyncio.run(measure(args.workers, args.tasks, args.rounds, args.subscriber))
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
