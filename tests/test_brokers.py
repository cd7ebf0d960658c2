"""`python -m pool run` on the brokers of the taskiq ecosystem, against the real services.

One plain taskiq app (``tests/apps/ecosystem_app.py``) runs under a real pool on each broker:
taskiq-redis's ``ListQueueBroker`` and ``RedisStreamBroker`` with ``RedisAsyncResultBackend``,
taskiq-aio-pika's ``AioPikaBroker`` (RabbitMQ), taskiq-nats's ``PullBasedJetStreamBroker``
(with NATS's object store for results) and ``NatsBroker``, and pool's ``PoolBroker``. The
test sends with the broker's own ``kiq``. Each test has names of its own (queue, exchange,
stream, subject, keys) and deletes only those afterwards.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import psutil
import pytest
from taskiq.kicker import AsyncKicker

from pool.runtime.client import request
from tests.pool_support import RunningPool, run_sync, wait_for
from tests.service_support import AMQP_URL, NATS_URL, REDIS_URL, require

pytestmark = pytest.mark.timeout(90)


def by_name(name: str, broker: Any) -> AsyncKicker[Any, Any]:
    """The task ``name`` of ``broker``, by name (the test does not import the app)."""
    return AsyncKicker(name, broker, {})


APP = "ecosystem_app:broker"
# the services each broker of the app needs (results of RabbitMQ and core NATS go to Redis)
NEEDS = {
    "redis-list": ("redis",),
    "redis-stream": ("redis",),
    "rabbitmq": ("rabbitmq", "redis"),
    "nats-jetstream": ("nats",),
    "nats": ("nats", "redis"),
    "pool": (),
}
BROKERS = list(NEEDS)


@dataclass
class Ecosystem:
    """The broker of one test, its unique names, and the pool that runs it."""

    kind: str
    name: str
    run_dir: str = ""
    producers: list[Any] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return {
            "POOL_TEST_BROKER": self.kind,
            "POOL_TEST_NAME": self.name,
            "POOL_TEST_RUN_DIR": self.run_dir,
            "POOL_TEST_REDIS_URL": REDIS_URL,
            "POOL_TEST_AMQP_URL": AMQP_URL,
            "POOL_TEST_NATS_URL": NATS_URL,
        }

    def pool(self, workers: int = 2, extra: list[str] | None = None) -> RunningPool:
        running = RunningPool(workers, app=APP, env=self.env, extra=extra)
        self.run_dir = running.run_dir
        running.env.update(self.env)
        return running

    async def producer(self) -> Any:
        """The app's broker, built here as the workers build it, started as a client."""
        from tests.apps.eco_brokers import make_broker

        broker = make_broker(self.kind, self.name)
        if self.kind == "pool":
            broker.run_dir = self.run_dir  # type: ignore[attr-defined]
        await broker.startup()
        self.producers.append(broker)
        return broker

    async def close(self) -> None:
        for broker in self.producers:
            await broker.shutdown()
        await _CLEANUP[self.kind](self.name)


async def _delete_redis_keys(name: str) -> None:
    from redis.asyncio import Redis

    async with Redis.from_url(REDIS_URL) as client:
        keys = [key async for key in client.scan_iter(match=f"{name}*", count=500)]
        if keys:
            await client.delete(*keys)


async def _delete_rabbitmq(name: str) -> None:
    import aio_pika

    connection = await aio_pika.connect(AMQP_URL)
    async with connection:
        channel = await connection.channel()
        for queue in (name, f"{name}.dead_letter", f"{name}.delay"):
            await channel.queue_delete(queue)
        await channel.exchange_delete(name)
    await _delete_redis_keys(name)


async def _delete_nats(name: str) -> None:
    import nats
    from nats.js.errors import NotFoundError

    client = await nats.connect(NATS_URL)
    try:
        js = client.jetstream()
        for delete in (js.delete_stream, js.delete_object_store):
            try:
                await delete(name)
            except NotFoundError:
                pass
    finally:
        await client.close()


async def _nothing(name: str) -> None:
    return None


_CLEANUP = {
    "redis-list": _delete_redis_keys,
    "redis-stream": _delete_redis_keys,
    "rabbitmq": _delete_rabbitmq,
    "nats-jetstream": _delete_nats,
    "nats": _delete_redis_keys,
    "pool": _nothing,
}


@pytest.fixture(params=BROKERS)
async def eco(request: pytest.FixtureRequest) -> AsyncIterator[Ecosystem]:
    kind = request.param
    require(*NEEDS[kind])
    ecosystem = Ecosystem(kind, f"pooltest-{kind}-{uuid.uuid4().hex[:10]}")
    try:
        yield ecosystem
    finally:
        await ecosystem.close()


