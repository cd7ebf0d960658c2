"""Faults, counted: what a producer's exit, a supervisor's SIGKILL, a graceful stop under
load, poison tasks (on the embedded broker and on pool's Redis broker) and a full disk
lose; and what the journal costs (``--no-journal``).

Every task appends its tag to a file (``$BENCH_RUNS_FILE``) when it runs, so runs are
counted across pools: *lost* is a task whose ``kiq`` returned and that never ran (or whose
handle never got a result), *ran twice* one that ran more than once (at-least-once delivery
after a crash), *innocent failures* tasks that failed though they were not poison.
"""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.pool_run import ROOT, BenchPool
from bench.stats import median


class Runs:
    """The file every ``fault_run`` appends its tag to."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pr-", dir="/tmp"))
        self.path = self.dir / "runs"
        self.env = {"BENCH_RUNS_FILE": str(self.path)}

    def counts(self) -> collections.Counter[str]:
        try:
            return collections.Counter(self.path.read_text().split())
        except FileNotFoundError:
            return collections.Counter()

    async def wait_all(
        self, tags: Iterable[str], timeout: float = 180.0
    ) -> collections.Counter[str]:
        wanted = set(tags)
        deadline = time.monotonic() + timeout
        while True:
            counts = self.counts()
            if wanted <= set(counts) or time.monotonic() > deadline:
                return counts
            await asyncio.sleep(0.1)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def tally(tags: list[str], counts: collections.Counter[str], no_result: int = 0) -> dict[str, int]:
    never = sum(1 for t in tags if counts[t] == 0)
    return {
        "sent": len(tags),
        "lost": max(never, no_result),
        "never_ran": never,
        "no_result": no_result,
        "ran_twice": sum(1 for t in tags if counts[t] > 1),
        "innocent_failures": 0,
    }


async def results_of(handles: list[Any], timeout: float = 180.0) -> list[Any]:
    return await asyncio.gather(
        *(h.wait_result(timeout=timeout) for h in handles), return_exceptions=True
    )


def failed(result: Any) -> bool:
    return isinstance(result, BaseException) or result.is_err


def wait_gone(pids: Iterable[int], timeout: float = 30.0) -> None:
    import psutil

    deadline = time.monotonic() + timeout
    for pid in pids:
        try:
            psutil.Process(pid).wait(max(0.1, deadline - time.monotonic()))
        except psutil.NoSuchProcess:
            pass
        except psutil.TimeoutExpired:
            os.kill(pid, signal.SIGKILL)


def children(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


async def _use(run_dir: str, connect_timeout: float = 60.0) -> Any:
    from bench.apps import broker

    broker.run_dir = run_dir
    broker.connect_timeout = connect_timeout
    await broker.startup()
    return broker


# ----------------------------------------------------------------------- scenarios
async def producer_exit(total: int = 5000) -> dict[str, Any]:
    """A producer process sends ``total`` tasks and exits at once (no shutdown)."""
    runs = Runs()
    try:
        # a small queue: the supervisor stops reading, the producer's writes back up
        async with BenchPool(2, "bench.apps:broker", "--queue-size", "20", env=runs.env) as pool:
            producer = (
                "import asyncio\n"
                "from bench.apps import broker, fault_run\n"
                f"broker.run_dir = {pool.run_dir!r}\n"
                "async def main():\n"
                f"    for i in range({total}):\n"
                "        await fault_run.kiq(f'p{i}', 'x' * 1000)\n"
                "asyncio.run(main())\n"
            )
            env = {**os.environ, "PYTHONPATH": str(ROOT), **runs.env}
            subprocess.run([sys.executable, "-c", producer], env=env, timeout=300, check=True)
            tags = [f"p{i}" for i in range(total)]
            return tally(tags, await runs.wait_all(tags))
    finally:
        runs.close()


async def first_pool(
    run_dir: str, runs: Runs, max_async_tasks: int = 2, log: Path | None = None
) -> BenchPool:
    """The pool a fault ends, on ``run_dir`` for the next one (1 worker; the caller exits it)."""
    first = BenchPool(1, "bench.apps:broker", "--max-async-tasks", str(max_async_tasks),
                      run_dir=run_dir, env=runs.env, log=log)  # fmt: skip
    await first.__aenter__()
    return first


async def supervisor_sigkill(total: int = 5000) -> dict[str, Any]:
    """SIGKILL the supervisor while it holds ``total`` tasks; the next pool runs them."""
    runs = Runs()
    run_dir = tempfile.mkdtemp(prefix="pb-", dir="/tmp")
    try:
        first = await first_pool(run_dir, runs)
        broker = await _use(run_dir)
        try:
            tags = [f"k{i}" for i in range(total)]
            handles = [await broker.find_task("fault_run").kiq(tag) for tag in tags]
            held = (await first.stats())["totals"]
            assert first.proc is not None
            kids = children(first.proc.pid)
            first.proc.send_signal(signal.SIGKILL)
            first.proc.wait(10)
            wait_gone(kids)  # its workers and state server exit on their own
            async with BenchPool(2, run_dir=run_dir, env=runs.env):
                results = await results_of(handles)
                counts = await runs.wait_all(tags, 30)
        finally:
            await broker.shutdown()
            await first.__aexit__()
        return {
            **tally(tags, counts, sum(map(failed, results))),
            "held_at_kill": held["queued"] + held["in_flight"],
        }
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        runs.close()


async def graceful_stop(total: int = 5000) -> dict[str, Any]:
    """SIGTERM while a producer goes on sending; the next pool on the run dir runs the rest."""
    runs = Runs()
    run_dir = tempfile.mkdtemp(prefix="pb-", dir="/tmp")
    try:
        first = await first_pool(run_dir, runs)
        broker = await _use(run_dir)
        task = broker.find_task("fault_run")
        try:
            half = total // 2
            tags = [f"g{i}" for i in range(total)]
            handles = [await task.kiq(tag) for tag in tags[:half]]
            assert first.proc is not None
            first.proc.send_signal(signal.SIGTERM)
            sending = asyncio.ensure_future(asyncio.gather(*(task.kiq(tag) for tag in tags[half:])))
            status = await asyncio.get_running_loop().run_in_executor(None, first.proc.wait, 60)
            async with BenchPool(2, run_dir=run_dir, env=runs.env):
                handles += await asyncio.wait_for(sending, 120)
                results = await results_of(handles)
                counts = await runs.wait_all(tags, 30)
        finally:
            await broker.shutdown()
            await first.__aexit__()
        return {**tally(tags, counts, sum(map(failed, results))), "exit_status": status}
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
        runs.close()


async def poison(total: int = 20_000, poisons: int = 20) -> dict[str, Any]:
    """``poisons`` worker-killing tasks spread among ``total``: only they may fail."""

    runs = Runs()
    try:
        async with BenchPool(2, "bench.apps:broker", "--max-async-tasks", "20",
                             env=runs.env) as pool:  # fmt: skip
            broker = await _use(pool.run_dir)
            try:
                kinds, tags, handles = await send_with_poison(
                    total, poisons, broker.find_task("poison"), broker.find_task("fault_run"), "x"
                )
                results = await results_of(handles)
            finally:
                await broker.shutdown()
            return await poison_figures(pool, runs, kinds, tags, results)
    finally:
        runs.close()


async def send_with_poison(
    total: int, poisons: int, poison: Any, ordinary: Any, prefix: str
) -> tuple[list[str], list[str], list[Any]]:
    """Send ``total`` tasks, ``poisons`` of them spread evenly ``poison``'s, the others
    ``ordinary``'s with a tag each: (their kinds, the tags, the handles)."""
    every = total // poisons
    kinds: list[str] = []
    tags: list[str] = []
    handles: list[Any] = []
    for i in range(total):
        if i % every == every // 2:
            kinds.append("poison")
            handles.append(await poison.kiq())
        else:
            kinds.append("ok")
            tags.append(f"{prefix}{i}")
            handles.append(await ordinary.kiq(tags[-1]))
    return kinds, tags, handles


