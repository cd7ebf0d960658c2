"""pool's run claims on taskiq's scheduler, and ``python -m pool scheduler``, without Redis.

When a schedule is due is taskiq's business (``taskiq.cli.scheduler.run.SchedulerLoop``); what
pool adds sits in ``on_ready``, so most tests call ``on_ready`` at the moments taskiq's loop
would, with a made-up clock, and a few run taskiq's real loop.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from taskiq import InMemoryBroker, ScheduledTask, ScheduleSource, TaskiqScheduler
from taskiq.cli.scheduler.run import SchedulerLoop
from taskiq.exceptions import ScheduledTaskCancelledError, SendTaskError
from taskiq.schedule_sources import LabelScheduleSource

from pool.extensions.scheduler import (
    CLAIM_TTL,
    InMemoryRunClaim,
    InMemoryScheduleSource,
    PoolScheduler,
    RunClaims,
    claim_id,
    occurrence_of,
    with_run_claims,
)
from tests.pool_support import wait_for

pytestmark = pytest.mark.timeout(30)

UTC = timezone.utc
ROOT = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"


def at(hour: int, minute: int, second: int = 0, day: int = 1) -> datetime:
    return datetime(2030, 1, day, hour, minute, second, tzinfo=UTC)


def schedule(task_name: str = "record", *args: Any, **when: Any) -> ScheduledTask:
    return ScheduledTask(task_name=task_name, labels={}, args=list(args), kwargs={}, **when)


class Clock:
    """The test's time, for the occurrences and for in-memory claims' expiry."""

    def __init__(self, now: datetime | None = None) -> None:
        self.now = now or at(0, 0)

    def __call__(self) -> datetime:
        return self.now

    def seconds(self) -> float:
        return self.now.timestamp()


class Node:
    """One scheduler "machine": its own InMemoryBroker with a recording task, and a scheduler."""

    def __init__(
        self,
        name: str,
        sources: list[ScheduleSource],
        calls: list[tuple[str, Any]],
        claim: Any = None,
        clock: Clock | None = None,
        register: bool = True,
    ) -> None:
        self.name = name
        self.calls = calls
        self.broker = InMemoryBroker()
        if register:
            self.register()
        self.scheduler = PoolScheduler(self.broker, sources, claim=claim)
        self.source = sources[0]
        if clock is not None and self.scheduler.run_claims is not None:
            self.scheduler.run_claims.clock = clock

    def register(self) -> None:
        @self.broker.task("record")
        async def record(value: Any = None, **kwargs: Any) -> Any:
            self.calls.append((self.name, value))
            return value

        self.record = record

    async def fire(self, task: ScheduledTask | None = None) -> bool:
        """What taskiq's loop does for a due schedule; True if this node sent it."""
        before = len(self.calls)
        for due in [task] if task is not None else await self.source.get_schedules():
            await self.scheduler.on_ready(self.source, due)
        await self.broker.wait_all()
        return len(self.calls) > before


@pytest.fixture
def calls() -> list[tuple[str, Any]]:
    return []


# ------------------------------------------------------------------ taskiq's scheduler
async def test_pool_scheduler_is_taskiqs_scheduler_and_without_claims_sends_as_taskiq(
    calls: list[tuple[str, Any]],
) -> None:
    task = ScheduledTask(
        task_name="record", labels={"l": 1}, args=["x"], kwargs={}, cron="* * * * *", task_id="t1"
    )
    node = Node("n", [InMemoryScheduleSource([task])], calls)
    assert isinstance(node.scheduler, TaskiqScheduler)
    assert node.scheduler.run_claims is None  # no claim given, and no source offers one
    assert await node.fire()
    result = await node.broker.result_backend.get_result("t1")
    assert result.return_value == "x"
    assert result.labels == {"l": 1, "schedule_id": task.schedule_id}  # taskiq's on_ready


async def test_two_schedulers_send_a_cron_minute_once(calls: list[tuple[str, Any]]) -> None:
    clock, claim = Clock(), InMemoryRunClaim()
    task = schedule("record", "tick", cron="* * * * *")
    a = Node("a", [InMemoryScheduleSource([task])], calls, claim, clock)
    b = Node("b", [InMemoryScheduleSource([task])], calls, claim, clock)
    for minute in range(5):
        first, second = (a, b) if minute % 2 == 0 else (b, a)
        clock.now = at(10, minute, minute)
        assert await first.fire()
        clock.now = at(10, minute, 30)
        assert not await second.fire()
    assert [name for name, _ in calls] == ["a", "b", "a", "b", "a"]


