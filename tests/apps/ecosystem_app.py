"""One taskiq app on the brokers of the ecosystem: `python -m pool run ecosystem_app:broker`.

``POOL_TEST_BROKER`` picks the broker (``make_broker``), ``POOL_TEST_NAME`` the queue, stream,
subject and key names of one test, so tests never share (or delete) each other's. The test
process builds the same broker with ``make_broker`` and sends with the broker's own ``kiq``.
The app is plain taskiq: it imports nothing from pool.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from taskiq import AsyncBroker, Context, TaskiqDepends, TaskiqEvents, TaskiqState

REDIS_URL = os.environ.get("POOL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("POOL_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
NATS_URL = os.environ.get("POOL_TEST_NATS_URL", "nats://127.0.0.1:4222")
KIND = os.environ.get("POOL_TEST_BROKER", "pool")
NAME = os.environ.get("POOL_TEST_NAME", "pooltest-eco")
MARKS = os.environ.get("POOL_TEST_MARKS")


def _redis_results(name: str) -> Any:
    from taskiq_redis import RedisAsyncResultBackend

    return RedisAsyncResultBackend(REDIS_URL, result_ex_time=300, prefix_str=f"{name}:result")


def make_broker(kind: str = KIND, name: str = NAME) -> AsyncBroker:
    """The broker of ``kind`` with the names of one test (the same in workers and test)."""
    if kind == "redis-list":
        from taskiq_redis import ListQueueBroker

        return ListQueueBroker(REDIS_URL, queue_name=name).with_result_backend(_redis_results(name))
    if kind == "redis-stream":
        from taskiq_redis import RedisStreamBroker

        return RedisStreamBroker(
            REDIS_URL, queue_name=name, consumer_group_name=name, xread_block=200
        ).with_result_backend(_redis_results(name))
    if kind == "rabbitmq":
        from taskiq_aio_pika import AioPikaBroker, Exchange, Queue

        return AioPikaBroker(
            AMQP_URL,
            exchange=Exchange(name=name),
            task_queues=[Queue(name=name)],
            dead_letter_queue=Queue(name=f"{name}.dead_letter"),
            delay_queue=Queue(name=f"{name}.delay"),
        ).with_result_backend(_redis_results(name))
    if kind == "nats-jetstream":
        from taskiq_nats import NATSObjectStoreResultBackend, PullBasedJetStreamBroker

        return PullBasedJetStreamBroker(
            NATS_URL, subject=f"{name}.tasks", stream_name=name, durable=name
        ).with_result_backend(NATSObjectStoreResultBackend(NATS_URL, bucket_name=name))
    if kind == "nats":
        from taskiq_nats import NatsBroker

        return NatsBroker(NATS_URL, subject=f"{name}.tasks", queue=name).with_result_backend(
            _redis_results(name)
        )
    if kind == "pool":
        from pool import PoolBroker

        return PoolBroker(run_dir=os.environ.get("POOL_TEST_RUN_DIR"))
    raise ValueError(f"unknown POOL_TEST_BROKER {kind!r}")


broker = make_broker()


def mark(name: str, text: str = "") -> None:
    """Leave a file the test can wait for (events happen in other processes)."""
    if MARKS:
        (Path(MARKS) / name).write_text(text or str(os.getpid()))


@broker.on_event(TaskiqEvents.WORKER_STARTUP)
async def on_startup(state: TaskiqState) -> None:
    state.incr("workers_started")
    state[f"worker-{os.getpid()}"] = os.getpid()
    mark(f"startup-{os.getpid()}")


@broker.on_event(TaskiqEvents.WORKER_SHUTDOWN)
async def on_shutdown(state: TaskiqState) -> None:
    state.incr("workers_stopped")
    mark(f"shutdown-{os.getpid()}")


@broker.task(task_name="eco.add")
async def add(a: int, b: int) -> int:
    return a + b


@broker.task(task_name="eco.whoami")
async def whoami(delay: float = 0.0) -> int:
    await asyncio.sleep(delay)
    return os.getpid()


@broker.task(task_name="eco.fail")
async def fail() -> None:
    raise ValueError("failed on purpose")


@broker.task(task_name="eco.workers_seen")
async def workers_seen(state: TaskiqState = TaskiqDepends()) -> list[int]:
    """The workers whose WORKER_STARTUP this worker's state shows."""
    return sorted(int(state[key]) for key in state if key.startswith("worker-"))


@broker.task(task_name="eco.slow")
async def slow(seconds: float, context: Context = TaskiqDepends()) -> str:
    mark(f"running-{context.message.task_id}")
    await asyncio.sleep(seconds)
    return "finished"
