"""pool.redis: only the culprit is blamed for a dead consumer.

Entries taken over from a consumer that died run alone, one at a time, and only a death
while an entry ran alone counts towards ``max_deliveries``. A consumer "dies" here by
closing its listener without acknowledging what it was handed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from pool.extensions.errors import WorkerCrashedError
from tests.pool_support import until
from tests.redis_support import RedisSpace, redis_space
from tests.test_redis import (
    Collector,
    ack,
    make_broker,
    message,
    next_message,
    pending_count,
    stream_len,
    sync_client,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def space() -> Iterator[RedisSpace]:
    yield from redis_space()


def blamed(queue: str) -> dict[bytes, bytes]:
    client = sync_client()
    try:
        return dict(client.hgetall(f"{queue}:blame"))
    finally:
        client.close()


async def test_a_suspect_waits_for_the_tasks_beside_it_and_runs_alone(
    space: RedisSpace, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "pool.redis")
    queue = space.name("q")
    a = make_broker(space, consumer_name="a", idle_timeout=300)
    b = make_broker(space, consumer_name="b", idle_timeout=300)
    gen_a = a.listen()
    try:
        await a.kick(message(b"suspect"))
        assert (await next_message(gen_a)).data == b"suspect"
        async with Collector(b) as collector:
            await b.kick(message(b"running"))
            _, running = await collector.get()
            assert running.data == b"running"
            await gen_a.aclose()  # a dies holding the suspect
            await until(lambda: "to run it alone" in caplog.text, 10, "b to see the suspect")
            await b.kick(message(b"new"))
            with pytest.raises(AssertionError, match="no message"):
                await collector.get(timeout=1.0)  # b waits to be idle, reads nothing new
            await ack(running)
            _, suspect = await collector.get()
            assert suspect.data == b"suspect"
            with pytest.raises(AssertionError, match="no message"):
                await collector.get(timeout=1.0)  # nothing beside the suspect
            await ack(suspect)
            _, new = await collector.get()
            assert new.data == b"new"
            await ack(new)
        assert pending_count(queue) == 0 and stream_len(queue) == 0
        assert blamed(queue) == {}
    finally:
        await gen_a.aclose()
        await a.shutdown()
        await b.shutdown()


async def test_only_a_death_while_running_alone_counts_against_a_message(
    space: RedisSpace,
) -> None:
    """max_deliveries=1: a consumer dies running two messages (neither is blamed); the next
    runs the first alone and dies (it is blamed); the third answers the first with an error
    and runs the second."""
    queue = space.name("q")

    a, b, c = (make_broker(space, consumer_name=n, idle_timeout=300, max_deliveries=1)
               for n in "abc")  # fmt: skip

    @a.task(task_name="deadly")
    async def deadly() -> None: ...

    @a.task(task_name="innocent")
    async def innocent() -> None: ...

    try:
        first = await deadly.kiq()
        second = await innocent.kiq()
        gen_a = a.listen()
        await next_message(gen_a)
        await next_message(gen_a)
        await gen_a.aclose()  # died running both: no blame yet
        async with Collector(b) as collector:
            _, alone = await collector.get()  # taken over, run alone ...
        # ... and b died running it alone: that one is blamed
        async with Collector(c) as collector:
            _, other = await collector.get()
            assert other.data != alone.data
            await ack(other)
            result = await first.wait_result(timeout=10)
            assert result.is_err and isinstance(result.error, WorkerCrashedError)
            assert "'deadly'" in str(result.error) and "1 times" in str(result.error)
            await until(lambda: pending_count(queue) == 0, 10, "the poison message dropped")
        assert b"deadly" in alone.data and b"innocent" in other.data  # taken in id order
        assert not await c.result_backend.is_result_ready(second.task_id)  # not given up
        assert stream_len(queue) == 0
        assert blamed(queue) == {}
    finally:
        for broker in (a, b, c):
            await broker.shutdown()
