"""arq: workers are ``python -m bench.peer_apps.arq_app``, one process each.

arq's CLI runs one process and logs every job at INFO; this runs ``arq.run_worker`` with
logging at WARNING, like the other peers. ``poll_delay`` (worker) and ``Job.result``'s
``poll_delay`` (producer) are ``BENCH_POLL`` (arq's default: 0.5 s); ``max_jobs`` is arq's
default, 10. Job ids carry the queue name, so that every key of the run contains it.
arq 0.28 needs redis-py < 6: it runs in a virtualenv of its own (``make bench-arq``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from arq import create_pool, run_worker
from arq.connections import RedisSettings

from bench.peer_apps import POLL, QUEUE, REDIS_URL


async def noop(ctx: Any) -> None:
    return None


class WorkerSettings:
    functions = [noop]
    redis_settings = RedisSettings.from_dsn(REDIS_URL)
    queue_name = QUEUE
    poll_delay = POLL


class Driver:
    def __init__(self) -> None:
        self.sent = 0
        self.redis: Any = None

    async def start(self) -> None:
        self.redis = await create_pool(WorkerSettings.redis_settings, default_queue_name=QUEUE)

    async def stop(self) -> None:
        await self.redis.aclose()

    async def _send(self) -> Any:
        self.sent += 1
        job = await self.redis.enqueue_job("noop", _job_id=f"{QUEUE}-{os.getpid()}-{self.sent}")
        assert job is not None
        return job

    async def batch(self, n: int) -> None:
        await self._wait_all([await self._send() for _ in range(n)])

    async def batch_at_once(self, n: int) -> None:
        await self._wait_all(await asyncio.gather(*(self._send() for _ in range(n))))

    async def _wait_all(self, jobs: list[Any]) -> None:
        for job in jobs:
            await job.result(timeout=120, poll_delay=POLL)

    async def one(self, timeout: float) -> None:
        await (await self._send()).result(timeout=timeout, poll_delay=POLL)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    run_worker(WorkerSettings)
