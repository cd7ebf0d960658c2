"""PrometheusMiddleware: metrics counted on the InMemoryBroker, served over HTTP by workers."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import urllib.request
from pathlib import Path

import pytest

from pool import InMemoryBroker, PrometheusMiddleware

pytestmark = pytest.mark.timeout(30)


def sample(middleware: PrometheusMiddleware, name: str, task_name: str) -> float:
    value = middleware.registry.get_sample_value(name, {"task_name": task_name})
    return 0.0 if value is None else value


def scrape(address: tuple[str, int]) -> str:
    host, port = address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def make_broker(middleware: PrometheusMiddleware) -> InMemoryBroker:
    broker = InMemoryBroker()
    broker.add_middlewares(middleware)

    @broker.task("ok")
    async def ok(x: int) -> int:
        return x * 2

    @broker.task("boom")
    def boom() -> None:
        raise ValueError("boom")

    return broker


async def test_metrics_are_counted() -> None:
    middleware = PrometheusMiddleware(server_port=0)
    broker = make_broker(middleware)
    await broker.startup()
    assert middleware.server_address is None  # not a worker process: no server
    for i in range(3):
        await broker.find_task("ok").kiq(i)  # type: ignore[union-attr]
    for _ in range(2):
        await broker.find_task("boom").kiq()  # type: ignore[union-attr]
    await broker.wait_all()

    assert sample(middleware, "received_tasks_total", "ok") == 3
    assert sample(middleware, "success_tasks_total", "ok") == 3
    assert sample(middleware, "found_errors_total", "ok") == 0
    assert sample(middleware, "received_tasks_total", "boom") == 2
    assert sample(middleware, "found_errors_total", "boom") == 2
    assert sample(middleware, "success_tasks_total", "boom") == 0
    assert sample(middleware, "saved_results_total", "ok") == 3
    assert sample(middleware, "execution_time_count", "ok") == 3
    assert sample(middleware, "execution_time_count", "boom") == 2
    assert sample(middleware, "in_flight_tasks", "ok") == 0
    await broker.shutdown()


async def test_in_flight_gauge() -> None:
    middleware = PrometheusMiddleware()
    broker = InMemoryBroker()
    broker.add_middlewares(middleware)
    started = asyncio.Event()
    release = asyncio.Event()

    @broker.task("slow")
    async def slow() -> None:
        started.set()
        await release.wait()

    await broker.startup()
    await slow.kiq()
    await asyncio.wait_for(started.wait(), 5)
    assert sample(middleware, "in_flight_tasks", "slow") == 1
    release.set()
    await broker.wait_all()
    assert sample(middleware, "in_flight_tasks", "slow") == 0
    await broker.shutdown()


async def test_endpoint_is_served_in_worker_processes() -> None:
    middleware = PrometheusMiddleware(server_addr="127.0.0.1", server_port=0)
    broker = make_broker(middleware)
    broker.is_worker_process = True
    await broker.startup()
    try:
        assert middleware.server_address is not None
        host, port = middleware.server_address
        assert host == "127.0.0.1" and port > 0
        await broker.find_task("ok").kiq(1)  # type: ignore[union-attr]
        await broker.find_task("boom").kiq()  # type: ignore[union-attr]
        await broker.wait_all()
        text = await asyncio.to_thread(scrape, middleware.server_address)
        assert 'received_tasks_total{task_name="ok"} 1.0' in text
        assert 'found_errors_total{task_name="boom"} 1.0' in text
        assert 'execution_time_bucket{le="+Inf",task_name="ok"} 1.0' in text
        assert "python_gc" not in text  # a private registry, not the global one
        address = middleware.server_address
    finally:
        await broker.shutdown()
    assert middleware.server_address is None
    with pytest.raises(OSError):
        await asyncio.to_thread(scrape, address)  # the server was stopped


async def test_two_instances_in_one_process_do_not_clash() -> None:
    first = PrometheusMiddleware(server_port=0)
    second = PrometheusMiddleware(server_port=0)
    assert first.registry is not second.registry
    broker1, broker2 = make_broker(first), make_broker(second)
    broker1.is_worker_process = broker2.is_worker_process = True
    await broker1.startup()
    await broker2.startup()
    try:
        await broker1.find_task("ok").kiq(1)  # type: ignore[union-attr]
        for _ in range(4):
            await broker2.find_task("ok").kiq(1)  # type: ignore[union-attr]
        await broker1.wait_all()
        await broker2.wait_all()
        assert sample(first, "received_tasks_total", "ok") == 1
        assert sample(second, "received_tasks_total", "ok") == 4
        assert first.server_address != second.server_address
        assert first.server_address is not None and second.server_address is not None
        text1 = await asyncio.to_thread(scrape, first.server_address)
        text2 = await asyncio.to_thread(scrape, second.server_address)
        assert 'received_tasks_total{task_name="ok"} 1.0' in text1
        assert 'received_tasks_total{task_name="ok"} 4.0' in text2
    finally:
        await broker1.shutdown()
        await broker2.shutdown()


async def test_port_in_use_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    first = PrometheusMiddleware(server_port=0)
    broker1 = make_broker(first)
    broker1.is_worker_process = True
    await broker1.startup()
    try:
        assert first.server_address is not None
        second = PrometheusMiddleware(server_port=first.server_address[1])
        broker2 = make_broker(second)
        broker2.is_worker_process = True
        await broker2.startup()
        assert second.server_address is None
        assert "cannot serve prometheus metrics" in caplog.text
        await broker2.shutdown()
    finally:
        await broker1.shutdown()


def test_import_pool_does_not_import_prometheus_client() -> None:
    code = "import sys, pool; pool.PrometheusMiddleware; print('prometheus_client' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=20, check=True
    )
    assert out.stdout.strip() == "False"


def test_multiprocess_mode_sums_over_processes(tmp_path: Path) -> None:
    """With metrics_path, values from several processes are served together."""
    metrics_dir = tmp_path / "metrics"
    script = textwrap.dedent(
        f"""
        import asyncio, multiprocessing, sys, urllib.request
        from pool import InMemoryBroker, PrometheusMiddleware

        def child(n):
            async def main():
                mw = PrometheusMiddleware(metrics_path={str(metrics_dir)!r})
                broker = InMemoryBroker()
                broker.add_middlewares(mw)
                @broker.task("t")
                async def t():
                    return 1
                await broker.startup()
                for _ in range(n):
                    await t.kiq()
                await broker.wait_all()
                await broker.shutdown()
            asyncio.run(main())

        if __name__ == "__main__":
            ctx = multiprocessing.get_context("spawn")
            procs = [ctx.Process(target=child, args=(n,)) for n in (2, 3)]
            for p in procs:
                p.start()
            for p in procs:
                p.join(20)
                assert p.exitcode == 0, p.exitcode

            async def serve():
                mw = PrometheusMiddleware(metrics_path={str(metrics_dir)!r}, server_port=0)
                broker = InMemoryBroker()
                broker.add_middlewares(mw)
                broker.is_worker_process = True
                await broker.startup()
                host, port = mw.server_address
                url = f"http://{{host}}:{{port}}/metrics"
                text = await asyncio.to_thread(
                    lambda: urllib.request.urlopen(url, timeout=5).read().decode()
                )
                await broker.shutdown()
                return text

            print(asyncio.run(serve()))
        """
    )
    path = tmp_path / "mp_script.py"
    path.write_text(script)
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run(
        [sys.executable, str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(root),
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr
    assert 'received_tasks_total{task_name="t"} 5.0' in out.stdout
    assert 'success_tasks_total{task_name="t"} 5.0' in out.stdout