async def poison_figures(
    pool: BenchPool, runs: Runs, kinds: list[str], tags: list[str], results: list[Any]
) -> dict[str, Any]:
    """What a run of poison tasks (``kinds`` "poison") among others ("ok") came to."""
    from pool.extensions.errors import WorkerCrashedError

    counts = await runs.wait_all(tags, 30)
    innocent = [r for k, r in zip(kinds, results, strict=True) if k == "ok"]
    poisoned = [r for k, r in zip(kinds, results, strict=True) if k == "poison"]
    figures = tally(tags, counts, sum(1 for r in innocent if isinstance(r, BaseException)))
    figures["sent"] = len(kinds)
    figures["innocent_failures"] = sum(1 for r in innocent if failed(r))
    figures["poison"] = len(poisoned)
    figures["poison_failed_as_crash"] = sum(
        1
        for r in poisoned
        if not isinstance(r, BaseException) and isinstance(r.error, WorkerCrashedError)
    )
    figures["workers_restarted"] = (await pool.stats())["totals"]["restarts"]
    return figures


async def redis_poison(total: int = 3000, poisons: int = 5) -> dict[str, Any]:
    """``poisons`` worker-killing tasks spread among ``total`` on pool's Redis broker (2
    workers, a stream of this run's own): only they may fail."""
    import uuid

    from bench import redis_fault_apps as apps
    from pool import AsyncKicker

    why = apps.unreachable()
    if why is not None:
        return {"skipped": why}
    queue = f"bench-poison-{uuid.uuid4().hex[:8]}"
    runs = Runs()
    env = {**runs.env, "BENCH_QUEUE": queue}
    try:
        async with BenchPool(2, "bench.redis_fault_apps:broker", "--max-async-tasks", "20",
                             env=env) as pool:  # fmt: skip
            broker = apps.make_broker(queue=queue)
            await broker.startup()
            try:
                poison_task = AsyncKicker("poison", broker, {})
                kinds, tags, handles = await send_with_poison(
                    total, poisons, poison_task, AsyncKicker("fault_run", broker, {}), "r"
                )
                results = await results_of(handles)
            finally:
                await broker.shutdown()
            return await poison_figures(pool, runs, kinds, tags, results)
    finally:
        runs.close()
        apps.delete_keys(queue)


