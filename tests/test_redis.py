"""pool.redis against a real Redis: the stream broker, the result backend and the state.

Each class is a subclass of a taskiq ABC; the contract tests drive them with taskiq's own
pieces (``taskiq.receiver.Receiver``, ``AsyncKicker``, ``ProgressTracker``,
``AcknowledgeType``), and the rest checks what pool adds (claims, keep-alive, delays,
reconnection, the poison rule, pushed results).
"""

from __future__ import annotations

import asyncio
import json
import logging
import multiprocessing
import os
import pickle
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import Any

import pytest
from pydantic import BaseModel
from taskiq import (
    AckableMessage,
    AcknowledgeType,
    AsyncBroker,
    AsyncResultBackend,
    BrokerMessage,
    Context,
    ResultGetError,
    ScheduleSource,
    SendTaskError,
    TaskiqDepends,
    TaskiqEvents,
    TaskiqMessage,
    TaskiqResult,
    TaskiqResultTimeoutError,
)
from taskiq.depends.progress_tracker import ProgressTracker, TaskProgress, TaskState
from taskiq.exceptions import BrokerError, ResultSetError, TaskiqError
from taskiq.receiver import Receiver

from pool.extensions.errors import WorkerCrashedError
from pool.extensions.handles import PoolTask, PushedResults
from tests.pool_support import until
from tests.redis_support import (
    REDIS_URL,
    UNREACHABLE_URL,
    PrivateRedis,
    RedisSpace,
    redis_space,
    wait_for,
)

redis = pytest.importorskip("redis")

from pool.redis import (  # noqa: E402
    RedisQueueFullError,
    RedisResultBackend,
    RedisScheduleSource,
    RedisSendTaskError,
    RedisState,
    RedisStreamBroker,
)
from shared_state import TaskiqState  # noqa: E402

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def space() -> Iterator[RedisSpace]:
    yield from redis_space()


# --------------------------------------------------------------------------- helpers
def message(payload: bytes, task_id: str | None = None, **labels: Any) -> BrokerMessage:
    return BrokerMessage(
        task_id=task_id or uuid.uuid4().hex, task_name="t", message=payload, labels=labels
    )


def make_broker(space: RedisSpace, **kwargs: Any) -> RedisStreamBroker:
    """A broker on this test's stream, with a result backend on this test's keys."""
    kwargs.setdefault("queue_name", space.name("q"))
    broker = RedisStreamBroker(space.url, **kwargs)
    return broker.with_result_backend(RedisResultBackend(space.url, prefix_str=space.name("r")))


async def next_message(gen: AsyncGenerator[Any, None], timeout: float = 10.0) -> AckableMessage:
    raw = await asyncio.wait_for(gen.__anext__(), timeout)
    assert isinstance(raw, AckableMessage)
    return raw


