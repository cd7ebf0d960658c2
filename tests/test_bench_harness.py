"""The benchmarks' own harness: a pool it starts never outlives it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import psutil
import pytest

from tests.pool_support import ROOT, wait_for_gone

BENCHMARK = """
import asyncio
from bench.pool_run import BenchPool

async def main():
    async with BenchPool(1) as pool:
        print("pool", pool.proc.pid, pool.run_dir, flush=True)
        await asyncio.Event().wait()  # until this benchmark is killed

asyncio.run(main())
"""


@pytest.mark.timeout(90)
def test_a_bench_pool_stops_when_the_benchmark_that_started_it_is_killed() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    benchmark = subprocess.Popen(
        [sys.executable, "-c", BENCHMARK], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    family: set[int] = set()
    run_dir = ""
    try:
        assert benchmark.stdout is not None
        line = ""
        while not line.startswith("pool "):  # the pool's own output goes there too
            line = benchmark.stdout.readline()
            assert line, "the benchmark exited before its pool was ready"
        _, pid, run_dir = line.split()
        supervisor = psutil.Process(int(pid))
        family = {supervisor.pid, *(child.pid for child in supervisor.children(recursive=True))}
        assert len(family) >= 3  # the supervisor, its state server and a worker

        benchmark.send_signal(signal.SIGKILL)  # no __aexit__: only the kernel can tell the pool
        benchmark.wait(10)

        assert wait_for_gone(family, timeout=60) == []
    finally:
        if benchmark.poll() is None:
            benchmark.kill()
            benchmark.wait(10)
        if benchmark.stdout is not None:
            benchmark.stdout.close()
        for pid in wait_for_gone(family, timeout=0):
            os.kill(pid, signal.SIGKILL)
        if run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