def _mount_tiny(size: str = "1m") -> tuple[Path | None, str]:
    if os.geteuid() != 0:
        return None, "mounting a tmpfs needs root"
    mount = Path(tempfile.mkdtemp(prefix="pf-", dir="/tmp"))
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                           str(mount)], capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        mount.rmdir()
        return None, f"cannot mount a tmpfs: {done.stderr.strip()}"
    return mount, ""


async def full_disk(total: int = 20_000) -> dict[str, Any]:
    """The operator's case: a 1 MiB run directory fills up, SIGTERM at full disk, the next
    run (on the same directory, grown to 256 MiB) must run every task."""
    from taskiq.exceptions import SendTaskError

    from pool.extensions.handles import PoolTask
    from pool.runtime.journal import Journal

    mount, why = _mount_tiny()
    if mount is None:
        return {"skipped": why}
    runs = Runs()
    logs = runs.dir / "first.log", runs.dir / "second.log"
    run_dir = str(mount / "run")
    try:
        first = await first_pool(run_dir, runs, max_async_tasks=1, log=logs[0])
        broker = await _use(run_dir)
        release = runs.dir / "release"
        try:
            await broker.find_task("block_until").kiq(str(release))
            tags = [f"d{i}" for i in range(total)]
            handles: list[Any] = []
            kiq_errors: list[str] = []
            task = broker.find_task("fault_run")

            async def flood() -> None:
                for tag in tags:
                    try:
                        handles.append(await task.kiq(tag, "y" * 200))
                    except SendTaskError:
                        # the pool closed the connection while kiq waited: the producer
                        # still holds the task and sends it again on the next connection
                        kiq_errors.append(tag)
                        task_id = broker._unconfirmed[-1][0]
                        handle = PoolTask(task_id, broker.result_backend)
                        broker.pool_results.track(task_id, handle)  # as kiq's own are
                        handles.append(handle)

            sending = asyncio.ensure_future(flood())
            deadline = time.monotonic() + 120
            while "cannot write the task journal" not in logs[0].read_text(errors="replace"):
                if time.monotonic() > deadline or sending.done():
                    break
                await asyncio.sleep(0.05)
            sent_when_full = len(handles)
            release.touch()
            assert first.proc is not None
            first.proc.send_signal(signal.SIGTERM)
            loop = asyncio.get_running_loop()
            status = await loop.run_in_executor(None, first.proc.wait, 120)
            journaled = len(Journal(Path(run_dir) / "pending.tasks").replay()[0])
            subprocess.run(["mount", "-o", "remount,size=256m", str(mount)], check=True)
            async with BenchPool(2, run_dir=run_dir, env=runs.env, log=logs[1]):
                # the producer goes on sending meanwhile; it reconnects and asks again for
                # the results its handles still wait for, those of the resumed tasks too
                await asyncio.wait_for(sending, 300)
                results = await results_of(handles)
                counts = await runs.wait_all(tags, 30)
        finally:
            await broker.shutdown()
            await first.__aexit__()
        text = [log.read_text(errors="replace") for log in logs]
        return {
            **tally(tags, counts, sum(map(failed, results))),
            "kiq_returned_when_full": sent_when_full,
            "kiq_errors_at_sigterm": len(kiq_errors),
            "first_errors": [repr(r)[:300] for r in results if failed(r)][:3],
            "journaled_at_sigterm": journaled,
            "exit_status": status,
            "critical_logged": "CRITICAL pool.runtime.journal" in text[0],
            "tracebacks": sum(t.count("Traceback") for t in text),
            "next_run_read_whole_journal": "damaged" not in text[1] and "truncated" not in text[1],
        }
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        shutil.rmtree(mount, ignore_errors=True)
        runs.close()


