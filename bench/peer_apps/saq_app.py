"""saq: its Redis queue; workers under saq's own CLI (``saq ...settings --workers 2``).

saq's workers dequeue with ``BLMOVE`` (no polling). The producer sends a batch at once with
``Queue.map`` (which polls the jobs every ``poll_interval``: here ``BENCH_POLL``), or one
``enqueue`` after another, and one task with ``enqueue`` + ``Job.refresh(until_complete=...)``,
woken by saq's pub/sub (re-read every 50 ms: see ``Driver._wait``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from saq import Queue

from bench.peer_apps import POLL, QUEUE, REDIS_URL

queue = Queue.from_url(REDIS_URL, name=QUEUE)


async def noop(ctx: Any) -> None:
    return None


settings = {"queue": queue, "functions": [noop], "concurrency": 10}


class Driver:
    async def start(self) -> None:
        await queue.connect()

    async def stop(self) -> None:
        await queue.disconnect()

    async def batch_at_once(self, n: int) -> None:
        await queue.map("noop", [{} for _ in range(n)], timeout=120, poll_interval=POLL)

    async def batch(self, n: int) -> None:
        jobs = [await queue.enqueue("noop", timeout=120) for _ in range(n)]
        for job in jobs:
            await self._wait(job, 120)

    async def one(self, timeout: float) -> None:
        await self._wait(await queue.enqueue("noop", timeout=timeout), timeout)

    async def _wait(self, job: Any, timeout: float) -> None:
        assert job is not None
        deadline = time.monotonic() + timeout
        while True:
            # A job that completes between refresh's read and its subscription is never
            # announced to it: listen 50 ms at a time, and read the job again.
            try:
                await job.refresh(until_complete=0.05)
                break
            except asyncio.TimeoutError:
                if time.monotonic() > deadline:
                    raise
        if job.status != "complete":
            raise RuntimeError(f"saq job {job.key}: {job.status} {job.error}")
