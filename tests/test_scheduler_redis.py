"""Schedules in Redis and several schedulers at once, against a real Redis.

Timing is driven through ``TaskiqScheduler.tick(now)`` with a made-up clock. Redis expires
claims on its own (real) clock, so the interval tests let claims expire on the test clock
instead (:class:`FakeClock`), and check separately that Redis got the right TTL.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pool import InMemoryBroker, TaskiqScheduler
from pool.scheduler import (
    InMemoryScheduleSource,
    ScheduledTask,
    ScheduledTaskCancelledError,
    schedule_by_cron,
    schedule_by_interval,
    schedule_by_time,
)
from tests.redis_support import REDIS_URL, UNREACHABLE_URL, RedisSpace, redis_space, wait_for

pytest.importorskip("redis")

from pool.redis import RedisRunClaim, RedisScheduleSource

pytestmark = pytest.mark.timeout(30)

UTC = timezone.utc
ROOT = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"


def at(hour: int, minute: int, second: int = 0, day: int = 1) -> datetime:
    return datetime(2030, 1, day, hour, minute, second, tzinfo=UTC)


@pytest.fixture
def space() -> Iterator[RedisSpace]:
    yield from redis_space()


@pytest.fixture
def rc(space: RedisSpace) -> Iterator[Any]:
    """A synchronous client, to look at what the code under test left in Redis."""
    client = space.client()
    yield client
    client.close()


class Node:
    """One scheduler "machine": its own broker (with a recording task) and scheduler."""

    def __init__(
        self,
        name: str,
        sources: list[Any],
        calls: list[tuple[str, Any]],
        claim: Any = None,
        register: bool = True,
    ) -> None:
        self.name = name
        self.broker = InMemoryBroker()
        self.calls = calls
        if register:
            self.register()
        self.scheduler = TaskiqScheduler(self.broker, sources, claim=claim)
        self.source = sources[0]

    def register(self) -> None:
        @self.broker.task("record")
        async def record(value: Any = None, **kwargs: Any) -> Any:
            self.calls.append((self.name, value))
            return value

        self.record = record

    async def tick(self, now: datetime) -> list[ScheduledTask]:
        sent = await self.scheduler.tick(now)
        await self.broker.wait_all()
        return sent


@pytest.fixture
async def nodes(space: RedisSpace) -> Any:
    """A factory of nodes sharing one list of calls; every node is shut down at the end."""
    made: list[Node] = []
    calls: list[tuple[str, Any]] = []

    async def make(name: str, sources: list[Any] | None = None, **kwargs: Any) -> Node:
        if sources is None:
            sources = [RedisScheduleSource(REDIS_URL, prefix=space.name("schedules"))]
        node = Node(name, sources, calls, **kwargs)
        await node.scheduler.startup()
        made.append(node)
        return node

    yield SimpleNamespace(make=make, calls=calls)
    for node in made:
        await node.scheduler.shutdown()


class FakeClock:
    """Expires claims on the test's clock: Redis would keep them for real seconds.

    ``claim(...)`` of the wrapped RedisRunClaim first deletes the key when the test clock is
    past the deadline the claim was taken with (``now + ttl``), as Redis would have.
    """

    def __init__(self) -> None:
        self.now = at(0, 0)
        self.deadlines: dict[str, datetime] = {}

    def claim(self, url: str, prefix: str) -> RedisRunClaim:
        clock = self

        class ClockedClaim(RedisRunClaim):
            async def claim(self, schedule_id: str, occurrence: str, ttl: float) -> bool:
                key = self.key(schedule_id, occurrence)
                deadline = clock.deadlines.get(key)
                if deadline is not None and clock.now >= deadline:
                    await self._redis.get().delete(key)
                    del clock.deadlines[key]
                won = await super().claim(schedule_id, occurrence, ttl)
                if won:
                    clock.deadlines[key] = clock.now + timedelta(seconds=ttl)
                return won

        return ClockedClaim(url, prefix=prefix)


# ------------------------------------------------------------------ the source
async def test_source_stores_json_in_one_hash(space: RedisSpace, rc: Any) -> None:
    source = RedisScheduleSource(REDIS_URL, prefix=space.name("schedules"))
    tasks = [
        ScheduledTask("a", cron="0 1 * * *", cron_offset=timedelta(hours=-5), args=[1, "x"]),
        ScheduledTask("b", cron="30 8 * * 1-5", cron_offset="Europe/Paris", labels={"p": 2}),
        ScheduledTask("c", time=datetime(2030, 1, 1, 12), kwargs={"k": [1, 2]}),
        ScheduledTask("d", interval=120.5, task_id="fixed"),
    ]
    for task in tasks:
        await source.add_schedule(task)
    got = {s.schedule_id: s for s in await source.get_schedules()}
    assert got == {t.schedule_id: t for t in tasks}
    assert rc.type(space.name("schedules")) == b"hash"
    stored = rc.hgetall(space.name("schedules"))
    assert {k.decode() for k in stored} == {t.schedule_id for t in tasks}
    for task in tasks:
        assert json.loads(stored[task.schedule_id.encode()]) == task.to_dict()

    await source.delete_schedule(tasks[0].schedule_id)
    await source.delete_schedule("no-such-id")  # not an error
    assert {s.schedule_id for s in await source.get_schedules()} == {
        t.schedule_id for t in tasks[1:]
    }
    await source.shutdown()


async def test_unreadable_entries_are_skipped_never_unpickled(
    space: RedisSpace, rc: Any, caplog: pytest.LogCaptureFixture
) -> None:
    class Boom:
        def __reduce__(self) -> Any:
            return (os.system, ("echo unpickled",))

    key = space.name("schedules")
    source = RedisScheduleSource(REDIS_URL, prefix=key)
    good = ScheduledTask("ok", interval=5)
    await source.add_schedule(good)
    rc.hset(key, "pickled", pickle.dumps(Boom()))
    rc.hset(key, "not-json", b"{nope")
    rc.hset(key, "bad-cron", json.dumps({"task_name": "x", "cron": "61 * * * *"}))
    rc.hset(key, "a-list", json.dumps([1, 2]))
    with caplog.at_level(logging.ERROR, logger="pool.redis"):
        assert await source.get_schedules() == [good]
        assert await source.get_schedules() == [good]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 4  # each bad entry is reported once, not at every tick
    assert any("bad-cron" in m and "61 * * * *" in m for m in errors)
    await source.shutdown()


async def test_bad_input_is_an_error_at_registration(space: RedisSpace, rc: Any) -> None:
    broker = InMemoryBroker()

    @broker.task("record")
    async def record(value: Any = None) -> None:
        pass

    key = space.name("schedules")
    source = RedisScheduleSource(REDIS_URL, prefix=key)
    with pytest.raises(ValueError, match=r"61 \* \* \* \*"):
        await schedule_by_cron(record, source, "61 * * * *")
    with pytest.raises(ValueError, match="past"):
        await schedule_by_time(record, source, datetime.now(UTC) - timedelta(seconds=1))
    with pytest.raises(ValueError, match="interval"):
        await schedule_by_interval(record, source, 0)
    with pytest.raises(ValueError, match="JSON"):
        await schedule_by_interval(record, source, 5, object())
    with pytest.raises(ValueError, match="JSON"):
        await schedule_by_cron(record, source, "* * * * *", float("nan"))
    assert rc.exists(key) == 0
    await source.shutdown()


# ------------------------------------------------------------------ restart and cancel
async def test_dynamic_schedules_survive_a_restart(space: RedisSpace, nodes: Any) -> None:
    clock = FakeClock()
    claims = space.name("claims")
    # times in the future, so that schedule_by_time accepts the one-shot
    base = (datetime.now(UTC) + timedelta(hours=2)).replace(minute=0, second=0, microsecond=0)

    def t(minutes: int, seconds: int = 0) -> datetime:
        return base + timedelta(minutes=minutes, seconds=seconds)

    async def tick(node: Node, now: datetime) -> set[str]:
        clock.now = now
        return {s.schedule_id for s in await node.tick(now)}

    first = await nodes.make("first", claim=clock.claim(REDIS_URL, claims))
    cron = await schedule_by_cron(first.record, first.source, "*/5 * * * *", "cron")
    every = await schedule_by_interval(first.record, first.source, 600, "interval")
    once = await schedule_by_time(first.record, first.source, t(7), "once")
    assert await tick(first, t(0, 5)) == {cron.schedule_id, every.schedule_id}
    await first.scheduler.shutdown()

    # A new process: new broker, new source object, same Redis hash.
    second = await nodes.make("second", claim=clock.claim(REDIS_URL, claims))
    assert {s.schedule_id for s in await second.source.get_schedules()} == {
        cron.schedule_id,
        every.schedule_id,
        once.schedule_id,
    }
    # Restarted within the same minute and interval: the claims of the first scheduler keep
    # the second from sending those runs again.
    assert await tick(second, t(0, 30)) == set()
    assert await tick(second, t(5, 0)) == {cron.schedule_id}
    assert await tick(second, t(7, 0)) == {once.schedule_id}
    assert await tick(second, t(10, 0)) == {cron.schedule_id}
    assert await tick(second, t(10, 30)) == {every.schedule_id}  # 10 min after it first saw it
    assert sorted(v for n, v in nodes.calls if n == "first") == ["cron", "interval"]
    assert [v for n, v in nodes.calls if n == "second"] == ["cron", "once", "cron", "interval"]
    # the one-shot was deleted from Redis after firing
    assert {s.schedule_id for s in await second.source.get_schedules()} == {
        cron.schedule_id,
        every.schedule_id,
    }


async def test_cancel_via_the_handle_removes_it_from_redis(
    space: RedisSpace, rc: Any, nodes: Any
) -> None:
    node = await nodes.make("n")
    handle = await schedule_by_cron(node.record, node.source, "* * * * *", "x")
    key = space.name("schedules")
    assert rc.hexists(key, handle.schedule_id)
    assert len(await node.tick(at(10, 0))) == 1
    await handle.cancel()
    assert not rc.hexists(key, handle.schedule_id)
    assert await node.tick(at(10, 1)) == []
    # another process, reading the same hash, does not see it either
    other = RedisScheduleSource(REDIS_URL, prefix=key)
    assert await other.get_schedules() == []
    await other.shutdown()
    assert nodes.calls == [("n", "x")]


# ------------------------------------------------------------------ two schedulers
async def test_two_schedulers_send_a_cron_minute_once(space: RedisSpace, nodes: Any) -> None:
    claims = space.name("claims")
    a = await nodes.make("a", claim=RedisRunClaim(REDIS_URL, prefix=claims))
    b = await nodes.make("b", claim=RedisRunClaim(REDIS_URL, prefix=claims))
    await schedule_by_cron(a.record, a.source, "* * * * *", "tick")
    # each minute, the two schedulers tick at different seconds, in either order
    for minute in range(5):
        first, second = (a, b) if minute % 2 == 0 else (b, a)
        await first.tick(at(10, minute, minute))
        await second.tick(at(10, minute, 30))
        await first.tick(at(10, minute, 59))
    assert len(nodes.calls) == 5
    assert {n for n, _ in nodes.calls} == {"a", "b"}


async def test_without_claims_two_schedulers_send_twice(space: RedisSpace, nodes: Any) -> None:
    """The control of the test above: the claims are what make it pass."""
    a = await nodes.make("a", claim=False)
    b = await nodes.make("b", claim=False)
    assert a.scheduler.claim is None
    await schedule_by_cron(a.record, a.source, "* * * * *")
    await a.tick(at(10, 0))
    await b.tick(at(10, 0, 30))
    assert len(nodes.calls) == 2


async def test_the_claim_of_a_redis_source_is_used_by_default(
    space: RedisSpace, rc: Any, nodes: Any
) -> None:
    a = await nodes.make("a")
    b = await nodes.make("b")
    assert isinstance(a.scheduler.claim, RedisRunClaim)
    assert a.scheduler.claim is not b.scheduler.claim
    assert a.scheduler.claim.prefix == space.name("schedules") + ":claims"
    handle = await schedule_by_cron(a.record, a.source, "0 9 * * *", "p")
    assert len(await b.tick(at(9, 0, 1))) == 1
    assert await a.tick(at(9, 0, 2)) == []
    claim_key = space.name(f"schedules:claims:{handle.schedule_id}:2030-01-01T09:00+00:00")
    assert rc.exists(claim_key)
    assert 86_000_000 < rc.pttl(claim_key) <= 86_400_000  # kept for a day
    assert nodes.calls == [("b", "p")]


async def test_cron_occurrence_is_the_due_minute_in_utc(space: RedisSpace, rc: Any) -> None:
    """Schedulers that see a cron run at different minutes (one fell behind) agree on it."""
    calls: list[tuple[str, Any]] = []
    claims = space.name("claims")
    task = ScheduledTask("record", cron="0 9 * * *", cron_offset="Europe/Paris", args=["p"])
    a = Node("a", [InMemoryScheduleSource([task])], calls, RedisRunClaim(REDIS_URL, claims))
    b = Node("b", [InMemoryScheduleSource([task])], calls, RedisRunClaim(REDIS_URL, claims))
    for node in (a, b):
        await node.scheduler.startup()
    await a.tick(at(7, 59, 59))
    await b.tick(at(7, 59, 59))
    assert len(await a.tick(at(8, 0, 0))) == 1  # 09:00 in Paris
    assert await b.tick(at(8, 3, 0)) == []  # late, but the same run: not sent again
    assert rc.exists(f"{claims}:{task.schedule_id}:2030-01-01T08:00+00:00")
    assert calls == [("a", "p")]
    for node in (a, b):
        await node.scheduler.shutdown()


async def test_interval_is_sent_once_per_interval_and_taken_over(
    space: RedisSpace, rc: Any
) -> None:
    clock = FakeClock()
    calls: list[tuple[str, Any]] = []
    claims = space.name("claims")
    task = ScheduledTask("record", interval=10, args=["i"])
    # label-like schedules: the same schedule (id) declared in each scheduler's own source
    a = Node("a", [InMemoryScheduleSource([task])], calls, clock.claim(REDIS_URL, claims))
    b = Node("b", [InMemoryScheduleSource([task])], calls, clock.claim(REDIS_URL, claims))
    for node in (a, b):
        await node.scheduler.startup()
    start = clock.now
    sent_at: list[tuple[str, int]] = []
    for second in range(0, 70):
        clock.now = start + timedelta(seconds=second)
        ticking = [a] if second < 3 else [a, b] if second < 35 else [b]  # a dies at 35 s
        for node in ticking:
            if await node.tick(clock.now):
                sent_at.append((node.name, second))
        if second == 0:
            pttl = rc.pttl(f"{claims}:{task.schedule_id}:interval")
            assert 8_000 < pttl <= 9_000  # 0.9 * interval, in Redis
    # a sends on its grid (0, 10, ...); b, started at 3 s, finds each run claimed until a
    # stops, then takes over on its own grid (3 + 10 k) once a's last claim (30 + 9) expired
    assert sent_at == [("a", 0), ("a", 10), ("a", 20), ("a", 30), ("b", 43), ("b", 53), ("b", 63)]
    assert len(calls) == 7
    for node in (a, b):
        await node.scheduler.shutdown()


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
    when = datetime.now(UTC) + timedelta(hours=1)
    handle = await schedule_by_time(a.record, a.source, when, "once")
    b.source.frozen = await b.source.get_schedules()  # b read the hash before a sent it
    assert len(await a.tick(when + timedelta(seconds=1))) == 1
    assert not rc.hexists(prefix, handle.schedule_id)
    await b.tick(when + timedelta(seconds=1))
    await b.tick(when + timedelta(seconds=2))
    await a.tick(when + timedelta(seconds=2))
    if claim is None:
        assert nodes.calls == [("a", "once")]
    else:  # the control: without claims b sends it again
        assert nodes.calls == [("a", "once"), ("b", "once")]


async def test_a_failed_send_releases_the_claim(space: RedisSpace, rc: Any, nodes: Any) -> None:
    """A scheduler that cannot send a claimed run lets the other one (or itself) retry."""
    a = await nodes.make("a", register=False)  # "record" is unknown here: kiq fails
    b = await nodes.make("b")
    handle = await schedule_by_cron(b.record, b.source, "* * * * *", "r")
    assert await a.tick(at(10, 0, 1)) == []
    key = space.name(f"schedules:claims:{handle.schedule_id}:2030-01-01T10:00+00:00")
    assert not rc.exists(key)  # released
    assert len(await b.tick(at(10, 0, 2))) == 1
    a.register()
    assert await a.tick(at(10, 0, 3)) == []  # b sent it meanwhile
    assert len(await a.tick(at(10, 1, 0))) == 1
    assert nodes.calls == [("b", "r"), ("a", "r")]


async def test_a_run_cancelled_by_pre_send_is_cancelled_everywhere(
    space: RedisSpace, nodes: Any
) -> None:
    class Cancelling(RedisScheduleSource):
        async def pre_send(self, task: ScheduledTask) -> None:
            raise ScheduledTaskCancelledError

    prefix = space.name("schedules")
    a = await nodes.make("a", [Cancelling(REDIS_URL, prefix=prefix)])
    b = await nodes.make("b")
    await schedule_by_cron(b.record, b.source, "* * * * *")
    assert await a.tick(at(10, 0, 1)) == []
    assert await b.tick(at(10, 0, 2)) == []  # a claimed the run, then its source cancelled it
    assert nodes.calls == []


async def test_an_unreachable_claim_store_sends_nothing(nodes: Any) -> None:
    claim = RedisRunClaim(UNREACHABLE_URL, socket_connect_timeout=1)
    node = await nodes.make(
        "n", [InMemoryScheduleSource([ScheduledTask("record", cron="* * * * *")])], claim=claim
    )
    assert await node.tick(at(10, 0)) == []  # logged, tried again at the next tick
    assert nodes.calls == []


def test_claim_argument_is_checked() -> None:
    with pytest.raises(TypeError, match="claim"):
        TaskiqScheduler(InMemoryBroker(), [], claim=object())  # type: ignore[arg-type]
    explicit = RedisRunClaim(REDIS_URL)
    source = RedisScheduleSource(REDIS_URL)
    assert TaskiqScheduler(InMemoryBroker(), [source], claim=explicit).claim is explicit
    assert TaskiqScheduler(InMemoryBroker(), [InMemoryScheduleSource()]).claim is None


async def test_claim_ttl_must_be_positive(space: RedisSpace) -> None:
    claim = RedisRunClaim(REDIS_URL, prefix=space.name("claims"))
    with pytest.raises(ValueError, match="ttl"):
        await claim.claim("s", "once", 0)
    assert await claim.claim("s", "once", 5)
    assert not await claim.claim("s", "once", 5)
    await claim.release("s", "once")
    assert await RedisRunClaim(REDIS_URL, prefix=space.name("claims")).claim("s", "once", 5)
    await claim.release("s", "once")  # not ours any more: nothing happens
    assert not await claim.claim("s", "once", 5)
    await claim.shutdown()


# ------------------------------------------------------------------ python -m pool scheduler
def _scheduler_process(
    spec: str, mark: Path, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pool", "scheduler", spec, "--log-level", "DEBUG"],
            cwd=str(APPS),
            env={
                **os.environ,
                "PYTHONPATH": os.pathsep.join([str(APPS), str(ROOT)]),
                "POOL_TEST_MARK": str(mark),
                **(env or {}),
            },
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
        raise


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_cli_runs_an_interval_schedule_and_stops_cleanly(sig: int, tmp_path: Path) -> None:
    work = tmp_path
    mark, log = work / "marks", work / "scheduler.log"
    proc = _scheduler_process("scheduler_app:scheduler", mark, log)
    try:
        wait_for(lambda: len(_lines(mark)) >= 2, 10, "two runs of the every-second schedule")
        started = time.monotonic()
        assert _stop(proc, sig) == 0, log.read_text()
        assert time.monotonic() - started < 5
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    text = log.read_text()
    assert "scheduler stopped" in text and "Traceback" not in text, text
    assert {line.split()[0] for line in _lines(mark)} == {"interval"}
    assert {line.split()[1] for line in _lines(mark)} == {str(proc.pid)}  # ran in-process


@pytest.mark.parametrize(
    "spec, message",
    [
        ("scheduler_app:not_a_scheduler", "not a TaskiqScheduler but InMemoryBroker"),
        ("scheduler_app:missing", "has no attribute 'missing'"),
        ("no_such_app_module:scheduler", "cannot import module 'no_such_app_module'"),
        ("scheduler_app", "expected MODULE:ATTR"),
    ],
)
def test_cli_rejects_what_is_not_a_scheduler(spec: str, message: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pool", "scheduler", spec],
        cwd=str(APPS),
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(APPS), str(ROOT)])},
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 2, out.stderr
    assert message in out.stderr


def test_cli_reports_a_module_that_fails_to_import(tmp_path: Path) -> None:
    (tmp_path / "broken_sched_app.py").write_text("raise RuntimeError('boom at import')\n")
    out = subprocess.run(
        [sys.executable, "-m", "pool", "scheduler", "broken_sched_app:scheduler"],
        cwd=str(tmp_path),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 2, out.stderr
    assert "cannot import broken_sched_app:scheduler: RuntimeError: boom at import" in out.stderr


def test_two_scheduler_processes_send_a_one_shot_once(
    space: RedisSpace, rc: Any, tmp_path: Path
) -> None:
    work = tmp_path
    mark = work / "marks"
    prefix = space.name("schedules")
    env = {"POOL_TEST_SCHEDULE_PREFIX": prefix, "POOL_TEST_REDIS_URL": REDIS_URL}
    logs = [work / "a.log", work / "b.log"]
    procs = [_scheduler_process("scheduler_app:redis_scheduler", mark, log, env) for log in logs]
    try:
        wait_for(
            lambda: all("scheduler started" in log.read_text() for log in logs),
            10,
            "both schedulers started",
        )
        when = datetime.now(UTC) + timedelta(seconds=1.5)
        task = ScheduledTask("mark", time=when, args=["once"])
        rc.hset(prefix, task.schedule_id, json.dumps(task.to_dict()))
        wait_for(lambda: _lines(mark), 10, "the one-shot run")
        wait_for(lambda: not rc.hexists(prefix, task.schedule_id), 5, "the one-shot deleted")
        # a stopped scheduler has finished its tick and the tasks it sent
        for proc, log in zip(procs, logs, strict=True):
            assert _stop(proc) == 0, log.read_text()
        assert [line.split()[0] for line in _lines(mark)] == ["once"]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=5)
    texts = [log.read_text() for log in logs]
    assert sum("claimed by another scheduler" in text for text in texts) <= 1
    assert all("Traceback" not in text for text in texts), texts
