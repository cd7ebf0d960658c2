"""``python -m pool demo``: a one-minute tour of the embedded default."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter


def _wait_until_ready(run_dir: str, workers: int, proc: subprocess.Popen[bytes]) -> None:
    from taskiq.exceptions import SendTaskError

    from pool.runtime.client import request

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the pool exited early with status {proc.returncode}")
        try:
            stats = asyncio.run(request({"cmd": "stats"}, run_dir, 5))["stats"]
            if sum(1 for w in stats["workers"] if w["state"] == "ready") >= workers:
                return
        except SendTaskError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the pool did not become ready within 30 s")


async def _send(tasks: int, run_dir: str) -> tuple[Counter[int], int, dict[str, object], float]:
    from rich.progress import Progress

    from pool.ops.demo_app import broker, square, state_snapshot, word_count

    broker.run_dir = run_dir
    await broker.startup()
    started = time.perf_counter()
    pids: Counter[int] = Counter()
    with Progress() as progress:
        sent = progress.add_task("sending", total=tasks)
        done = progress.add_task("results", total=tasks)
        handles = []
        for i in range(tasks):
            handles.append(await square.kiq(i))
            progress.advance(sent)
        for handle in handles:
            result = await handle.wait_result(timeout=30)
            pids[result.raise_for_error().return_value["pid"]] += 1
            progress.advance(done)
    words = await (await word_count.kiq("the pool runs sync tasks in threads")).wait_result(
        timeout=30
    )
    elapsed = time.perf_counter() - started
    state = await (await state_snapshot.kiq()).wait_result(timeout=30)
    await broker.shutdown()
    return pids, words.return_value, state.raise_for_error().return_value, elapsed


def run_demo(tasks: int = 300, workers: int = 2) -> int:
    from rich.console import Console

    from pool.ops.stats_view import render
    from pool.runtime.client import request

    console = Console()
    run_dir = tempfile.mkdtemp(prefix="pool-demo-")
    console.rule("[bold]pool demo")
    console.print(f"starting a pool of {workers} workers in {run_dir}")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pool",
            "run",
            "pool.ops.demo_app:broker",
            "--workers",
            str(workers),
            "--run-dir",
            run_dir,
            "--log-level",
            "WARNING",
        ],
    )
    try:
        _wait_until_ready(run_dir, workers, proc)
        pids, words, state, elapsed = asyncio.run(_send(tasks, run_dir))
        console.print(
            f"{tasks} tasks done in {elapsed:.2f} s; per worker pid: "
            + ", ".join(f"{pid}: {count}" for pid, count in sorted(pids.items()))
        )
        console.print(f"sync task word_count -> {words}")
        stats = asyncio.run(request({"cmd": "stats"}, run_dir, 10))["stats"]
        render(stats)
        console.print(f"shared state, as every worker sees it: {state}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    console.print(f"pool stopped with status {proc.returncode}")
    try:
        os.rmdir(run_dir)
    except OSError:
        pass
    return 0 if proc.returncode == 0 else 1
