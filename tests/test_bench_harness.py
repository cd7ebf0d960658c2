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


@pytest.mark.timeout(30)
def test_on_one_cpu_pins_the_processes_started_inside_and_restores_the_mask() -> None:
    from bench.limit import on_one_cpu

    mask = os.sched_getaffinity(0)
    with on_one_cpu():
        assert os.sched_getaffinity(0) == {min(mask)}
        child = subprocess.run(
            [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        assert child.stdout.strip() == str([min(mask)])
    assert os.sched_getaffinity(0) == mask


@pytest.mark.timeout(30)
def test_wake_cost_measures_with_a_child_it_reaps() -> None:
    from bench.limit import wake_cost

    before = {child.pid for child in psutil.Process().children()}
    mask = os.sched_getaffinity(0)
    same = wake_cost(across_cpus=False, rounds=50)
    across = wake_cost(across_cpus=True, rounds=50)
    assert same is not None and same > 0
    assert across is None if len(mask) < 2 else across > 0
    assert os.sched_getaffinity(0) == mask
    assert {child.pid for child in psutil.Process().children()} == before


PERF_SCRIPT = """\
\t    7f01 _PyEval_EvalFrameDefault
\t    7f02 py::Receiver.run_task:/v/lib/python3.12/site-packages/taskiq/receiver/receiver.py
\t    7f03 py::consume:{root}/pool/runtime/worker.py

\t    9f01 unix_stream_sendmsg
\t    9f02 __GI___libc_write
\t    9f03 py::_SelectorSocketTransport.write:/py/lib/python3.12/asyncio/selector_events.py

\t    8f01 epoll_wait

\t    6f01 py::encode:<string>
"""


def test_bench_where_gives_each_sample_to_its_innermost_python_function() -> None:
    from bench.where import attribute

    counts = attribute(PERF_SCRIPT.format(root=ROOT))
    assert counts == {
        ("taskiq", "Receiver.run_task"): 1,  # not pool's consume, further out
        ("stdlib asyncio", "_SelectorSocketTransport.write"): 1,  # the system call's caller
        ("no Python frame (the event loop's C, the kernel)", ""): 1,
        ("generated code (pool's frame codecs, dataclasses' __init__)", "encode"): 1,
    }


@pytest.mark.timeout(60)
@pytest.mark.skipif(sys.version_info >= (3, 12), reason="checks the message of Python < 3.12")
def test_bench_where_says_what_it_needs_on_python_before_3_12() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.where"], cwd=ROOT, capture_output=True, text=True, timeout=50
    )
    assert done.returncode == 2
    assert "needs Python 3.12" in done.stderr