async def send(broker: Any, task: str, *args: Any, **kwargs: Any) -> Any:
    return await by_name(task, broker).kiq(*args, **kwargs)


async def result_of(handle: Any, timeout: float = 20) -> Any:
    return (await handle.wait_result(timeout=timeout)).raise_for_error().return_value


async def warm_up(broker: Any) -> int:
    """Wait until the workers consume: core NATS drops what is published before a worker
    subscribed, which a worker does once it is ready. Returns the tasks that ran."""
    for _ in range(20):
        handle = await send(broker, "eco.add", 0, 0)
        try:
            await handle.wait_result(timeout=0.5)
            return 1
        except Exception:
            continue
    raise AssertionError("no worker consumed a task in 10 s")


async def off_loop(wait: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking wait in a thread: the producer's event loop must keep running (a NATS
    client, for one, publishes from its loop after ``kiq`` returned)."""
    return await asyncio.to_thread(wait, *args)


def scale(running: RunningPool, workers: int) -> None:
    reply = run_sync(
        request({"cmd": "scale", "workers": workers, "timeout": 30}, running.run_dir, 40)
    )
    assert reply.get("ok"), reply


def tasks_done(running: RunningPool, count: int) -> dict[str, Any]:
    """The stats once ``count`` tasks are counted as done (they are reported just after
    their result is saved)."""
    return wait_for(
        lambda: (s := running.stats())["totals"]["tasks_done"] >= count and s,
        10,
        f"{count} tasks done in the stats",
    )


async def test_a_taskiq_app_runs_unchanged_with_results_stats_state_scaling_and_drain(
    eco: Ecosystem,
) -> None:
    with eco.pool(workers=2) as running:
        broker = await eco.producer()
        sent = await warm_up(broker)
        first = set(running.worker_pids())
        assert running.proc is not None
        supervisor = psutil.Process(running.proc.pid)
        assert not supervisor.net_connections(kind="inet"), "only workers talk to the broker"

        handles = [await send(broker, "eco.add", i, i) for i in range(30)]
        assert [await result_of(h) for h in handles] == [2 * i for i in range(30)]
        failed = await (await send(broker, "eco.fail")).wait_result(timeout=20)
        assert failed.is_err and "failed on purpose" in str(failed.error)
        sent += 31
        stats = tasks_done(running, sent)
        assert stats["totals"]["tasks_done"] == sent
        assert stats["totals"]["tasks_failed"] == 1
        assert sum(w["tasks_done"] for w in stats["workers"]) == sent

        # what each worker's WORKER_STARTUP stored, every worker sees
        seen = [await result_of(await send(broker, "eco.workers_seen")) for _ in range(6)]
        sent += 6
        assert all(set(s) == first for s in seen), (seen, first)

        # scale up: the new worker joins the shared state and takes tasks
        scale(running, 3)
        assert [w["state"] for w in running.stats()["workers"]] == ["ready"] * 3
        seen = await result_of(await send(broker, "eco.workers_seen"))
        sent += 1
        assert set(seen) == set(running.worker_pids())

        # scale down: the retired workers run WORKER_SHUTDOWN; none of their counts is lost
        before = set(running.worker_pids())
        scale(running, 1)
        (last,) = wait_for(lambda: len(p := running.worker_pids()) == 1 and p, 10, "1 worker")
        for pid in before - {last}:
            running.wait_mark(f"shutdown-{pid}", 10)
        stats = tasks_done(running, sent)
        assert stats["totals"]["tasks_done"] == sent

        # graceful drain: the running task finishes, every worker runs WORKER_SHUTDOWN, exit 0
        slow = await send(broker, "eco.slow", 1.0)
        await off_loop(running.wait_mark, f"running-{slow.task_id}")
        running.signal(signal.SIGTERM)
        assert await result_of(slow) == "finished"
        assert await off_loop(running.wait, 20) == 0
        for pid in first | before:
            assert running.mark_path(f"shutdown-{pid}").exists(), f"{pid}: no WORKER_SHUTDOWN"


# core NATS drops what is published while no worker subscribes: nothing waits there
@pytest.mark.parametrize("eco", [k for k in BROKERS if k != "nats"], indirect=True)
async def test_scaling_to_zero_pauses_and_scaling_up_resumes(eco: Ecosystem) -> None:
    with eco.pool(workers=1) as running:
        broker = await eco.producer()
        await warm_up(broker)
        scale(running, 0)
        wait_for(lambda: running.stats()["workers"] == [], 10, "the last worker gone")
        waiting = await send(broker, "eco.add", 20, 22)
        await asyncio.sleep(0.3)
        assert not await waiting.is_ready()
        scale(running, 1)
        assert await result_of(waiting) == 42


class _LosesCancellation:
    """A broker whose ``listen()`` loses cancellations for ``seconds`` (once when 0), as
    redis-py can in a blocking read (redis/redis-py#2028)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def listen(self) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        until: float | None = None
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                if until is None:
                    until = loop.time() + self.seconds
                    continue
                if loop.time() >= until:
                    raise
        yield b""  # an async generator, as brokers' listen() are


@pytest.mark.parametrize(("seconds", "stops_within"), [(0, 0.3), (1.0, 0.9)])
async def test_a_worker_stops_reading_even_if_the_broker_loses_the_cancellation(
    seconds: float, stops_within: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lost once: the next cancellation stops it; lost for longer: it is left behind."""
    from pool.runtime import worker

    monkeypatch.setattr(worker, "LISTEN_CANCEL_GRACE", 0.5)
    broker = _LosesCancellation(seconds)
    worker._cancel_safe_listen(broker)
    reading = asyncio.ensure_future(anext(broker.listen()))
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert loop.time() - started < stops_within
    await asyncio.sleep(seconds)  # the broker's own loop ends with the test


# (RedisStreamBroker reads in batches: what a stopping worker read and did not start stays
# pending for its idle_timeout, in taskiq's worker as here; ListQueueBroker pops one at a time)
@pytest.mark.parametrize("eco", ["redis-list"], indirect=True)
async def test_max_tasks_per_child_recycles_workers_of_an_external_broker(eco: Ecosystem) -> None:
    """taskiq's --max-tasks-per-child: a worker takes no more than N tasks, then another
    replaces it."""
    with eco.pool(workers=1, extra=["--max-tasks-per-child", "5"]) as running:
        broker = await eco.producer()
        first = running.worker_pids()
        handles = [await send(broker, "eco.whoami") for _ in range(12)]
        ran_in = [await result_of(h) for h in handles]
        assert max(ran_in.count(pid) for pid in ran_in) <= 5, "no worker ran more than 5"
        assert first[0] in ran_in and len(set(ran_in)) >= 3
        running.wait_mark(f"shutdown-{first[0]}", 10)
        stats = wait_for(
            lambda: (s := running.stats())["totals"]["tasks_done"] == 12 and s, 10, "12 counted"
        )
        assert stats["totals"]["restarts"] == 0, "a recycled worker did not crash"


async def test_autoscale_grows_on_a_broker_that_cannot_say_how_much_waits() -> None:
    """taskiq-redis's list queue has no queue length for the supervisor: the pool grows
    while every worker runs as many tasks as it may."""
    require("redis")
    ecosystem = Ecosystem("redis-list", f"pooltest-autoscale-{uuid.uuid4().hex[:10]}")
    extra = ["--autoscale", "1,3", "--max-async-tasks", "2"]
    try:
        with ecosystem.pool(workers=1, extra=extra) as running:
            broker = await ecosystem.producer()
            handles = [await send(broker, "eco.whoami", 0.3) for _ in range(120)]
            await off_loop(running.wait_ready, 3, 30)
            pids = {await result_of(h, 60) for h in handles}
            assert len(pids) >= 2
            assert "every worker full" in running.log_path.read_text(errors="replace")
    finally:
        await ecosystem.close()


async def test_hung_worker_detection_and_metrics_on_an_external_broker() -> None:
    """A worker of taskiq-redis whose event loop is blocked is replaced; the metrics endpoint
    counts tasks of every worker, the replaced one included."""
    import urllib.request

    require("redis")
    ecosystem = Ecosystem("redis-list", f"pooltest-hung-{uuid.uuid4().hex[:10]}")
    extra = ["--worker-timeout", "1", "--metrics-port", "0"]
    try:
        with ecosystem.pool(workers=1, extra=extra) as running:
            broker = await ecosystem.producer()
            await warm_up(broker)
            first = running.worker_pids()[0]
            await send(broker, "eco.block_loop_once", "h", 30.0)
            running.wait_mark("blocked-h", 10)
            stats = await off_loop(
                wait_for,
                lambda: (s := running.stats())["totals"]["restarts"] >= 1 and s,
                20,
                "the hung worker replaced",
            )
            assert first not in [w["pid"] for w in stats["workers"]]
            assert "sent no heartbeat" in running.log_path.read_text(errors="replace")
            # taskiq-redis's list queue does not redeliver; the next tasks run elsewhere
            handles = [await send(broker, "eco.add", i, i) for i in range(5)]
            assert [await result_of(h) for h in handles] == [2 * i for i in range(5)]
            url = running.stats()["metrics_url"]
            body = await off_loop(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
            done = [
                float(line.rsplit(" ", 1)[1])
                for line in body.splitlines()
                if line.startswith("pool_tasks_total{") and 'task_name="eco.add"' in line
            ]
            assert sum(done) >= 6  # the warm-up's and these five
    finally:
        await ecosystem.close()