async def test_without_claims_two_schedulers_send_twice(calls: list[tuple[str, Any]]) -> None:
    """The control of the test above: the claims are what make it pass."""
    task = schedule("record", cron="* * * * *")
    a = Node("a", [InMemoryScheduleSource([task])], calls, claim=False)
    b = Node("b", [InMemoryScheduleSource([task])], calls, claim=False)
    assert a.scheduler.run_claims is None
    assert await a.fire() and await b.fire()
    assert len(calls) == 2


async def test_interval_is_sent_once_per_interval_and_taken_over(
    calls: list[tuple[str, Any]],
) -> None:
    clock = Clock()
    claim = InMemoryRunClaim(clock=clock.seconds)
    task = schedule("record", "i", interval=10)
    a = Node("a", [InMemoryScheduleSource([task])], calls, claim, clock)
    b = Node("b", [InMemoryScheduleSource([task])], calls, claim, clock)
    start = clock.now
    sent_at: list[tuple[str, int]] = []
    for second in range(70):
        clock.now = start + timedelta(seconds=second)
        # each fires on its own grid, as taskiq's loop does: a from 0 s, b from 3 s; a dies at 35
        due = [n for n, first in ((a, 0), (b, 3)) if second >= first and (second - first) % 10 == 0]
        for node in due:
            if node is a and second >= 35:
                continue
            if await node.fire():
                sent_at.append((node.name, second))
    # b finds each run claimed until a stops, then takes over once a's last claim (30 + 9 s)
    # expired
    assert sent_at == [("a", 0), ("a", 10), ("a", 20), ("a", 30), ("b", 43), ("b", 53), ("b", 63)]


async def test_a_one_shot_is_sent_by_one_scheduler(calls: list[tuple[str, Any]]) -> None:
    clock, claim = Clock(at(12, 0, 1)), InMemoryRunClaim()
    task = schedule("record", "once", time=at(12, 0))
    a = Node("a", [InMemoryScheduleSource([task])], calls, claim, clock)
    b = Node("b", [InMemoryScheduleSource([task])], calls, claim, clock)
    assert await a.fire()
    assert await a.source.get_schedules() == []  # deleted by post_send
    clock.now = at(12, 0, 2)
    assert not await b.fire()
    assert calls == [("a", "once")]


async def test_a_failed_send_releases_the_claim(calls: list[tuple[str, Any]]) -> None:
    """A scheduler that cannot send a claimed run lets the other one retry it."""
    clock, claim = Clock(at(10, 0, 1)), InMemoryRunClaim()
    task = schedule("record", "r", cron="* * * * *")
    a = Node("a", [InMemoryScheduleSource([task])], calls, claim, clock, register=False)
    b = Node("b", [InMemoryScheduleSource([task])], calls, claim, clock)
    with pytest.raises(SendTaskError):  # "record" is unknown to a's broker
        await a.fire()
    assert claim.claims == {}
    assert await b.fire()
    assert calls == [("b", "r")]


async def test_a_run_cancelled_by_pre_send_is_cancelled_everywhere(
    calls: list[tuple[str, Any]],
) -> None:
    class Cancelling(InMemoryScheduleSource):
        async def pre_send(self, task: ScheduledTask) -> None:
            raise ScheduledTaskCancelledError

    clock, claim = Clock(at(10, 0, 1)), InMemoryRunClaim()
    task = schedule("record", cron="* * * * *")
    a = Node("a", [Cancelling([task])], calls, claim, clock)
    b = Node("b", [InMemoryScheduleSource([task])], calls, claim, clock)
    assert not await a.fire()  # taskiq's on_ready logs the cancellation
    assert not await b.fire()  # a claimed the run before its source cancelled it
    assert calls == []


