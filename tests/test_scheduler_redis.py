"""Schedules in Redis and several schedulers at once, against a real Redis.

As in ``test_scheduler``, runs are driven through ``on_ready`` (what taskiq's loop calls for a
due schedule) with a made-up clock; the CLI tests run taskiq's real loop in two processes.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from taskiq import ScheduledTask
from taskiq.exceptions import ScheduledTaskCancelledError, SendTaskError

from pool.extensions.scheduler import InMemoryScheduleSource
from tests.redis_support import REDIS_URL, UNREACHABLE_URL, RedisSpace, redis_space, wait_for
from tests.test_scheduler import Clock, Node, at, lines, schedule, scheduler_process, stop
from tests.test_scheduler import procs as procs

pytest.importorskip("redis")

from pool.redis import RedisRunClaim, RedisScheduleSource

pytestmark = pytest.mark.timeout(30)

UTC = timezone.utc


@pytest.fixture
def space() -> Iterator[RedisSpace]:
    yield from redis_space()


@pytest.fixture
def rc(space: RedisSpace) -> Iterator[Any]:
    """A synchronous client, to look at what the code under test left in Redis."""
    client = space.client()
    yield client
    client.close()


@pytest.fixture
async def nodes(space: RedisSpace) -> Any:
    """A factory of nodes sharing one list of calls and one clock; all shut down at the end."""
    made: list[Node] = []
    calls: list[tuple[str, Any]] = []
    clock = Clock()

    async def make(name: str, sources: list[Any] | None = None, **kwargs: Any) -> Node:
        if sources is None:
            sources = [RedisScheduleSource(REDIS_URL, prefix=space.name("schedules"))]
        node = Node(name, sources, calls, clock=clock, **kwargs)
        await node.scheduler.startup()
        made.append(node)
        return node

    yield SimpleNamespace(make=make, calls=calls, clock=clock)
    for node in made:
        await node.scheduler.shutdown()
        for source in node.scheduler.sources:
            await source.shutdown()


# ------------------------------------------------------------------ the source
async def test_source_stores_taskiq_schedules_as_json_in_one_hash(
    space: RedisSpace, rc: Any
) -> None:
    key = space.name("schedules")
    source = RedisScheduleSource(REDIS_URL, prefix=key)
    tasks = [
        schedule("a", 1, "x", cron="0 1 * * *", cron_offset=timedelta(hours=-5)),
        ScheduledTask(
            task_name="b",
            labels={"p": 2},
            args=[],
            kwargs={},
            cron="30 8 * * 1-5",
            cron_offset="Europe/Paris",
        ),
        ScheduledTask(task_name="c", labels={}, args=[], kwargs={"k": [1, 2]}, time=at(12, 0)),
        schedule("d", interval=timedelta(seconds=120), task_id="fixed"),
    ]
    for task in tasks:
        await source.add_schedule(task)
    got = {s.schedule_id: s for s in await source.get_schedules()}
    assert got == {t.schedule_id: t for t in tasks}
    assert rc.type(key) == b"hash"
    stored = rc.hgetall(key)
    for task in tasks:
        assert json.loads(stored[task.schedule_id.encode()]) == task.model_dump(mode="json")

    await source.delete_schedule(tasks[0].schedule_id)
    await source.delete_schedule("no-such-id")  # not an error
    assert {s.schedule_id for s in await source.get_schedules()} == {
        t.schedule_id for t in tasks[1:]
    }
    with pytest.raises(ValueError, match="cannot store"):
        await source.add_schedule(schedule("e", object(), interval=5))
    await source.shutdown()


async def test_unreadable_entries_are_skipped_never_unpickled(
    space: RedisSpace, rc: Any, caplog: pytest.LogCaptureFixture
) -> None:
    class Boom:
        def __reduce__(self) -> Any:
            return (os.system, ("echo unpickled",))

    key = space.name("schedules")
    source = RedisScheduleSource(REDIS_URL, prefix=key)
    good = schedule("ok", interval=5)
    await source.add_schedule(good)
    rc.hset(key, "pickled", pickle.dumps(Boom()))
    rc.hset(key, "not-json", b"{nope")
    rc.hset(key, "no-when", json.dumps({"task_name": "x", "labels": {}, "args": [], "kwargs": {}}))
    rc.hset(key, "a-list", json.dumps([1, 2]))
    with caplog.at_level(logging.ERROR, logger="pool.redis"):
        assert await source.get_schedules() == [good]
        assert await source.get_schedules() == [good]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 4  # each bad entry is reported once, not at every read
    assert any("no-when" in m for m in errors)
    await source.shutdown()


async def test_taskiqs_schedule_api_stores_in_redis_and_unschedules(
    space: RedisSpace, rc: Any, nodes: Any
) -> None:
    node = await nodes.make("n")
    key = space.name("schedules")
    kicker = node.record.kicker()
    cron = await kicker.schedule_by_cron(node.source, "*/5 * * * *", "cron")
    once = await node.record.kicker().schedule_by_time(node.source, at(12, 0), "once")
    assert rc.hexists(key, cron.schedule_id) and rc.hexists(key, once.schedule_id)
    # another process, reading the same hash, sees them
    other = RedisScheduleSource(REDIS_URL, prefix=key)
    assert {s.schedule_id for s in await other.get_schedules()} == {
        cron.schedule_id,
        once.schedule_id,
    }
    nodes.clock.now = at(12, 0, 1)
    assert await node.fire(once.task)
    assert not rc.hexists(key, once.schedule_id)  # a one-shot is deleted once sent
    await cron.unschedule()
    assert await other.get_schedules() == []
    await other.shutdown()
    assert nodes.calls == [("n", "once")]


# ------------------------------------------------------------------ two schedulers
async def test_the_claim_of_a_redis_source_is_used_by_default(
    space: RedisSpace, rc: Any, nodes: Any
) -> None:
    a = await nodes.make("a")
    b = await nodes.make("b")
    assert a.scheduler.run_claims is not None and b.scheduler.run_claims is not None
    claim = a.scheduler.run_claims.claim
    assert isinstance(claim, RedisRunClaim) and claim is not b.scheduler.run_claims.claim
    assert claim.prefix == space.name("schedules") + ":claims"
    created = await a.record.kicker().schedule_by_cron(a.source, "0 9 * * *", "p")
    nodes.clock.now = at(9, 0, 1)
    assert await b.fire()
    nodes.clock.now = at(9, 0, 2)
    assert not await a.fire()
    claim_key = space.name(f"schedules:claims:{created.schedule_id}:2030-01-01T09:00+00:00")
    assert 86_000_000 < rc.pttl(claim_key) <= 86_400_000  # kept for a day
    assert nodes.calls == [("b", "p")]


async def test_two_schedulers_send_a_cron_minute_once(space: RedisSpace, nodes: Any) -> None:
    claims = space.name("claims")
    task = schedule("record", "tick", cron="* * * * *")
    a = await nodes.make(
        "a", [InMemoryScheduleSource([task])], claim=RedisRunClaim(REDIS_URL, claims)
    )
    b = await nodes.make(
        "b", [InMemoryScheduleSource([task])], claim=RedisRunClaim(REDIS_URL, claims)
    )
    for minute in range(5):
        first, second = (a, b) if minute % 2 == 0 else (b, a)
        nodes.clock.now = at(10, minute, minute)
        assert await first.fire()
        nodes.clock.now = at(10, minute, 30)
        assert not await second.fire()
    assert len(nodes.calls) == 5 and {n for n, _ in nodes.calls} == {"a", "b"}


async def test_an_interval_claim_lasts_most_of_the_interval(
    space: RedisSpace, rc: Any, nodes: Any
) -> None:
    claims = space.name("claims")
    task = schedule("record", interval=10)
    a = await nodes.make(
        "a", [InMemoryScheduleSource([task])], claim=RedisRunClaim(REDIS_URL, claims)
    )
    b = await nodes.make(
        "b", [InMemoryScheduleSource([task])], claim=RedisRunClaim(REDIS_URL, claims)
    )
    assert await a.fire()
    assert not await b.fire()
    assert 8_000 < rc.pttl(f"{claims}:{task.schedule_id}:interval") <= 9_000  # 0.9 * 10 s


class StaleRedisSource(RedisScheduleSource):
    """Returns a snapshot taken earlier: it has not seen another scheduler's deletion yet."""

    frozen: list[ScheduledTask] | None = None

    async def get_schedules(self) -> list[ScheduledTask]:
        if self.frozen is not None:
            return list(self.frozen)
        return await super().get_schedules()


