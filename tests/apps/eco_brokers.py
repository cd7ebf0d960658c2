"""The brokers of the taskiq ecosystem, built alike in workers and in tests: ``make_broker``.

``POOL_TEST_BROKER`` picks the broker, ``POOL_TEST_NAME`` the queue, stream, subject and key
names of one test, so tests never share (or delete) each other's.
"""

from __future__ import annotations

import os
from typing import Any

from taskiq import AsyncBroker

REDIS_URL = os.environ.get("POOL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("POOL_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
NATS_URL = os.environ.get("POOL_TEST_NATS_URL", "nats://127.0.0.1:4222")
KIND = os.environ.get("POOL_TEST_BROKER", "pool")
NAME = os.environ.get("POOL_TEST_NAME", "pooltest-eco")


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
