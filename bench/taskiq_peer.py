"""taskiq + taskiq-redis measured the same way as pool (same Redis, same machine, same run)."""

from __future__ import annotations

import asyncio
import importlib
import os
import shutil
import subprocess
import sys
import uuid
from typing import Any

from bench.pool_bench import round_trips, throughput
from bench.pool_run import ROOT, stop

REDIS_URL = "redis://127.0.0.1:6379/0"


async def _cleanup(prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
        for start in range(0, len(keys), 500):
            await client.delete(*keys[start : start + 500])
    finally:
        await client.aclose()


def _runtime(name: str, workers: int, run_dir: str) -> list[str]:
    """The same app and broker under ``taskiq worker`` or under ``python -m pool run``."""
    app = "bench.taskiq_app:broker"
    if name == "pool":
        return [sys.executable, "-m", "pool", "run", app, "--workers", str(workers),
                "--log-level", "WARNING", "--run-dir", run_dir]  # fmt: skip
    return [sys.executable, "-m", "taskiq", "worker", app, "--workers", str(workers),
            "--log-level", "WARNING"]  # fmt: skip


async def _first_result(task: Any, limit: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while True:
        try:
            await (await task.kiq()).wait_result(check_interval=0.05, timeout=2)
            return
        except Exception:
            if loop.time() > deadline:
                raise


async def measure(
    workers: int = 2, total: int = 10_000, calls: int = 1000, runtime: str = "taskiq"
) -> dict[str, Any]:
    """taskiq + taskiq-redis, run by ``taskiq worker`` (or, ``runtime="pool"``, by pool)."""
    import tempfile

    run_dir = tempfile.mkdtemp(prefix="pt-", dir="/tmp")
    queue = f"bench-taskiq-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "BENCH_QUEUE": queue,
        "BENCH_REDIS_URL": REDIS_URL,
        "PYTHONPATH": str(ROOT),
    }
    os.environ.update({"BENCH_QUEUE": queue, "BENCH_REDIS_URL": REDIS_URL})
    sys.modules.pop("bench.taskiq_app", None)  # a fresh module: it reads the queue name
    taskiq_app: Any = importlib.import_module("bench.taskiq_app")

    worker = subprocess.Popen(_runtime(runtime, workers, run_dir), cwd=str(ROOT), env=env)
    broker = taskiq_app.broker
    await broker.startup()
    try:
        # The consumer group exists once the workers listen (a task sent before that is
        # skipped by taskiq-redis's consumer_id "$"): the first task that comes back proves it.
        await _first_result(taskiq_app.noop)
        await throughput(broker, taskiq_app.noop, 1000)
        tasks_per_s = await throughput(broker, taskiq_app.noop, total)
        latency = await round_trips(taskiq_app.noop, calls)
        fast = await round_trips(taskiq_app.noop, calls, check_interval=0.01)
    finally:
        await broker.shutdown()
        stop(worker)
        await _cleanup(queue)
        shutil.rmtree(run_dir, ignore_errors=True)
    return {
        "workers": workers,
        "tasks": total,
        "throughput_tasks_per_s": tasks_per_s,
        **latency,
        "fast_poll": fast,
    }


if __name__ == "__main__":
    import json

    print(json.dumps(asyncio.run(measure()), indent=1))