async def journal_cost(total: int = 20_000, rounds: int = 5) -> dict[str, Any]:
    """Throughput of no-op tasks with the journal and with ``--no-journal``, rounds
    interleaved (one pool of each per round), medians and their ratio."""
    from bench.apps import broker, noop
    from bench.pool_bench import throughput

    samples: dict[str, list[float]] = {"journal": [], "no_journal": []}
    for _ in range(rounds):
        for mode, extra in (("journal", ()), ("no_journal", ("--no-journal",))):
            async with BenchPool(2, "bench.apps:broker", *extra) as pool:
                broker.run_dir = pool.run_dir
                await broker.startup()
                try:
                    await throughput(broker, noop, 1000)  # warm up
                    samples[mode].append(await throughput(broker, noop, total))
                finally:
                    await broker.shutdown()
    on, off = median(samples["journal"]), median(samples["no_journal"])
    return {
        "tasks": total,
        "rounds": rounds,
        "samples": samples,
        "journal_tasks_per_s": on,
        "no_journal_tasks_per_s": off,
        "journal_vs_no_journal": on / off,
        "journal_cost": 1 - on / off,
    }


async def measure(total: int = 20_000, in_flight: int = 5000) -> dict[str, Any]:
    return {
        "producer_exit": await producer_exit(in_flight),
        "supervisor_sigkill": await supervisor_sigkill(in_flight),
        "graceful_stop": await graceful_stop(in_flight),
        "poison": await poison(total),
        "redis_poison": await redis_poison(),
        "full_disk": await full_disk(total),
        "journal_cost": await journal_cost(total),
    }


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(prog="python -m bench.faults")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--in-flight", type=int, default=5000)
    parser.add_argument("--only", help="one scenario, e.g. full_disk")
    args = parser.parse_args()
    if args.only:
        print(json.dumps(asyncio.run(globals()[args.only]()), indent=1))
    else:
        print(json.dumps(asyncio.run(measure(args.tasks, args.in_flight)), indent=1))