class Collector:
    """Runs ``broker.listen()`` in a task and records what arrives, with arrival times."""

    def __init__(self, broker: RedisStreamBroker) -> None:
        self.broker = broker
        self.queue: asyncio.Queue[tuple[float, AckableMessage]] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Collector:
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        async for raw in self.broker.listen():
            assert isinstance(raw, AckableMessage)
            self.queue.put_nowait((time.monotonic(), raw))

    async def get(self, timeout: float = 10.0) -> tuple[float, AckableMessage]:
        assert self.task is not None
        getter = asyncio.ensure_future(self.queue.get())
        done, _ = await asyncio.wait(
            {getter, self.task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if getter not in done:
            getter.cancel()
            if self.task in done:
                self.task.result()  # raises what ended the listener
                raise AssertionError("listen() ended")
            raise AssertionError(f"no message within {timeout} s")
        return getter.result()

    async def __aexit__(self, *exc: object) -> None:
        assert self.task is not None
        self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass


async def ack(raw: AckableMessage) -> None:
    done = raw.ack()
    if done is not None:
        await done


def sync_client(url: str = REDIS_URL) -> Any:
    return redis.Redis.from_url(url, socket_timeout=5)


def pending_count(queue: str, group: str = "pool") -> int:
    client = sync_client()
    try:
        return int(client.xpending(queue, group)["pending"])
    finally:
        client.close()


def stream_len(queue: str) -> int:
    client = sync_client()
    try:
        return int(client.xlen(queue))
    finally:
        client.close()


def run_processes(target: Callable[..., Any], n: int, *args: Any, timeout: float = 40) -> list[Any]:
    """Run ``target(index, *args)`` in ``n`` forked processes; their return values."""
    ctx = multiprocessing.get_context("fork")
    results: Any = ctx.Queue()

    def child(index: int) -> None:
        try:
            results.put(("ok", target(index, *args)))
        except BaseException:
            results.put(("error", traceback.format_exc()))

    procs = [ctx.Process(target=child, args=(i,), daemon=True) for i in range(n)]
    for proc in procs:
        proc.start()
    out: list[tuple[str, Any]] = []
    try:
        for _ in range(n):
            out.append(results.get(timeout=timeout))
    finally:
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
    errors = [value for status, value in out if status == "error"]
    assert not errors, "\n".join(errors)
    return [value for _, value in out]


def result_of(value: Any, **kwargs: Any) -> TaskiqResult[Any]:
    return TaskiqResult(is_err=False, return_value=value, execution_time=0.5, **kwargs)


def why(exc: BaseException) -> str:
    """An error's message and its cause's: taskiq's ``kiq`` wraps what ``kick`` raised in a
    bare ``SendTaskError`` (pool's kicker unwraps it again)."""
    return f"{exc} / {exc.__cause__}"


# --------------------------------------------------------------------------- import surface
def test_importing_pool_does_not_import_redis() -> None:
    code = (
        "import sys, pool\n"
        "assert 'redis' not in sys.modules, 'import pool imported redis'\n"
        "from pool.redis import RedisStreamBroker, RedisResultBackend, RedisState\n"
        "from shared_state import TaskiqState\n"
        "assert issubclass(RedisState, TaskiqState)\n"
        "assert 'redis' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_pool_redis_without_redis_py_says_what_to_install() -> None:
    code = (
        "import sys\n"
        "sys.modules['redis'] = None  # as if redis-py were not installed\n"
        "try:\n"
        "    import pool.redis\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    raise SystemExit('no ImportError')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], check=True, timeout=30, capture_output=True, text=True
    )
    assert "pip install 'taskiq-pool[redis]'" in done.stdout


def test_the_redis_classes_are_taskiq_subclasses() -> None:
    backend: RedisResultBackend[Any] = RedisResultBackend(REDIS_URL)
    assert issubclass(RedisStreamBroker, AsyncBroker)
    pushed: PushedResults = backend  # the protocol pool's handles wait through (mypy checks it)
    assert isinstance(backend, AsyncResultBackend) and callable(pushed.wait_ready)
    assert issubclass(RedisScheduleSource, ScheduleSource)
    assert issubclass(RedisSendTaskError, SendTaskError) and issubclass(
        RedisSendTaskError, TaskiqError
    )
    # taskiq rebuilds a stored exception by calling its class with the exception's args
    rebuilt = RedisSendTaskError("why")  # type: ignore[call-arg]  # mypy: keyword-only
    assert str(rebuilt) == "why" == str(RedisSendTaskError(reason="why"))


# --------------------------------------------------------------------------- taskiq contract
class Point(BaseModel):
    x: int
    tags: list[str]


class TaskFailed(Exception):
    pass


async def run_one(broker: RedisStreamBroker, gen: AsyncGenerator[Any, None], **kw: Any) -> None:
    """Take the next message and run it with taskiq's own receiver."""
    await Receiver(broker, max_async_tasks=10, **kw).callback(await next_message(gen))


async def test_result_round_trip_carries_a_pydantic_model_and_an_exception(
    space: RedisSpace,
) -> None:
    broker = make_broker(space)

    @broker.task
    async def make_point(x: int) -> Point:
        return Point(x=x, tags=["a"])

    @broker.task
    async def fail() -> None:
        raise TaskFailed("it broke")

    async with broker:
        gen = broker.listen()
        try:
            ok, bad = await make_point.kiq(3), await fail.kiq()
            assert isinstance(ok, PoolTask)
            await run_one(broker, gen)
            await run_one(broker, gen)
            result = await ok.wait_result(timeout=10)
            assert result.return_value == Point(x=3, tags=["a"]) and not result.is_err
            failed = await bad.wait_result(timeout=10)
            assert failed.is_err and isinstance(failed.error, TaskFailed)
            assert str(failed.error) == "it broke"
            with pytest.raises(TaskFailed, match="it broke"):
                failed.raise_for_error()
            # stored as taskiq-redis stores it: the JSON of TaskiqResult.model_dump
            stored = json.loads(space.client().get(space.name(f"r:{ok.task_id}")))
            assert stored["return_value"] == {"x": 3, "tags": ["a"]}
        finally:
            await gen.aclose()


async def test_taskiq_redis_reads_what_pool_stores(space: RedisSpace) -> None:
    taskiq_redis = pytest.importorskip("taskiq_redis")
    from taskiq.serializers import JSONSerializer

    ours: RedisResultBackend[Any] = RedisResultBackend(space.url, prefix_str=space.name("r"))
    theirs = taskiq_redis.RedisAsyncResultBackend(
        space.url, prefix_str=space.name("r"), serializer=JSONSerializer()
    )
    try:
        await ours.set_result("t", result_of({"a": 1}, labels={"k": "v"}))
        await ours.set_progress("t", TaskProgress(state=TaskState.STARTED, meta={"n": 1}))
        got = await theirs.get_result("t")
        assert got.return_value == {"a": 1} and got.labels == {"k": "v"}
        progress = await theirs.get_progress("t")
        assert progress is not None and progress.state == TaskState.STARTED
        assert progress.meta == {"n": 1}
    finally:
        await ours.shutdown()
        await theirs.shutdown()


async def test_progress_through_taskiqs_progress_tracker(space: RedisSpace) -> None:
    broker = make_broker(space)
    halfway, go_on = asyncio.Event(), asyncio.Event()

    @broker.task
    async def long_job(progress: ProgressTracker[dict[str, int]] = TaskiqDepends()) -> str:
        await progress.set_progress(TaskState.STARTED, {"done": 1})
        halfway.set()
        await asyncio.wait_for(go_on.wait(), 10)
        await progress.set_progress("finishing")  # meta kept from before
        return "done"

    async with broker:
        gen = broker.listen()
        try:
            handle = await long_job.kiq()
            assert await handle.get_progress() is None
            running = asyncio.create_task(run_one(broker, gen))
            await asyncio.wait_for(halfway.wait(), 10)
            progress = await handle.get_progress()
            assert isinstance(progress, TaskProgress)
            assert progress.state == TaskState.STARTED and progress.meta == {"done": 1}
            go_on.set()
            await asyncio.wait_for(running, 10)
            assert (await handle.wait_result(timeout=10)).return_value == "done"
            progress = await handle.get_progress()
            assert progress is not None
            assert progress.state == "finishing" and progress.meta == {"done": 1}
        finally:
            await gen.aclose()


async def test_async_with_broker_starts_and_stops_it(space: RedisSpace) -> None:
    broker = make_broker(space)
    events: list[str] = []
    broker.add_event_handler(TaskiqEvents.CLIENT_STARTUP, lambda _: events.append("up"))
    broker.add_event_handler(TaskiqEvents.CLIENT_SHUTDOWN, lambda _: events.append("down"))

    @broker.task
    async def noop() -> None:
        pass

    async with broker:
        assert events == ["up"]
        await noop.kiq()
        assert broker._redis._clients  # a client for this loop
    assert events == ["up", "down"]
    assert not broker._redis._clients  # closed by shutdown
    assert stream_len(space.name("q")) == 1


async def test_kicker_with_task_id_and_labels(space: RedisSpace) -> None:
    broker = make_broker(space)
    seen: list[Any] = []

    @broker.task(task_name="labelled", retries=1)
    async def labelled(context: Context = TaskiqDepends()) -> str:
        seen.append(dict(context.message.labels))
        return context.message.task_id

    async with broker:
        gen = broker.listen()
        try:
            handle = await labelled.kicker().with_task_id("my-id").with_labels(priority=3).kiq()
            assert isinstance(handle, PoolTask) and handle.task_id == "my-id"
            raw = await next_message(gen)
            sent = broker.formatter.loads(raw.data)
            assert sent.task_id == "my-id" and sent.labels["priority"] == "3"
            await Receiver(broker, max_async_tasks=10).callback(raw)
            result = await handle.wait_result(timeout=10)
            assert result.return_value == "my-id"
            assert seen == [{"retries": 1, "priority": 3}]  # label types restored by taskiq
            assert result.labels == {"retries": 1, "priority": 3}
        finally:
            await gen.aclose()


@pytest.mark.parametrize(
    "ack_type, pending_while_running",
    [
        (AcknowledgeType.WHEN_RECEIVED, 0),
        (AcknowledgeType.WHEN_EXECUTED, 1),
        (AcknowledgeType.WHEN_SAVED, 1),
    ],
)
async def test_acknowledge_types(
    space: RedisSpace, ack_type: AcknowledgeType, pending_while_running: int
) -> None:
    queue = space.name("q")
    broker = make_broker(space)
    during: list[int] = []

    @broker.task
    async def job() -> None:
        during.append(pending_count(queue))

    async with broker:
        gen = broker.listen()
        try:
            await job.kiq()
            await run_one(broker, gen, ack_type=ack_type)
            assert during == [pending_while_running]
            assert pending_count(queue) == 0 and stream_len(queue) == 0  # XACK and XDEL
        finally:
            await gen.aclose()


@pytest.fixture
def stopped_redis() -> Iterator[PrivateRedis]:
    """A private Redis that is not running: every command to it fails."""
    server = PrivateRedis()
    try:
        yield server
    finally:
        server.close()


def broker_with_results_in(space: RedisSpace, results_url: str, **kwargs: Any) -> RedisStreamBroker:
    """A broker on this test's stream whose results go to ``results_url``, giving up on a
    failing save after 0.3 s (instead of 30 s)."""
    broker = RedisStreamBroker(space.url, queue_name=space.name("q"), **kwargs)
    backend: RedisResultBackend[Any] = RedisResultBackend(
        results_url, prefix_str=space.name("r"), save_timeout=0.3, socket_connect_timeout=0.2
    )
    return broker.with_result_backend(backend)


async def test_a_task_whose_result_could_not_be_saved_runs_again(
    space: RedisSpace, stopped_redis: PrivateRedis
) -> None:
    """taskiq's receiver (as under ``pool run``) acknowledges a message even when its result
    could not be saved; the broker gives it back instead, so the task runs again."""
    queue = space.name("q")
    broker = broker_with_results_in(space, stopped_redis.url)
    runs = 0

    @broker.task(task_name="saved-late")
    async def job() -> int:
        nonlocal runs
        runs += 1
        return runs

    receiver = Receiver(broker, max_async_tasks=10)
    async with broker:
        gen = broker.listen()
        try:
            handle = await job.kiq()
            await receiver.callback(await next_message(gen))  # the result store is down
            assert runs == 1
            again = await next_message(gen, timeout=10)  # given back at once
            assert broker.formatter.loads(again.data).task_id == handle.task_id
            stopped_redis.start()
            await receiver.callback(again)
            assert runs == 2
            assert pending_count(queue) == 0 and stream_len(queue) == 0
            result = await broker.result_backend.get_result(handle.task_id)
            assert result.return_value == 2
        finally:
            await gen.aclose()


async def test_a_message_whose_result_could_not_be_saved_is_no_longer_kept_alive(
    space: RedisSpace, stopped_redis: PrivateRedis
) -> None:
    """A receiver that raises instead of acknowledging (``raise_err=True``): the consumer
    stops refreshing the entry, so another consumer takes it over after the idle timeout."""
    a = broker_with_results_in(space, stopped_redis.url, consumer_name="a", idle_timeout=500)
    b = RedisStreamBroker(
        space.url, queue_name=space.name("q"), consumer_name="b", idle_timeout=500
    )

    @a.task(task_name="unsaved")
    async def job() -> None: ...

    async with a:
        gen = a.listen()
        try:
            handle = await job.kiq()
            raw = await next_message(gen)
            with pytest.raises(ResultSetError):
                await Receiver(a, max_async_tasks=10).callback(raw, raise_err=True)
            async with Collector(b) as collector:
                _, taken = await collector.get(timeout=10)  # would be kept alive forever
                assert a.formatter.loads(taken.data).task_id == handle.task_id
                await ack(taken)
            assert pending_count(space.name("q")) == 0
        finally:
            await gen.aclose()
            await b.shutdown()


async def test_set_result_waits_out_a_redis_restart() -> None:
    server = PrivateRedis(persistent=True)
    server.start()
    backend: RedisResultBackend[Any] = RedisResultBackend(server.url, prefix_str="r")
    try:
        await backend.set_result("before", result_of(0))
        server.stop()
        saving = asyncio.create_task(backend.set_result("t", result_of("kept")))
        await asyncio.sleep(0.5)  # the save fails and is retried meanwhile
        assert not saving.done()
        server.start()
        await asyncio.wait_for(saving, 20)
        assert (await backend.get_result("t")).return_value == "kept"
        assert not backend.has_unsaved()
    finally:
        await backend.shutdown()
        server.close()


# --------------------------------------------------------------------------- broker
async def test_unacked_message_is_claimed_by_another_consumer(space: RedisSpace) -> None:
    queue = space.name("q")
    a = RedisStreamBroker(space.url, queue_name=queue, consumer_name="a", idle_timeout=500)
    b = RedisStreamBroker(space.url, queue_name=queue, consumer_name="b", idle_timeout=500)
    try:
        await a.kick(message(b"payload-1"))
        gen_a = a.listen()
        got_a = await next_message(gen_a)
        delivered = time.monotonic()
        assert got_a.data == b"payload-1"
        await gen_a.aclose()  # consumer a "dies" without acknowledging

        async with Collector(b) as collector:
            arrived, got_b = await collector.get(timeout=10)
        assert got_b.data == b"payload-1"
        assert arrived - delivered >= 0.45  # not before the idle timeout
        await ack(got_b)
        assert pending_count(queue) == 0
        assert stream_len(queue) == 0
    finally:
        await a.shutdown()
        await b.shutdown()


async def test_messages_read_but_not_handed_out_go_back_at_once(space: RedisSpace) -> None:
    queue = space.name("q")
    a = RedisStreamBroker(space.url, queue_name=queue, consumer_name="a", xread_count=10)
    b = RedisStreamBroker(space.url, queue_name=queue, consumer_name="b")  # idle 600 s
    try:
        for i in range(5):
            await a.kick(message(f"m{i}".encode()))
        gen_a = a.listen()
        first = await next_message(gen_a)  # a read all five in one batch
        await gen_a.aclose()  # stops after one: the other four are given back
        async with Collector(b) as collector:
            rest = [(await collector.get(timeout=5))[1] for _ in range(4)]
        assert sorted(m.data for m in [first, *rest]) == [f"m{i}".encode() for i in range(5)]
        for raw in [first, *rest]:
            await ack(raw)
        assert pending_count(queue) == 0 and stream_len(queue) == 0
    finally:
        await a.shutdown()
        await b.shutdown()


async def test_running_message_is_not_claimed_while_its_consumer_lives(space: RedisSpace) -> None:
    queue = space.name("q")
    a = RedisStreamBroker(space.url, queue_name=queue, consumer_name="a", idle_timeout=500)
    b = RedisStreamBroker(space.url, queue_name=queue, consumer_name="b", idle_timeout=500)
    gen_a = a.listen()
    try:
        await a.kick(message(b"long task"))
        await a.kick(message(b"read, not yet handed out"))
        got = await next_message(gen_a)  # a read both in one batch and handed out one
        async with Collector(b) as collector:
            # three idle timeouts: a's listener keeps both entries fresh
            with pytest.raises(AssertionError, match="no message"):
                await collector.get(timeout=1.5)
            await ack(got)
            second = await next_message(gen_a)
            assert second.data == b"read, not yet handed out"
            await ack(second)
        assert pending_count(queue) == 0
    finally:
        await gen_a.aclose()
        await a.shutdown()
        await b.shutdown()


async def test_a_message_whose_consumers_died_max_deliveries_times_gets_an_error_result(
    space: RedisSpace,
) -> None:
    queue = space.name("q")

    def node(name: str) -> RedisStreamBroker:
        return make_broker(space, consumer_name=name, idle_timeout=300, max_deliveries=2)

    brokers = [node(f"c{i}") for i in range(3)]

    @brokers[0].task(task_name="deadly")
    async def deadly() -> None: ...

    try:
        handle = await deadly.kiq()
        for doomed in brokers[:2]:  # each takes the message and "dies" without an ack
            async with Collector(doomed) as collector:
                await collector.get(timeout=10)
        async with Collector(brokers[2]) as collector:
            # delivered twice already: the third consumer answers it instead of running it
            result = await handle.wait_result(timeout=10)
            with pytest.raises(AssertionError, match="no message"):
                await collector.get(timeout=0.5)
        assert result.is_err and isinstance(result.error, WorkerCrashedError)
        assert "'deadly'" in str(result.error) and "2 times" in str(result.error)
        assert pending_count(queue) == 0 and stream_len(queue) == 0
    finally:
        for broker in brokers:
            await broker.shutdown()


async def test_delayed_message_arrives_after_its_delay(space: RedisSpace) -> None:
    queue = space.name("q")
    broker = make_broker(space, xread_block=200)

    @broker.task(task_name="later")
    async def later() -> None: ...

    client = sync_client()
    try:
        async with Collector(broker) as collector:
            sent = time.monotonic()
            await later.kicker().with_labels(delay=1).kiq()  # taskiq's delay label
            await broker.kick(message(b"now"))
            assert client.zcard(f"{queue}:delayed") == 1
            first_at, first = await collector.get(timeout=5)
            assert first.data == b"now"
            assert first_at - sent < 1.0
            later_at, delayed = await collector.get(timeout=5)
            assert broker.formatter.loads(delayed.data).task_name == "later"
            assert later_at - sent >= 0.95, "delivered before its delay"
            assert later_at - sent < 3.0
            assert client.zcard(f"{queue}:delayed") == 0
            await ack(first)
            await ack(delayed)
    finally:
        client.close()
        await broker.shutdown()


async def test_invalid_delay_label_is_refused(space: RedisSpace) -> None:
    broker = make_broker(space)

    @broker.task
    async def job() -> None: ...

    try:
        with pytest.raises(RedisSendTaskError, match="delay"):
            await broker.kick(message(b"x", delay="soon"))
        with pytest.raises(SendTaskError) as caught:
            await job.kicker().with_labels(delay="soon").kiq()
        assert "delay" in why(caught.value)
    finally:
        await broker.shutdown()


async def test_queue_name_label_sends_to_another_stream(space: RedisSpace) -> None:
    broker = make_broker(space)
    other = space.name("other")
    try:
        await broker.kick(message(b"x", queue_name=other))
        assert stream_len(other) == 1 and stream_len(space.name("q")) == 0
    finally:
        await broker.shutdown()


async def test_at_the_cap_kiq_is_refused_and_no_accepted_task_is_dropped(
    space: RedisSpace,
) -> None:
    queue = space.name("q")
    broker = make_broker(space, maxlen=100)

    @broker.task(task_name="capped")
    async def capped(i: int) -> None: ...

    sent: list[str] = []
    refused: list[BaseException] = []
    try:
        for i in range(300):
            try:
                sent.append((await capped.kiq(i)).task_id)
            except SendTaskError as exc:
                refused.append(exc)
        with pytest.raises(SendTaskError, match="maxlen"):  # a delayed task counts as well
            await capped.kicker().with_labels(delay=60).kiq(0)
        client = sync_client()
        try:
            kept = [json.loads(f[b"data"])["task_id"] for _, f in client.xrange(queue)]
        finally:
            client.close()
        assert kept == sent, f"{len(sent) - len(kept)} accepted task(s) dropped"
        assert (len(sent), len(refused)) == (100, 200)
        error = refused[0]
        assert isinstance(error, RedisQueueFullError)
        assert "maxlen=100" in str(error) and "maxlen=N" in str(error) and queue in str(error)

        # tasks that are done make room
        async with Collector(broker) as collector:
            for _ in range(10):
                await ack((await collector.get())[1])
        for i in range(10):
            await capped.kiq(i)
        with pytest.raises(RedisQueueFullError):
            await capped.kiq(0)
        assert stream_len(queue) == 100
    finally:
        await broker.shutdown()


async def test_kicks_sent_together_share_a_call_and_each_learns_its_fate() -> None:
    """150 kiq at once under a cap of 100: they go in few script calls (not 150 round
    trips; counted by a Redis of this test's own), in their order, and exactly the 50 over
    the cap are refused."""
    import redis

    server = PrivateRedis()
    server.start()
    broker = RedisStreamBroker(server.url, queue_name="q", maxlen=100)

    @broker.task(task_name="capped")
    async def capped(i: int) -> None: ...

    client = redis.Redis.from_url(server.url)
    try:
        outcomes = await asyncio.gather(
            *(capped.kiq(i) for i in range(150)), return_exceptions=True
        )
        sent = [o.task_id for o in outcomes if not isinstance(o, BaseException)]
        refused = [o for o in outcomes if isinstance(o, BaseException)]
        assert (len(sent), len(refused)) == (100, 50)
        assert all(isinstance(e, RedisQueueFullError) for e in refused)
        kept = [json.loads(f[b"data"])["task_id"] for _, f in client.xrange("q")]
        assert kept == sent  # in the order they were sent
        stats = client.info("commandstats")
        scripts = sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("evalsha", "eval"))
        assert scripts <= 3, f"{scripts} script calls for 150 kicks"
    finally:
        client.close()
        await broker.shutdown()
        server.close()


async def test_without_a_cap_every_task_stays(space: RedisSpace) -> None:
    broker = make_broker(space, maxlen=None)
    try:
        for i in range(300):
            await broker.kick(message(str(i).encode()))
        assert stream_len(space.name("q")) == 300
    finally:
        await broker.shutdown()


async def test_at_the_cap_entries_every_group_acknowledged_are_trimmed(space: RedisSpace) -> None:
    """Consumers that XACK without XDEL (taskiq-redis's) leave acknowledged entries in the
    stream: at the cap they are trimmed, the unacknowledged ones never are."""
    queue = space.name("q")
    broker = make_broker(space, maxlen=10)
    client = sync_client()
    try:
        client.xgroup_create(queue, "theirs", id="0", mkstream=True)
        client.xgroup_create(queue, "other", id="0")
        for i in range(10):
            await broker.kick(message(f"m{i}".encode()))
        read = client.xreadgroup("theirs", "c", {queue: ">"}, count=6)[0][1]
        client.xack(queue, "theirs", *[eid for eid, _ in read])
        with pytest.raises(RedisQueueFullError):  # group "other" has acknowledged nothing
            await broker.kick(message(b"m10"))
        read = client.xreadgroup("other", "c", {queue: ">"}, count=4)[0][1]
        client.xack(queue, "other", *[eid for eid, _ in read])
        await broker.kick(message(b"m10"))  # m0..m3 acknowledged by both groups: trimmed
        kept = [f[b"data"] for _, f in client.xrange(queue)]
        assert kept == [f"m{i}".encode() for i in range(4, 11)]
        pending = client.xpending(queue, "theirs")
        assert pending["pending"] == 0 and len(kept) == 7
    finally:
        client.close()
        await broker.shutdown()


def test_constructor_checks_its_arguments() -> None:
    for name in ("idle_timeout", "xread_block", "max_deliveries", "maxlen", "xread_count"):
        bad: dict[str, Any] = {name: 0}
        with pytest.raises(ValueError, match=name):
            RedisStreamBroker(REDIS_URL, **bad)


async def test_kick_to_unreachable_redis_fails_quickly() -> None:
    broker = RedisStreamBroker(UNREACHABLE_URL)

    @broker.task
    async def job() -> None: ...

    started = time.monotonic()
    with pytest.raises(RedisSendTaskError, match=r"127\.0\.0\.1:1"):
        await broker.kick(message(b"x"))
    with pytest.raises(SendTaskError) as caught:
        await job.kiq()
    assert "127.0.0.1:1" in why(caught.value)
    assert time.monotonic() - started < 5
    await broker.shutdown()


async def test_check_connection() -> None:
    secret = "hunter2"
    bad = RedisStreamBroker(f"redis://:{secret}@127.0.0.1:1/0")
    with pytest.raises(SendTaskError) as caught:
        await bad.check_connection()
    assert isinstance(caught.value, BrokerError)
    assert "127.0.0.1:1" in str(caught.value) and "unreachable" in str(caught.value)
    assert secret not in str(caught.value)
    await bad.shutdown()


async def test_check_connection_ok(space: RedisSpace) -> None:
    broker = RedisStreamBroker(space.url, queue_name=space.name("q"))
    try:
        await broker.check_connection()
    finally:
        await broker.shutdown()


async def test_forked_child_leaves_the_parents_connections_alone(space: RedisSpace) -> None:
    """A worker forked while the parent listens gets its own connections; the parent's keep
    working (dropping inherited ones could unregister them from the shared epoll)."""
    broker = make_broker(space, xread_block=200)
    backend = broker.result_backend
    assert isinstance(backend, RedisResultBackend)
    waiter = asyncio.create_task(backend.wait_ready("from-child", timeout=20))

    def child(index: int) -> str:
        import gc

        asyncio.events._set_running_loop(None)  # as a forked pool worker does

        async def main() -> None:
            for i in range(3):
                await broker.kick(message(f"child {i}".encode()))
            gc.collect()  # what was dropped from the parent is finalized now, in a running loop
            await backend.set_result("from-child", result_of("hi"))
            await broker.shutdown()

        asyncio.run(main())
        return "ok"

    try:
        async with Collector(broker) as collector:
            await broker.kick(message(b"parent"))
            _, got = await collector.get()
            await ack(got)
            loop = asyncio.get_running_loop()
            assert await loop.run_in_executor(None, run_processes, child, 1) == ["ok"]
            for _ in range(3):
                _, got = await collector.get(timeout=10)
                assert got.data.startswith(b"child")
                await ack(got)
            await asyncio.wait_for(waiter, 10)
            assert (await backend.get_result("from-child")).return_value == "hi"
    finally:
        waiter.cancel()
        await broker.shutdown()


async def test_listen_survives_a_redis_restart(caplog: pytest.LogCaptureFixture) -> None:
    server = PrivateRedis()
    server.start()
    caplog.set_level(logging.WARNING, logger="pool.redis")
    broker = RedisStreamBroker(server.url, queue_name="q", xread_block=200)
    try:
        async with Collector(broker) as collector:
            await broker.kick(message(b"before"))
            _, got = await collector.get()
            assert got.data == b"before"
            await ack(got)

            server.stop()  # no persistence: the stream and the group are gone
            await until(lambda: "lost the connection" in caplog.text, 10, "Redis going away")
            server.start()

            await broker.kick(message(b"after"))
            _, got = await collector.get(timeout=20)
            assert got.data == b"after"
            await ack(got)
            assert collector.task is not None and not collector.task.done()
        assert "is back" in caplog.text
    finally:
        await broker.shutdown()
        server.close()


# --------------------------------------------------------------------------- results
async def test_result_set_get_and_ttl(space: RedisSpace) -> None:
    prefix = space.name("r")
    backend: RedisResultBackend[Any] = RedisResultBackend(
        space.url, result_ex_time=60, prefix_str=prefix
    )
    client = sync_client()
    try:
        tid = uuid.uuid4().hex
        assert not await backend.is_result_ready(tid)
        await backend.set_result(tid, result_of({"a": [1, 2]}, labels={"x": 1}, log="output"))
        assert await backend.is_result_ready(tid)
        got = await backend.get_result(tid)
        assert got.return_value == {"a": [1, 2]} and got.labels == {"x": 1}
        assert got.execution_time == 0.5 and not got.is_err and got.log is None
        assert (await backend.get_result(tid, with_logs=True)).log == "output"
        assert 0 < client.ttl(f"{prefix}:{tid}") <= 60
        assert json.loads(client.get(f"{prefix}:{tid}"))["return_value"] == {"a": [1, 2]}

        px: RedisResultBackend[Any] = RedisResultBackend(
            space.url, result_px_time=5000, prefix_str=prefix
        )
        await px.set_result("px", result_of(1))
        assert 0 < client.pttl(f"{prefix}:px") <= 5000
        await px.set_progress("px", TaskProgress(state=TaskState.STARTED, meta=None))
        assert 0 < client.pttl(f"{prefix}:px__progress") <= 5000
        await px.shutdown()
    finally:
        client.close()
        await backend.shutdown()


async def test_result_errors(space: RedisSpace) -> None:
    prefix = space.name("r")
    backend: RedisResultBackend[Any] = RedisResultBackend(space.url, prefix_str=prefix)
    client = sync_client()
    try:
        with pytest.raises(ResultGetError):
            await backend.get_result("missing")
        started = time.monotonic()
        with pytest.raises(TaskiqResultTimeoutError) as caught:
            await backend.wait_ready("missing", timeout=0.3)
        assert caught.value.timeout == 0.3
        assert time.monotonic() - started < 2
        with pytest.raises(ResultSetError, match="cannot be serialized"):
            await backend.set_result("set", result_of(object()))
        # a pickle planted in Redis is refused, never unpickled
        client.set(f"{prefix}:planted", pickle.dumps({"is_err": False}))
        with pytest.raises(ResultGetError, match="cannot be decoded"):
            await backend.get_result("planted")
    finally:
        client.close()
        await backend.shutdown()
    with pytest.raises(ValueError):
        RedisResultBackend(space.url, result_ex_time=1, result_px_time=1)
    with pytest.raises(ValueError):
        RedisResultBackend(space.url, result_ex_time=0)


async def test_no_prefix_keys_results_by_task_id_as_taskiq_redis_does(space: RedisSpace) -> None:
    backend: RedisResultBackend[Any] = RedisResultBackend(space.url, prefix_str=None)
    tid = space.name("bare")  # the task id itself starts with this test's prefix
    try:
        await backend.set_result(tid, result_of(1))
        assert space.client().exists(tid)
        assert (await backend.get_result(tid)).return_value == 1
    finally:
        await backend.shutdown()


async def test_wait_ready_is_woken_by_pubsub(space: RedisSpace) -> None:
    prefix = space.name("r")
    waiter: RedisResultBackend[Any] = RedisResultBackend(space.url, prefix_str=prefix)
    waiter.recheck_interval = 5.0
    setter: RedisResultBackend[Any] = RedisResultBackend(space.url, prefix_str=prefix)
    tid = uuid.uuid4().hex
    try:
        task = asyncio.create_task(waiter.wait_ready(tid, timeout=20))
        await until(lambda: subscribed(waiter, tid), 10, "the waiter subscribed")
        saved = time.monotonic()
        await setter.set_result(tid, result_of("done"))
        await asyncio.wait_for(task, 10)
        assert time.monotonic() - saved < 1.0, "woken by the 5 s re-check, not the notification"
        assert (await waiter.get_result(tid)).return_value == "done"

        # a result saved before the wait starts is seen at once
        await setter.set_result("early", result_of(1))
        started = time.monotonic()
        await waiter.wait_ready("early", timeout=5)
        assert time.monotonic() - started < 1.0
    finally:
        await waiter.shutdown()
        await setter.shutdown()


def subscribed(backend: RedisResultBackend[Any], *task_ids: str) -> bool:
    """The backend's subscription is confirmed, its first checks done, and each task awaited."""
    notifier = backend._notifier
    return (
        notifier is not None
        and notifier.subscribed.is_set()
        and not notifier.to_check
        and all(task_id in notifier.waiters for task_id in task_ids)
    )


async def test_a_small_result_reaches_its_waiting_handle_inside_the_notification(
    space: RedisSpace,
) -> None:
    prefix = space.name("inline")
    producer: RedisResultBackend[Any] = RedisResultBackend(space.url, prefix_str=prefix)
    worker: RedisResultBackend[Any] = RedisResultBackend(space.url, prefix_str=prefix)
    reads = 0
    original = producer._read

    async def counted(task_id: str) -> bytes | None:
        nonlocal reads
        reads += 1
        return await original(task_id)

    producer._read = counted  # type: ignore[method-assign]
    try:
        handle: PoolTask[Any] = PoolTask("t-inline", producer)
        waiting = asyncio.create_task(handle.wait_result(timeout=10))
        await until(
            lambda: (
                producer._notifier is not None
                and producer._notifier.subscribed.is_set()
                and "t-inline" in producer._notifier.waiters
            ),
            10,
            "the handle waiting",
        )
        await worker.set_result(
            "t-inline", TaskiqResult(is_err=False, return_value=42, execution_time=0)
        )
        result = await asyncio.wait_for(waiting, 10)
        assert result.return_value == 42
        assert reads == 0, "the result was read from Redis, not from the notification"
    finally:
        await producer.shutdown()
        await worker.shutdown()


def counting_connection() -> tuple[type[Any], list[int]]:
    """A redis-py connection class that counts the commands it sends (pipelined ones too)."""
    import redis.asyncio

    sent = [0]

    class Counting(redis.asyncio.Connection):
        def pack_command(self, *args: Any) -> list[bytes]:
            sent[0] += 1
            return super().pack_command(*args)

    return Counting, sent


async def test_waiting_producers_are_woken_by_notification_not_by_polling(
    space: RedisSpace,
) -> None:
    from taskiq import AsyncTaskiqTask

    prefix = space.name("r")
    counting, sent = counting_connection()
    waiter: RedisResultBackend[Any] = RedisResultBackend(
        space.url, prefix_str=prefix, connection_class=counting
    )
    setter: RedisResultBackend[Any] = RedisResultBackend(space.url, prefix_str=prefix)
    n = 100
    # taskiq's own handle (AsyncKicker.kiq) polls is_result_ready every 0.2 s; pool's waits
    handles: list[AsyncTaskiqTask[Any]] = [AsyncTaskiqTask(f"plain-{i}", waiter) for i in range(n)]
    handles += [PoolTask(f"pushed-{i}", waiter) for i in range(n)]
    try:
        waits = [asyncio.create_task(h.wait_result(timeout=30)) for h in handles]
        pushed = [h.task_id for h in handles[n:]]
        await until(lambda: subscribed(waiter, *pushed), 10, "the waiters subscribed")
        notifier = waiter._notifier
        assert notifier is not None
        await until(lambda: len(notifier.missing) == n, 10, "the plain handles' first check")
        before = sent[0]
        await asyncio.sleep(2.0)  # the window in which commands are counted
        assert sent[0] - before == 0, f"{sent[0] - before} commands from {2 * n} idle waiters"
        for handle in handles:
            await setter.set_result(handle.task_id, result_of(handle.task_id))
        results = await asyncio.wait_for(asyncio.gather(*waits), 10)
        assert [r.return_value for r in results] == [h.task_id for h in handles]
    finally:
        await waiter.shutdown()
        await setter.shutdown()


async def test_a_result_saved_without_a_notification_is_found_by_the_fallback_check(
    space: RedisSpace,
) -> None:
    """taskiq-redis's backend saves results without publishing: the batched re-check finds
    them."""
    prefix = space.name("r")
    waiter: RedisResultBackend[Any] = RedisResultBackend(space.url, prefix_str=prefix)
    waiter.recheck_interval = 0.5
    client = sync_client()
    try:
        waiting = asyncio.create_task(PoolTask("silent", waiter).wait_result(timeout=20))
        await until(lambda: subscribed(waiter, "silent"), 10, "the waiter subscribed")
        client.set(waiter.result_key("silent"), waiter._dump("silent", "result", result_of(5)))
        assert (await asyncio.wait_for(waiting, 10)).return_value == 5
    finally:
        client.close()
        await waiter.shutdown()


async def test_more_concurrent_commands_than_connections_wait_for_one(space: RedisSpace) -> None:
    """redis-py fails a command with "Too many connections" when its pool is exhausted; pool's
    clients wait for a free connection instead."""
    backend: RedisResultBackend[Any] = RedisResultBackend(
        space.url, prefix_str=space.name("r"), max_connection_pool_size=2
    )
    try:
        await backend.set_result("t", result_of(1))
        results = await asyncio.gather(*(backend.get_result("t") for _ in range(200)))
        assert [r.return_value for r in results] == [1] * 200
    finally:
        await backend.shutdown()


async def test_keep_results_false_deletes_after_get(space: RedisSpace) -> None:
    backend: RedisResultBackend[Any] = RedisResultBackend(
        space.url, keep_results=False, prefix_str=space.name("r")
    )
    try:
        await backend.set_result("t", result_of(7))
        await backend.set_progress("t", TaskProgress(state=TaskState.SUCCESS, meta=None))
        handle: PoolTask[Any] = PoolTask("t", backend)
        assert (await handle.wait_result(timeout=5)).return_value == 7
        assert not await backend.is_result_ready("t")
        assert await backend.get_progress("t") is None
        with pytest.raises(ResultGetError):
            await backend.get_result("t")
    finally:
        await backend.shutdown()


async def test_progress(space: RedisSpace) -> None:
    backend: RedisResultBackend[Any] = RedisResultBackend(space.url, prefix_str=space.name("r"))
    try:
        assert await backend.get_progress("t") is None
        await backend.set_progress("t", TaskProgress(state="running", meta={"done": 3}))
        progress = await backend.get_progress("t")
        assert isinstance(progress, TaskProgress)
        assert progress.state == "running" and progress.meta == {"done": 3}
    finally:
        await backend.shutdown()


async def test_result_waiters_survive_a_redis_restart() -> None:
    server = PrivateRedis()
    server.start()
    waiter: RedisResultBackend[Any] = RedisResultBackend(server.url, prefix_str="r")
    waiter.recheck_interval = 5.0
    setter: RedisResultBackend[Any] = RedisResultBackend(server.url, prefix_str="r")
    try:
        task = asyncio.create_task(waiter.wait_ready("t", timeout=30))

        def subscribed() -> bool:
            return waiter._notifier is not None and waiter._notifier.subscribed.is_set()

        await until(subscribed, 10, "the subscription")
        server.stop()
        await until(lambda: not subscribed(), 10, "the subscription loss noticed")
        server.start()
        await until(subscribed, 20, "subscribed again")
        await setter.set_result("t", result_of("after restart"))
        await asyncio.wait_for(task, 10)
        assert (await waiter.get_result("t")).return_value == "after restart"
    finally:
        await waiter.shutdown()
        await setter.shutdown()
        server.close()


# --------------------------------------------------------------------------- state
def make_state(space: RedisSpace, name: str = "s", **kwargs: Any) -> RedisState:
    return RedisState(space.url, prefix=space.name(name), **kwargs)


def test_state_api(space: RedisSpace) -> None:
    state = make_state(space)
    other = make_state(space)  # another client of the same state
    assert isinstance(state, TaskiqState) and state.shared
    state.set_value("a", {"x": [1, 2]})
    assert other.get_value("a") == {"x": [1, 2]} and other.is_shared("a")
    assert state.get_value("missing") is None and state.get_value("missing", 5) == 5
    state.delete_value("missing")  # not an error
    state["b"] = 2
    state.c = "three"
    assert other["b"] == 2 and other.c == "three"
    assert "b" in other and "zzz" not in other
    assert sorted(other.keys()) == ["a", "b", "c"] and len(other) == 3
    assert sorted(other.values(), key=repr) == sorted([{"x": [1, 2]}, 2, "three"], key=repr)
    assert dict(other.items()) == {"a": {"x": [1, 2]}, "b": 2, "c": "three"}
    with pytest.raises(KeyError):
        other["zzz"]
    with pytest.raises(AttributeError):
        _ = other.zzz
    del other.c
    del other["b"]
    assert state.keys() == ["a"]
    with pytest.raises(TypeError):
        state.set_value(1, "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        state.get_value(b"a")  # type: ignore[arg-type]
    # types JSON carries exactly come back exactly; tuples come back as lists
    for value in (1, 1.5, True, None, "é", [1, "a"], {"k": {"n": None}}, 2**70):
        state.set_value("v", value)
        assert other.get_value("v") == value and type(other.get_value("v")) is type(value)
    state.set_value("t", (1, 2))
    assert other.get_value("t") == [1, 2]
    # stored as JSON text
    client = sync_client()
    try:
        assert client.get(f"{space.name('s')}:v:a") == b'{"x":[1,2]}'
    finally:
        client.close()
    state.clear()
    assert other.keys() == [] and len(other) == 0


def test_state_values_json_cannot_carry_stay_local(space: RedisSpace) -> None:
    state = make_state(space)
    other = make_state(space)
    lock = threading.Lock()
    state.db = lock
    state.set_value("a set", {1, 2})
    state.set_value("int keys", {1: "a"})
    state.set_value("bytes", b"raw")
    state.set_value("shared", 1)
    for key in ("db", "a set", "int keys", "bytes"):
        assert key in state and not state.is_shared(key)
        assert key not in other
    assert state.db is lock
    assert state.is_shared("shared")
    assert sorted(state.keys()) == ["a set", "bytes", "db", "int keys", "shared"]
    assert other.keys() == ["shared"]


def test_state_clear_and_keys_stay_in_their_prefix(space: RedisSpace) -> None:
    globby = make_state(space, "s*")  # glob characters in the prefix are matched literally
    neighbour = make_state(space, "sx")
    globby.set_value("mine", 1)
    neighbour.set_value("theirs", 2)
    assert globby.keys() == ["mine"]
    globby.clear()
    assert neighbour.get_value("theirs") == 2 and globby.keys() == []


def test_state_incr(space: RedisSpace) -> None:
    state = make_state(space)
    assert state.incr("n") == 1
    assert state.incr("n", 41) == 42
    assert state.incr("n", -2) == 40 and type(state.get_value("n")) is int
    assert state.incr("f", 0.1) == 0.1
    assert state.incr("f", 0.2) == 0.1 + 0.2
    state.set_value("g", 1.0)
    assert state.incr("g") == 2.0 and type(state.get_value("g")) is float
    state.set_value("s", "5")
    with pytest.raises(TypeError, match="'s'"):
        state.incr("s")
    state.set_value("l", [1])
    with pytest.raises(TypeError, match="'l'"):
        state.incr("l")
    with pytest.raises(TypeError):
        state.incr("n", "1")  # type: ignore[arg-type]
    state.set_value("big", 2**63 - 1)
    with pytest.raises(OverflowError, match="'big'"):
        state.incr("big")


def _incr_worker(index: int, state: RedisState) -> int:
    for _ in range(500):
        state.incr("counter")
    return index


def test_state_incr_is_exact_across_processes(space: RedisSpace) -> None:
    state = make_state(space)
    state.set_value("counter", 0)  # the parent's connections exist before the fork
    assert state.get_value("counter") == 0
    run_processes(_incr_worker, 4, state)
    assert state.get_value("counter") == 2000


def _update_worker(index: int, state: RedisState) -> int:
    calls = 0

    def bump(old: int) -> int:
        nonlocal calls
        calls += 1
        return old + 1

    for _ in range(500):
        state.update("counter", bump, 0)
    return calls


def test_state_update_runs_fn_once_and_is_exact_across_processes(space: RedisSpace) -> None:
    state = make_state(space)
    assert state.update("counter", lambda old: old, 0) == 0
    calls = run_processes(_update_worker, 4, state)
    assert calls == [500, 500, 500, 500]
    assert state.get_value("counter") == 2000


def test_state_update_semantics(space: RedisSpace) -> None:
    state = make_state(space)
    assert state.update("xs", lambda old: [*old, 1], []) == [1]
    assert state.update("xs", lambda old: [*old, 2]) == [1, 2]

    def boom(old: Any) -> Any:
        raise RuntimeError("fn failed")

    with pytest.raises(RuntimeError, match="fn failed"):
        state.update("xs", boom)
    with pytest.raises(TypeError, match="'xs'"):
        state.update("xs", lambda old: {1, 2})  # a set cannot be stored as JSON
    # unchanged, and the update lock was released: the next update does not wait
    started = time.monotonic()
    assert state.update("xs", lambda old: [*old, 3]) == [1, 2, 3]
    assert time.monotonic() - started < 1


def test_state_update_holds_off_other_writers(space: RedisSpace) -> None:
    state = make_state(space)
    other = make_state(space)
    inside, release = threading.Event(), threading.Event()

    def slow(old: Any) -> str:
        inside.set()
        assert release.wait(10)
        return "from update"

    updater = threading.Thread(target=state.update, args=("k", slow, None))
    updater.start()
    assert inside.wait(10)
    writer = threading.Thread(target=other.set_value, args=("k", "from set"))
    writer.start()
    writer.join(timeout=0.3)
    assert writer.is_alive(), "set_value went through while an update of the key ran"
    release.set()
    updater.join(timeout=10)
    writer.join(timeout=10)
    assert not updater.is_alive() and not writer.is_alive()
    assert state.get_value("k") == "from set"  # the set is ordered after the update


def _setdefault_worker(index: int, state: RedisState, barrier: Any) -> tuple[int, Any]:
    barrier.wait(timeout=20)
    return os.getpid(), state.setdefault("winner", os.getpid())


def test_state_setdefault_has_a_single_winner(space: RedisSpace) -> None:
    state = make_state(space)
    barrier = multiprocessing.get_context("fork").Barrier(6)
    results = run_processes(_setdefault_worker, 6, state, barrier)
    pids = {pid for pid, _ in results}
    values = {value for _, value in results}
    assert len(values) == 1 and values <= pids
    assert state.get_value("winner") in pids
    assert state.setdefault("winner", -1) == state.get_value("winner")


def _lock_worker(index: int, state: RedisState) -> int:
    for _ in range(25):
        with state.lock("L"):
            if state.incr("inside") != 1:
                state.incr("violations")
            value = state.get_value("counter", 0)
            time.sleep(0.001)
            state.set_value("counter", value + 1)
            state.incr("inside", -1)
    return index


def test_state_lock_is_exclusive_across_processes(space: RedisSpace) -> None:
    state = make_state(space)
    run_processes(_lock_worker, 4, state)
    assert state.get_value("counter") == 100
    assert state.get_value("violations", 0) == 0


async def test_state_lock_async(space: RedisSpace) -> None:
    state = make_state(space)
    async with state.lock("A"):
        assert not state.lock("A").acquire(blocking=False)
    assert state.lock("A").acquire(blocking=False)


def test_state_lock_expires(space: RedisSpace) -> None:
    state = make_state(space, lock_timeout=0.5)
    holder = state.lock("L")
    assert holder.acquire()  # and never released in time: as if its process died
    waiter = state.lock("L")
    assert not waiter.acquire(blocking=False)
    started = time.monotonic()
    assert waiter.acquire(timeout=10)
    assert 0.3 <= time.monotonic() - started < 5
    holder.release()  # too late: logged, and does not free the new holder's lock
    assert not state.lock("L").acquire(blocking=False)
    waiter.release()


def test_state_dill_is_an_explicit_opt_in(space: RedisSpace) -> None:
    dill_state = make_state(space, serializer="dill")
    dill_other = make_state(space, serializer="dill")
    json_state = make_state(space)
    dill_state.set_value("s", {1, 2})
    dill_state.set_value("t", (1, 2))
    assert dill_state.is_shared("s")
    assert dill_other.get_value("s") == {1, 2} and dill_other.get_value("t") == (1, 2)
    with pytest.raises(ValueError, match="does not unpickle"):
        json_state.get_value("s")
    # numbers stay JSON, readable by both and incremented by Redis
    dill_state.set_value("n", 1)
    assert json_state.incr("n") == 2 and dill_other.get_value("n") == 2
    assert dill_state.update("t", lambda old: (*old, 3)) == (1, 2, 3)
    with pytest.raises(ValueError):
        make_state(space, serializer="pickle")


def test_state_works_in_a_forked_child_after_use_in_the_parent(space: RedisSpace) -> None:
    state = make_state(space)
    state.set_value("k", "parent")

    def child(index: int, state: RedisState) -> Any:
        value = state.get_value("k")
        state.set_value(f"child{index}", index)
        return value

    assert run_processes(child, 2, state) == ["parent", "parent"]
    assert state.get_value("k") == "parent"  # the parent's connection still works
    assert sorted(k for k in state if k.startswith("child")) == ["child0", "child1"]


def test_wait_for_helper_is_bounded() -> None:
    with pytest.raises(AssertionError):
        wait_for(lambda: False, timeout=0.05, what="nothing")


# --------------------------------------------------------------------------- batching
async def test_results_saved_at_once_share_one_call_and_one_notification(
    space: RedisSpace,
) -> None:
    prefix = space.name("r")
    counting, sent = counting_connection()
    waiter: RedisResultBackend[Any] = RedisResultBackend(space.url, prefix_str=prefix)
    setter: RedisResultBackend[Any] = RedisResultBackend(
        space.url, prefix_str=prefix, connection_class=counting
    )
    n = 50
    handles = [PoolTask(f"t-{i}", waiter) for i in range(n)]
    try:
        waits = [asyncio.create_task(h.wait_result(timeout=20)) for h in handles]
        await until(lambda: subscribed(waiter, *(h.task_id for h in handles)), 10, "waiters")
        await asyncio.gather(*(setter.set_result(h.task_id, result_of(h.task_id)) for h in handles))
        assert sent[0] < 10, f"{sent[0]} commands for {n} results saved at once"
        results = await asyncio.wait_for(asyncio.gather(*waits), 10)
        assert [r.return_value for r in results] == [h.task_id for h in handles]
    finally:
        await waiter.shutdown()
        await setter.shutdown()


async def test_a_notification_of_an_older_pool_is_understood(space: RedisSpace) -> None:
    prefix = space.name("r")
    waiter: RedisResultBackend[Any] = RedisResultBackend(space.url, prefix_str=prefix)
    client = sync_client()
    try:
        inline = asyncio.create_task(PoolTask("old-inline", waiter).wait_result(timeout=20))
        bare = asyncio.create_task(PoolTask("old-bare", waiter).wait_result(timeout=20))
        await until(lambda: subscribed(waiter, "old-inline", "old-bare"), 10, "the waiters")
        blob = waiter._dump("x", "result", result_of("inline"))
        client.publish(waiter.channel, b"old-inline\x00" + blob)  # not stored: only announced
        client.set(waiter.result_key("old-bare"), waiter._dump("x", "result", result_of("bare")))
        client.publish(waiter.channel, b"old-bare")
        assert (await asyncio.wait_for(inline, 10)).return_value == "inline"
        assert (await asyncio.wait_for(bare, 10)).return_value == "bare"
    finally:
        client.close()
        await waiter.shutdown()


@pytest.mark.parametrize("task_id", ["rides", 'ri"d\\és'], ids=["plain id", "escaped id"])
async def test_a_saved_result_acknowledges_its_message_in_the_same_call(
    space: RedisSpace, task_id: str
) -> None:
    """With the result backend on the broker's Redis, the script that saves a task's result
    acknowledges its stream entry too; the receiver's acknowledgement then sends nothing.
    The broker reads the id off the start of taskiq's JSON, or parses a message whose id
    JSON escapes."""
    broker = make_broker(space)
    backend = broker.result_backend
    assert isinstance(backend, RedisResultBackend)
    gen = broker.listen()
    try:
        await broker.kick(message(broker.formatter.dumps(
            TaskiqMessage(task_id=task_id, task_name="t", labels={}, args=[], kwargs={})
        ).message, task_id=task_id))  # fmt: skip
        raw = await next_message(gen)
        assert pending_count(broker.queue_name, broker.consumer_group_name) == 1
        await backend.set_result(task_id, result_of(1))
        assert pending_count(broker.queue_name, broker.consumer_group_name) == 0
        assert stream_len(broker.queue_name) == 0
        await ack(raw)  # nothing left to do
        assert (await backend.get_result(task_id)).return_value == 1
    finally:
        await gen.aclose()
        await broker.shutdown()


async def test_a_result_that_cannot_be_saved_leaves_its_message_pending(
    space: RedisSpace,
) -> None:
    broker = make_broker(space)
    backend = broker.result_backend
    assert isinstance(backend, RedisResultBackend)
    backend.save_timeout = 0.0
    gen = broker.listen()
    try:
        await broker.kick(message(broker.formatter.dumps(
            TaskiqMessage(task_id="unsaved", task_name="t", labels={}, args=[], kwargs={})
        ).message, task_id="unsaved"))  # fmt: skip
        await next_message(gen)

        async def broken(saves: list[Any]) -> None:
            raise redis.exceptions.ConnectionError("Redis went away")

        backend._save_batch = broken  # type: ignore[method-assign]
        with pytest.raises(ResultSetError):
            await backend.set_result("unsaved", result_of(1))
        assert pending_count(broker.queue_name, broker.consumer_group_name) == 1
    finally:
        await gen.aclose()
        await broker.shutdown()
