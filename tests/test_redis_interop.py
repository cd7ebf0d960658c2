"""pool.redis next to taskiq-redis: the same stream and result keys, in both directions, so
that a fleet can move from one to the other one machine at a time."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from taskiq import TaskiqResult
from taskiq.serializers import JSONSerializer

from tests.redis_support import RedisSpace, redis_space

taskiq_redis = pytest.importorskip("taskiq_redis")
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def space() -> Iterator[RedisSpace]:
    yield from redis_space()


def _ours(space: RedisSpace) -> Any:
    from pool.redis import RedisStreamBroker

    return RedisStreamBroker(
        space.url, queue_name=space.name("q"), consumer_group_name=space.name("g"),
        xread_block=100,
    )  # fmt: skip


def _theirs(space: RedisSpace) -> Any:
    return taskiq_redis.RedisStreamBroker(
        space.url, queue_name=space.name("q"), consumer_group_name=space.name("g"),
        consumer_id="0", xread_block=100,
    )  # fmt: skip


async def _one_message(broker: Any) -> bytes:
    """The next message ``broker`` listens to, acknowledged."""
    listener = broker.listen()
    try:
        message = await asyncio.wait_for(listener.__anext__(), 20)
        await message.ack()
        return bytes(message.data)
    finally:
        await listener.aclose()


@pytest.mark.parametrize("direction", ["taskiq-redis to pool", "pool to taskiq-redis"])
async def test_a_task_crosses_between_the_two_stream_brokers(
    space: RedisSpace, direction: str
) -> None:
    sender, receiver = (_theirs(space), _ours(space))
    if direction == "pool to taskiq-redis":
        sender, receiver = receiver, sender
    await receiver.startup()  # creates the consumer group
    await sender.startup()

    @sender.task(task_name="interop:add")
    async def add(a: int, b: int) -> int:
        return a + b

    try:
        task = await add.kiq(2, 3)
        data = await _one_message(receiver)
        message = receiver.formatter.loads(data)
        assert (message.task_id, message.task_name, message.args) == (
            task.task_id,
            "interop:add",
            [2, 3],
        )
    finally:
        await sender.shutdown()
        await receiver.shutdown()


async def test_pool_reads_what_taskiq_redis_stores(space: RedisSpace) -> None:
    from pool.redis import RedisAsyncResultBackend, RedisResultBackend

    assert RedisAsyncResultBackend is RedisResultBackend  # taskiq-redis's name works too
    theirs = taskiq_redis.RedisAsyncResultBackend(
        space.url, prefix_str=space.name("r"), serializer=JSONSerializer()
    )
    ours: RedisResultBackend[Any] = RedisResultBackend(space.url, prefix_str=space.name("r"))
    try:
        result: TaskiqResult[Any] = TaskiqResult(
            is_err=False, return_value={"a": [1, 2]}, execution_time=0.5, labels={"k": "v"}
        )
        await theirs.set_result("t1", result)
        assert await ours.is_result_ready("t1")
        got = await ours.get_result("t1")
        assert got.return_value == {"a": [1, 2]} and got.labels == {"k": "v"}
    finally:
        await ours.shutdown()
        await theirs.shutdown()
