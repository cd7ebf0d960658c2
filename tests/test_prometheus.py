"""taskiq's PrometheusMiddleware on pool's ``InMemoryBroker``: counts, endpoint, processes.

taskiq's middleware registers its metrics in prometheus' global registry and sets
``PROMETHEUS_MULTIPROC_DIR`` for the whole process when it is created, so each check runs in
a fresh interpreter of its own (an instance per process, as in a worker).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent

PRELUDE = """
import asyncio, json, sys, urllib.request
from pathlib import Path
from pool import InMemoryBroker, PrometheusMiddleware

METRICS = Path(sys.argv[1])

def make_broker(**options):
    broker = InMemoryBroker()
    middleware = PrometheusMiddleware(metrics_path=METRICS, **options)
    broker.add_middlewares(middleware)

    @broker.task("ok")
    async def ok(x: int) -> int:
        return x * 2

    @broker.task("boom")
    def boom() -> None:
        raise ValueError("boom")

    return broker

async def run(broker, oks, booms):
    for i in range(oks):
        await broker.find_task("ok").kiq(i)
    for _ in range(booms):
        await broker.find_task("boom").kiq()
    await broker.wait_all()

def samples():
    # imported after the middleware set PROMETHEUS_MULTIPROC_DIR, as in a worker
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(METRICS))
    names = ("received_tasks_total", "success_tasks_total", "found_errors_total",
             "saved_results_total", "execution_time_count")
    return {
        task: {n: registry.get_sample_value(n, {"task_name": task}) or 0 for n in names}
        for task in ("ok", "boom")
    }
"""


def run_script(body: str, metrics: Path, *args: str) -> Any:
    """Run ``PRELUDE + body`` in a fresh interpreter; its last line of output, as JSON."""
    metrics.mkdir(exist_ok=True)
    out = subprocess.run(
        [sys.executable, "-c", PRELUDE + textwrap.dedent(body), str(metrics), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_tasks_are_counted(tmp_path: Path) -> None:
    body = """
    async def main():
        broker = make_broker()
        async with broker:
            await run(broker, oks=3, booms=2)
        print(json.dumps(samples()))
    asyncio.run(main())
    """
    counts = run_script(body, tmp_path / "metrics")
    assert counts["ok"] == {
        "received_tasks_total": 3,
        "success_tasks_total": 3,
        "found_errors_total": 0,
        "saved_results_total": 3,
        "execution_time_count": 3,
    }
    assert counts["boom"]["received_tasks_total"] == 2
    assert counts["boom"]["found_errors_total"] == 2
    assert counts["boom"]["success_tasks_total"] == 0


SERVE = """
port, role = int(sys.argv[2]), sys.argv[3]

def scrape():
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return None

async def main():
    broker = make_broker(server_addr="127.0.0.1", server_port=port)
    broker.is_worker_process = role == "worker"
    async with broker:
        await run(broker, oks=1, booms=1)
        text = await asyncio.to_thread(scrape)
    print(json.dumps(text))
asyncio.run(main())
"""


def test_a_worker_process_serves_the_metrics(tmp_path: Path) -> None:
    text = run_script(SERVE, tmp_path / "metrics", str(free_port()), "worker")
    assert 'received_tasks_total{task_name="ok"} 1.0' in text
    assert 'found_errors_total{task_name="boom"} 1.0' in text
    assert 'execution_time_bucket{le="+Inf",task_name="ok"} 1.0' in text


def test_a_producer_serves_no_metrics(tmp_path: Path) -> None:
    assert run_script(SERVE, tmp_path / "metrics", str(free_port()), "producer") is None


def test_the_counts_of_several_processes_are_summed(tmp_path: Path) -> None:
    """Each worker process counts into the shared metrics directory; one endpoint sums them."""
    metrics = tmp_path / "metrics"
    child = """
    async def main():
        broker = make_broker()
        async with broker:
            await run(broker, oks=int(sys.argv[2]), booms=1)
        print(json.dumps("done"))
    asyncio.run(main())
    """
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PRELUDE + textwrap.dedent(child), str(metrics), str(n)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (2, 3)
    ]
    metrics.mkdir(exist_ok=True)
    for proc in procs:
        _, err = proc.communicate(timeout=50)
        assert proc.returncode == 0, err
    summing = "PrometheusMiddleware(metrics_path=METRICS)\nprint(json.dumps(samples()))\n"
    counts = run_script(summing, metrics)
    assert counts["ok"]["received_tasks_total"] == 5
    assert counts["ok"]["success_tasks_total"] == 5
    assert counts["boom"]["found_errors_total"] == 2


def test_import_pool_and_naming_the_middleware_do_not_import_prometheus_client() -> None:
    code = (
        "import sys, pool\n"
        "assert pool.PrometheusMiddleware is not None\n"
        "print('prometheus_client' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
        check=True,
    )
    assert out.stdout.strip() == "False"
