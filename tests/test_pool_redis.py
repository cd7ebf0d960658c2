"""The pool on Redis: supervisors and workers on a RedisStreamBroker, the state in Redis.

Two pools on one Redis stand in for two machines.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from taskiq.exceptions import SendTaskError

from pool import AsyncKicker
from tests.pool_support import RunningPool, until, wait_for
from tests.redis_support import PrivateRedis, RedisSpace, redis_space

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def space() -> Iterator[RedisSpace]:
    yield from redis_space()


def redis_pool(
    space: RedisSpace, workers: int = 2, url: str | None = None, extra: list[str] | None = None
) -> RunningPool:
    url = url or space.url
    env = {"POOL_TEST_REDIS_URL": url, "POOL_TEST_QUEUE": space.name("queue")}
    state = ["--state", url, "--state-prefix", space.name("state")]
    return RunningPool(
        workers, app="redis_test_app:broker", env=env, extra=[*state, *(extra or [])]
    )


def producer(space: RedisSpace, url: str | None = None) -> Any:
    from tests.apps.redis_test_app import make_broker

    return make_broker(url or space.url, space.name("queue"))


async def send(broker: Any, task: str, count: int, *args: Any) -> list[Any]:
    return [await AsyncKicker(task, broker, {}).kiq(*args) for _ in range(count)]


def state_of(space: RedisSpace, url: str | None = None) -> Any:
    from pool.redis import RedisState

    return RedisState(url or space.url, prefix=space.name("state"))


async def test_a_pool_on_redis_runs_tasks_shares_state_and_reports_stats(
    space: RedisSpace,
) -> None:
    with redis_pool(space, workers=2) as running:
        broker = producer(space)
        await broker.startup()
        handles = await send(broker, "whoami", 60, 0.01)
        pids = {(await h.wait_result(timeout=30)).raise_for_error().return_value for h in handles}
        assert pids == set(running.worker_pids())
        stats = wait_for(
            lambda: (s := running.stats())["totals"]["tasks_done"] >= 60 and s, 10, "stats"
        )
        assert stats["totals"]["tasks_failed"] == 0
        assert state_of(space).get_value("workers_started") == 2
        await broker.shutdown()


async def test_two_pools_share_the_work_and_the_state(space: RedisSpace) -> None:
    with redis_pool(space, workers=2) as first, redis_pool(space, workers=2) as second:
        broker = producer(space)
        await broker.startup()
        handles = [await AsyncKicker("count_run", broker, {}).kiq(f"t{i}") for i in range(300)]
        results = [(await h.wait_result(timeout=60)).raise_for_error() for h in handles]
        assert [r.return_value[0] for r in results] == [1] * 300, "each task ran once"
        ran_in = {r.return_value[1] for r in results}
        assert ran_in & set(first.worker_pids()) and ran_in & set(second.worker_pids())
        # each worker reports what it finished to its supervisor right after saving it
        wait_for(
            lambda: (
                first.stats()["totals"]["tasks_done"] + second.stats()["totals"]["tasks_done"]
                == 300
            ),
            10,
            "300 tasks counted by the two supervisors",
        )
        assert state_of(space).get_value("workers_started") == 4
        await broker.shutdown()


async def test_sigkill_of_a_whole_pool_and_the_other_finishes_its_tasks(
    space: RedisSpace,
) -> None:
    with redis_pool(space, workers=2) as doomed, redis_pool(space, workers=1) as survivor:
        broker = producer(space)
        await broker.startup()
        handles = await send(broker, "whoami", 40, 2.0)
        wait_for(lambda: doomed.stats()["totals"]["in_flight"] > 0, 20, "tasks in the doomed pool")
        doomed.remember(doomed.stats())
        assert doomed.proc is not None
        doomed.proc.send_signal(signal.SIGKILL)
        doomed.proc.wait(10)
        results = [await h.wait_result(timeout=60) for h in handles]
        assert all(not r.is_err for r in results)
        wait_for(lambda: survivor.stats()["totals"]["tasks_done"] > 0, 10, "survivor's count")
        await broker.shutdown()


async def test_the_pool_survives_a_redis_restart(space: RedisSpace) -> None:
    private = PrivateRedis(persistent=True)
    private.start()
    try:
        with redis_pool(space, workers=2, url=private.url) as running:
            broker = producer(space, private.url)
            await broker.startup()
            first = await send(broker, "whoami", 20, 0.05)
            for handle in first:
                assert not (await handle.wait_result(timeout=30)).is_err
            private.restart()
            second = await send(broker, "whoami", 20, 0.05)
            for handle in second:
                assert not (await handle.wait_result(timeout=60)).is_err
            wait_for(lambda: running.stats()["totals"]["tasks_done"] >= 40, 10, "40 counted")
            await broker.shutdown()
    finally:
        private.close()


async def test_no_task_is_lost_when_redis_goes_away_while_tasks_run(space: RedisSpace) -> None:
    """Redis (appendonly yes) stops for a second, twice, while tasks are sent and run: every
    task accepted by ``kiq`` gets its result (results that could not be saved during the
    outage are saved once Redis is back, or their task runs again)."""
    import redis

    private = PrivateRedis(persistent=True)
    private.start()
    client = redis.Redis.from_url(private.url, socket_timeout=5)
    try:
        with redis_pool(space, workers=2, url=private.url):
            broker = producer(space, private.url)
            await broker.startup()
            sent: list[str] = []
            sending = True

            async def send() -> None:
                while sending:
                    try:
                        sent.append((await AsyncKicker("whoami", broker, {}).kiq(0.3)).task_id)
                    except SendTaskError:
                        await asyncio.sleep(0.05)  # refused while Redis is down: not accepted
                    await asyncio.sleep(0.005)

            sender = asyncio.create_task(send())
            for _ in range(2):
                await until(lambda n=len(sent): len(sent) >= n + 100, 30, "tasks sent")
                await asyncio.to_thread(private.stop)
                await asyncio.sleep(1.0)  # the outage
                await asyncio.to_thread(private.start)
            await until(lambda n=len(sent): len(sent) >= n + 100, 30, "tasks sent after")
            sending = False
            await sender
            key = space.name("queue") + ":result:"

            def missing() -> list[str]:
                return [t for t in sent if not client.exists(key + t)]

            try:
                wait_for(lambda: not missing(), 60, "every result")
            except AssertionError:
                pass
            lost = missing()
            assert not lost, f"{len(lost)} of {len(sent)} accepted tasks never got a result"
            await broker.shutdown()
    finally:
        client.close()
        private.close()


def test_unreachable_redis_at_start_is_a_clear_error(space: RedisSpace) -> None:
    running = redis_pool(space, workers=1, url="redis://127.0.0.1:1/0")
    try:
        running.start(wait_ready=False)
        assert running.wait(30) == 4
        assert "cannot reach the broker" in running.log()
        assert "127.0.0.1:1" in running.log()
    finally:
        running.close()


async def test_scale_and_graceful_shutdown_work_on_redis(space: RedisSpace) -> None:
    from tests.test_scaling import pool_cli

    with redis_pool(space, workers=1) as running:
        done = pool_cli(running, "scale", "2")
        assert done.returncode == 0, done.stderr
        broker = producer(space)
        await broker.startup()
        handles = await send(broker, "whoami", 4, 3.0)
        wait_for(lambda: running.stats()["totals"]["in_flight"] == 4, 20, "4 tasks running")
        assert running.stop() == 0
        results = [await h.wait_result(timeout=30) for h in handles]
        assert all(not r.is_err for r in results), "in-flight tasks finished during the drain"
        await broker.shutdown()


async def test_a_poison_message_gets_an_error_result_after_three_deliveries(
    space: RedisSpace,
) -> None:
    from pool import WorkerCrashedError

    with redis_pool(space, workers=2) as running:
        broker = producer(space)
        await broker.startup()
        [handle] = await send(broker, "poison", 1)
        result = await handle.wait_result(timeout=60)
        assert result.is_err and isinstance(result.error, WorkerCrashedError)
        assert "3 times" in str(result.error)
        assert running.stats()["totals"]["restarts"] == 3
        [alive] = await send(broker, "whoami", 1)
        assert not (await alive.wait_result(timeout=30)).is_err
        await broker.shutdown()


@pytest.mark.timeout(300)
async def test_tasks_that_shared_a_worker_with_a_poison_task_are_not_blamed(
    space: RedisSpace,
) -> None:
    """3 worker-killing tasks among 1,500: exactly those 3 fail, each with a
    ``WorkerCrashedError``; every other task gets its result, none is lost or blamed."""
    from taskiq import TaskiqResultTimeoutError

    from pool import WorkerCrashedError

    total, poisons = 1500, 3
    every = total // poisons
    with redis_pool(space, workers=2, extra=["--max-async-tasks", "20"]):
        broker = producer(space)
        await broker.startup()
        sent: list[tuple[str, Any]] = []
        for i in range(total):
            if i % every == every // 2:
                sent.append(("poison", await AsyncKicker("poison", broker, {}).kiq()))
            else:
                sent.append(("ok", await AsyncKicker("whoami", broker, {}).kiq(0.01)))

        async def outcome(handle: Any) -> Any:
            try:
                return await handle.wait_result(timeout=240)
            except TaskiqResultTimeoutError:
                return None  # lost: no result

        results = await asyncio.gather(*(outcome(h) for _, h in sent))
        await broker.shutdown()
    innocent = [r for (kind, _), r in zip(sent, results, strict=True) if kind == "ok"]
    poisoned = [r for (kind, _), r in zip(sent, results, strict=True) if kind == "poison"]
    lost = sum(1 for r in innocent if r is None)
    blamed = [r for r in innocent if r is not None and r.is_err]
    assert (lost, len(blamed)) == (0, 0), (
        f"{lost} innocent task(s) lost, {len(blamed)} failed: {[r.error for r in blamed[:3]]}"
    )
    assert len(poisoned) == poisons
    assert all(r is not None and isinstance(r.error, WorkerCrashedError) for r in poisoned)