@pytest.mark.parametrize("claim", [None, False])
async def test_a_one_shot_fires_once_across_two_schedulers(
    space: RedisSpace, rc: Any, nodes: Any, claim: Any
) -> None:
    prefix = space.name("schedules")
    a = await nodes.make("a", claim=claim)
    b = await nodes.make("b", [StaleRedisSource(REDIS_URL, prefix=prefix)], claim=claim)
    created = await a.record.kicker().schedule_by_time(a.source, at(12, 0), "once")
    b.source.frozen = await b.source.get_schedules()  # b read the hash before a sent it
    nodes.clock.now = at(12, 0, 1)
    assert await a.fire()
    assert not rc.hexists(prefix, created.schedule_id)
    nodes.clock.now = at(12, 0, 2)
    await b.fire()
    if claim is None:
        assert nodes.calls == [("a", "once")]
    else:  # the control: without claims b sends it again
        assert nodes.calls == [("a", "once"), ("b", "once")]


async def test_a_failed_send_releases_the_claim(space: RedisSpace, rc: Any, nodes: Any) -> None:
    """A scheduler that cannot send a claimed run lets the other one (or itself) retry."""
    a = await nodes.make("a", register=False)  # "record" is unknown here: kiq fails
    b = await nodes.make("b")
    created = await b.record.kicker().schedule_by_cron(b.source, "* * * * *", "r")
    nodes.clock.now = at(10, 0, 1)
    with pytest.raises(SendTaskError):
        await a.fire()
    key = space.name(f"schedules:claims:{created.schedule_id}:2030-01-01T10:00+00:00")
    assert not rc.exists(key)  # released
    nodes.clock.now = at(10, 0, 2)
    assert await b.fire()
    assert rc.exists(key)
    assert nodes.calls == [("b", "r")]


