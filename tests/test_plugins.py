"""taskiq's plugins under `python -m pool run`, unchanged: taskiq-fastapi and taskiq-pipelines,
each on PoolBroker and on Redis (taskiq-redis's RedisStreamBroker), in a real pool.

taskiq-fastapi keeps framework objects in ``broker.state`` (the FastAPI app, its lifespan):
they stay in each worker's local tier, never copied into the shared store.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from taskiq.kicker import AsyncKicker

from tests.pool_support import RunningPool, wait_for
from tests.service_support import REDIS_URL, require

pytestmark = pytest.mark.timeout(90)


def by_name(name: str, broker: Any) -> AsyncKicker[Any, Any]:
    """The task ``name`` of ``broker``, by name (the test does not import the app)."""
    return AsyncKicker(name, broker, {})


KINDS = ["pool", "redis-stream"]


class Plugged:
    """One plugin app on one broker, with names of its own."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.name = f"pooltest-plugin-{kind}-{uuid.uuid4().hex[:10]}"
        self.producers: list[Any] = []

    def pool(self, app: str, workers: int = 2) -> RunningPool:
        running = RunningPool(workers, app=f"{app}:broker")
        running.env.update(
            POOL_TEST_BROKER=self.kind,
            POOL_TEST_NAME=self.name,
            POOL_TEST_RUN_DIR=running.run_dir,
            POOL_TEST_REDIS_URL=REDIS_URL,
        )
        self.run_dir = running.run_dir
        return running

    async def started(self, broker: Any) -> Any:
        if self.kind == "pool":
            broker.run_dir = self.run_dir
        await broker.startup()
        self.producers.append(broker)
        return broker

    async def close(self) -> None:
        for broker in self.producers:
            await broker.shutdown()
        if self.kind != "pool":
            from redis.asyncio import Redis

            async with Redis.from_url(REDIS_URL) as client:
                keys = [k async for k in client.scan_iter(match=f"{self.name}*", count=500)]
                if keys:
                    await client.delete(*keys)


@pytest.fixture(params=KINDS)
async def plugged(request: pytest.FixtureRequest) -> AsyncIterator[Plugged]:
    if request.param != "pool":
        require("redis")
    plug = Plugged(request.param)
    try:
        yield plug
    finally:
        await plug.close()


async def run(broker: Any, task: str, *args: Any) -> Any:
    handle = await by_name(task, broker).kiq(*args)
    return (await handle.wait_result(timeout=20)).raise_for_error().return_value


async def test_taskiq_fastapi_gives_tasks_the_request_of_each_workers_app(
    plugged: Plugged,
) -> None:
    from tests.apps.eco_brokers import make_broker

    with plugged.pool("fastapi_app", workers=2) as running:
        broker = await plugged.started(make_broker(plugged.kind, plugged.name))
        pids = set(running.worker_pids())
        for pid in pids:
            running.wait_mark(f"lifespan-up-{pid}")
        answers = [await run(broker, "fa.request") for _ in range(8)]
        for answer in answers:
            assert answer["title"] == "pool-test-api"
            assert answer["db"] == f"db-of-{answer['pid']}", "the lifespan of its own worker"
        tiers = [await run(broker, "fa.tiers") for _ in range(6)]
        for tier in tiers:
            assert tier["app_is_this_workers"], "the worker's own app, not a copy"
            assert tier["shared"] == {"fastapi_app": False, "lf_ctx": False}
        assert running.stats()["state"]["keys"] == 0, "nothing of FastAPI in the shared store"

        running.signal(signal.SIGTERM)
        assert await asyncio.to_thread(running.wait, 20) == 0
        for pid in pids:
            assert running.mark_path(f"lifespan-down-{pid}").exists(), "lifespan left"


async def test_taskiq_pipelines_runs_a_three_step_pipeline_across_workers(
    plugged: Plugged,
) -> None:
    from taskiq_pipelines import Pipeline

    from tests.apps.eco_brokers import make_broker

    with plugged.pool("pipeline_app", workers=2) as running:
        broker = await plugged.started(make_broker(plugged.kind, plugged.name))
        steps = [by_name(name, broker) for name in ("pl.add_one", "pl.repeat")]
        pipe: Pipeline[Any, Any] = (
            Pipeline(broker, steps[0]).call_next(steps[1]).map(by_name("pl.square", broker))
        )
        handles = [await pipe.kiq(value) for value in (2, 3, 4)]
        results = [(await h.wait_result(timeout=30)).raise_for_error() for h in handles]
        assert [r.return_value for r in results] == [[9] * 3, [16] * 4, [25] * 5]
        # 3 first steps, 3 second steps, 12 squares and 3 waits of the map step
        wait_for(lambda: running.stats()["totals"]["tasks_done"] >= 21, 10, "21 tasks done")
        assert running.stats()["totals"]["tasks_done"] == 21
