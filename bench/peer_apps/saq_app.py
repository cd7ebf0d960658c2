"""saq: its Redis queue; workers under saq's own CLI (``saq ...settings --workers 2``).

saq's workers dequeue with ``BLMOVE`` (no polling). The producer sends a batch with
``Queue.map`` (which polls the jobs every ``poll_interval``: here ``BENCH_POLL``) and one task
with ``enqueue`` + ``Job.refresh(until_complete=...)``, woken by saq's pub/sub (re-read
every 50 ms: see ``Driver.one``).
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

    async def batch(self, n: int) -> None:
        await queue.map("noop", [{} for _ in range(n)], timeout=120, poll_interval=POLL)

    async def one(self, timeout: float) -> None:
        job = await queue.enqueue("noop", timeout=timeout)
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