async def test_a_run_cancelled_by_pre_send_is_cancelled_everywhere(
    space: RedisSpace, nodes: Any
) -> None:
    class Cancelling(RedisScheduleSource):
        async def pre_send(self, task: ScheduledTask) -> None:
            raise ScheduledTaskCancelledError

    prefix = space.name("schedules")
    a = await nodes.make("a", [Cancelling(REDIS_URL, prefix=prefix)])
    b = await nodes.make("b")
    await b.record.kicker().schedule_by_cron(b.source, "* * * * *")
    nodes.clock.now = at(10, 0, 1)
    assert not await a.fire()
    nodes.clock.now = at(10, 0, 2)
    assert not await b.fire()  # a claimed the run, then its source cancelled it
    assert nodes.calls == []


async def test_an_unreachable_claim_store_sends_nothing(nodes: Any) -> None:
    claim = RedisRunClaim(UNREACHABLE_URL, socket_connect_timeout=1)
    task = schedule("record", cron="* * * * *")
    node = await nodes.make("n", [InMemoryScheduleSource([task])], claim=claim)
    assert not await node.fire()  # logged; sending might send it twice
    assert nodes.calls == []


async def test_claims_need_a_positive_ttl_and_release_only_their_own(space: RedisSpace) -> None:
    claims = space.name("claims")
    claim = RedisRunClaim(REDIS_URL, prefix=claims)
    other = RedisRunClaim(REDIS_URL, prefix=claims)
    with pytest.raises(ValueError, match="ttl"):
        await claim.claim("s", "once", 0)
    assert await claim.claim("s", "once", 5)
    assert not await other.claim("s", "once", 5)
    await other.release("s", "once")  # never won it: nothing happens
    assert not await other.claim("s", "once", 5)
    await claim.release("s", "once")
    assert await other.claim("s", "once", 5)
    await claim.release("s", "once")  # not ours any more: nothing happens
    assert not await claim.claim("s", "once", 5)
    await claim.shutdown()
    await other.shutdown()


# ------------------------------------------------------------------ python -m pool scheduler
def test_two_scheduler_processes_send_a_redis_one_shot_once(
    space: RedisSpace, rc: Any, tmp_path: Path, procs: list[Any]
) -> None:
    mark = tmp_path / "marks"
    prefix = space.name("schedules")
    env = {"POOL_TEST_SCHEDULE_PREFIX": prefix, "POOL_TEST_REDIS_URL": REDIS_URL}
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    for log in logs:
        # taskiq's loop reads the sources again every --update-interval seconds
        args = ("scheduler_app:redis_scheduler", "--update-interval", "1")
        procs.append(scheduler_process(*args, mark=mark, log=log, env=env))
    wait_for(
        lambda: all("Startup completed" in log.read_text() for log in logs),
        15,
        "both schedulers started",
    )
    assert all("RedisRunClaim" in log.read_text() for log in logs)  # the source's claim
    when = datetime.now(UTC) + timedelta(seconds=4)  # both re-read the hash before it is due
    task = ScheduledTask(task_name="mark", labels={}, args=["once"], kwargs={}, time=when)
    rc.hset(prefix, task.schedule_id, json.dumps(task.model_dump(mode="json")))
    # taskiq's loop logs each due run before on_ready: both schedulers reached it
    reached = f"schedule_id {task.schedule_id}"
    wait_for(lambda: all(reached in log.read_text() for log in logs), 15, "the run, twice")
    wait_for(lambda: lines(mark), 5, "the one-shot run")
    wait_for(lambda: not rc.hexists(prefix, task.schedule_id), 5, "the one-shot deleted")
    for proc, log in zip(procs, logs, strict=True):
        assert stop(proc) == 0, log.read_text()
    assert [line.split()[0] for line in lines(mark)] == ["once"]
    assert all("Traceback" not in log.read_text() for log in logs)


def test_claims_option_makes_label_schedules_safe_to_run_twice(
    space: RedisSpace, tmp_path: Path, procs: list[Any]
) -> None:
    mark = tmp_path / "marks"
    when = datetime.now(UTC) + timedelta(seconds=4)
    env = {"POOL_TEST_WHEN": when.isoformat()}
    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    claims = ("--claims", REDIS_URL, "--claims-prefix", space.name("claims"))
    for log in logs:
        procs.append(
            scheduler_process("scheduler_app:label_scheduler", *claims, mark=mark, log=log, env=env)
        )
    # taskiq's loop logs each due run before on_ready: both schedulers reached it
    wait_for(
        lambda: all("Sending task mark" in log.read_text() for log in logs), 20, "the run, twice"
    )
    wait_for(lambda: lines(mark), 5, "the label one-shot run")
    for proc, log in zip(procs, logs, strict=True):
        assert stop(proc) == 0, log.read_text()
    assert [line.split()[0] for line in lines(mark)] == ["label"]