async def test_a_failing_claim_store_sends_nothing(
    calls: list[tuple[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    class Down:
        async def claim(self, schedule_id: str, occurrence: str, ttl: float) -> bool:
            raise ConnectionError("claim store down")

    node = Node("n", [InMemoryScheduleSource([schedule(cron="* * * * *")])], calls, Down())
    assert not await node.fire()
    assert "cannot claim run" in caplog.text and "claim store down" in caplog.text


def test_the_claim_is_checked_and_found() -> None:
    broker = InMemoryBroker()
    with pytest.raises(TypeError, match="claim"):
        PoolScheduler(broker, [], claim=object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="claim"):
        RunClaims(object())  # type: ignore[arg-type]

    class Offering(InMemoryScheduleSource):
        def __init__(self) -> None:
            super().__init__()
            self.made: list[InMemoryRunClaim] = []

        def run_claim(self) -> InMemoryRunClaim:
            self.made.append(InMemoryRunClaim())
            return self.made[-1]

    offering = Offering()
    found = PoolScheduler(broker, [InMemoryScheduleSource(), offering]).run_claims
    assert found is not None and found.claim is offering.made[0]
    explicit = InMemoryRunClaim()
    chosen = PoolScheduler(broker, [offering], claim=explicit).run_claims
    assert chosen is not None and chosen.claim is explicit
    assert PoolScheduler(broker, [offering], claim=False).run_claims is None


def test_occurrences() -> None:
    paris = datetime(2030, 1, 1, 9, 0, 42, tzinfo=timezone(timedelta(hours=1)))
    cron = schedule(cron="0 9 * * *", cron_offset="Europe/Paris")
    assert occurrence_of(cron, paris) == ("2030-01-01T08:00+00:00", CLAIM_TTL)  # UTC minute
    naive = schedule(time=datetime(2030, 1, 1, 12))
    assert occurrence_of(naive, at(12, 0, 5)) == ("2030-01-01T12:00:00+00:00", CLAIM_TTL)
    assert occurrence_of(schedule(interval=timedelta(minutes=2)), at(1, 0)) == ("interval", 108)


async def test_label_schedules_are_named_alike_in_every_scheduler() -> None:
    """taskiq's LabelScheduleSource gives its schedules random ids in each process."""

    def source(args: list[Any]) -> LabelScheduleSource:
        broker = InMemoryBroker()

        @broker.task("labelled", schedule=[{"cron": "*/5 * * * *", "args": args}])
        async def labelled(*args: Any) -> None: ...

        return LabelScheduleSource(broker)

    first, second, other = source([1]), source([1]), source([2])
    for each in (first, second, other):
        await each.startup()
    [a], [b], [c] = [await s.get_schedules() for s in (first, second, other)]
    assert a.schedule_id != b.schedule_id  # taskiq's random ids
    assert claim_id(first, a) == claim_id(second, b) != claim_id(other, c)
    assert claim_id(first, a).startswith("label:labelled:")
    assert claim_id(InMemoryScheduleSource(), a) == a.schedule_id  # other sources: their id


async def test_with_run_claims_adds_claims_to_a_plain_taskiq_scheduler(
    calls: list[tuple[str, Any]],
) -> None:
    sent: list[str] = []

    class Custom(TaskiqScheduler):
        async def on_ready(self, source: ScheduleSource, task: ScheduledTask) -> None:
            sent.append(task.schedule_id)

    class Claim(InMemoryRunClaim):
        closed = False

        async def shutdown(self) -> None:
            self.closed = True

    claim = Claim()
    task = schedule(cron="* * * * *")
    source = InMemoryScheduleSource([task])
    a = Custom(InMemoryBroker(), [source])
    b = Custom(InMemoryBroker(), [source])
    assert with_run_claims(a, claim) is a and with_run_claims(b, claim) is b
    assert with_run_claims(a, InMemoryRunClaim()) is a  # already claiming: unchanged
    await a.on_ready(source, task)
    await b.on_ready(source, task)
    assert sent == [task.schedule_id]  # the subclass's own on_ready sent it, once
    await a.startup()
    await a.shutdown()
    assert claim.closed
    plain = TaskiqScheduler(InMemoryBroker(), [source])
    assert with_run_claims(plain) is plain and not hasattr(plain, "run_claims")


async def test_in_memory_source_with_taskiqs_schedule_api(calls: list[tuple[str, Any]]) -> None:
    source = InMemoryScheduleSource()
    node = Node("n", [source], calls)
    created = await node.record.kicker().schedule_by_cron(source, "*/5 * * * *", "hello")
    [stored] = await source.get_schedules()
    assert stored.schedule_id == created.schedule_id and stored.args == ["hello"]
    await created.unschedule()
    assert await source.get_schedules() == []
    await source.delete_schedule("no-such-id")  # not an error
    once = await node.record.kicker().schedule_by_time(source, at(12, 0), "later")
    interval = await node.record.kicker().schedule_by_interval(source, 30, "often")
    assert {s.schedule_id for s in await source.get_schedules()} == {
        once.schedule_id,
        interval.schedule_id,
    }
    source.post_send(once.task)
    assert [s.schedule_id for s in await source.get_schedules()] == [interval.schedule_id]


async def test_taskiqs_loop_with_claims_sends_each_run_once(calls: list[tuple[str, Any]]) -> None:
    """Two schedulers in taskiq's real loop, one claim store: one run per second, not two."""
    claim = InMemoryRunClaim()
    task = schedule("record", "every second", interval=1)
    nodes = [Node(n, [InMemoryScheduleSource([task])], calls, claim) for n in "ab"]
    loops = [
        asyncio.create_task(SchedulerLoop(node.scheduler).run(update_interval=timedelta(hours=1)))
        for node in nodes
    ]
    started = time.monotonic()
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while len(calls) < 3:
            assert loop.time() < deadline, "taskiq's loop sent nothing"
            await asyncio.sleep(0.05)
    finally:
        for running in loops:
            running.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        for node in nodes:
            await node.broker.wait_all()
    seconds = time.monotonic() - started
    # one send per whole second (taskiq's loop ticks on the second), whoever sent it
    assert len(calls) <= int(seconds) + 1, (calls, seconds)


# ------------------------------------------------------------------ python -m pool scheduler
def scheduler_process(
    *args: str, mark: Path, log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pool.ops.scheduler_cli", *args, "--log-level", "DEBUG"],
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


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)
        raise


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Scheduler processes of a test; any still running at the end is killed."""
    running: list[subprocess.Popen[bytes]] = []
    yield running
    for proc in running:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("spec", ["scheduler_app:scheduler", "scheduler_app:make_scheduler"])
def test_cli_runs_taskiqs_loop_and_stops_cleanly(
    sig: int, spec: str, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    mark, log = tmp_path / "marks", tmp_path / "scheduler.log"
    procs.append(proc := scheduler_process(spec, "--update-interval", "5", mark=mark, log=log))
    wait_for(lambda: len(lines(mark)) >= 2, 15, "two runs of the every-second schedule")
    started = time.monotonic()
    assert stop(proc, sig) == 0, log.read_text()
    assert time.monotonic() - started < 5
    text = log.read_text()
    assert "scheduler stopped" in text and "Traceback" not in text, text
    assert "run claims: none" in text
    assert {line.split()[0] for line in lines(mark)} == {"interval"}
    assert {line.split()[1] for line in lines(mark)} == {str(proc.pid)}  # ran in-process


@pytest.mark.parametrize(
    "spec, message",
    [
        ("scheduler_app:not_a_scheduler", "not a TaskiqScheduler but InMemoryBroker"),
        ("scheduler_app:missing", "has no attribute 'missing'"),
        ("no_such_app_module:scheduler", "No module named 'no_such_app_module'"),
        ("scheduler_app", "expected MODULE:ATTR"),
    ],
)
def test_cli_rejects_what_is_not_a_scheduler(spec: str, message: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pool.ops.scheduler_cli", spec],
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
        [sys.executable, "-m", "pool.ops.scheduler_cli", "broken_sched_app:scheduler"],
        cwd=str(tmp_path),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 2, out.stderr
    assert "cannot import broken_sched_app:scheduler: RuntimeError: boom at import" in out.stderr


def test_cli_takes_taskiq_schedulers_arguments() -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pool.ops.scheduler_cli", *args],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=20,
        )

    helped = run("--help")
    assert helped.returncode == 0, helped.stderr
    for option in ("--skip-first-run", "--update-interval", "--send-timeout", "--claims"):
        assert option in helped.stdout
    bad = run("app:scheduler", "--loop-interval", "soon")
    assert bad.returncode == 2 and "--loop-interval" in bad.stderr
