"""Task control on the embedded broker: delay and eta, priority, deduplication, cancel, hard
time limits, pool-wide concurrency and rate limits (README "Task control")."""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
import time
from typing import Any

import pytest

from tests.pool_support import RunningPool, kicker

pytestmark = pytest.mark.timeout(90)

APP = "control_app:broker"
TOLERANCE = 0.05  # s: how late a delayed task typically starts (the median)
LOOSE = 0.5  # s: how late any one may start on a loaded machine


def control_pool(workers: int = 2, extra: list[str] | None = None, **kw: Any) -> RunningPool:
    return RunningPool(workers, extra, app=APP, **kw)


def task(broker: Any, name: str) -> Any:
    return kicker(broker, name).__class__(f"control_app:{name}", broker, {})


def starts(pool: RunningPool, log: str = "starts") -> list[list[Any]]:
    path = pool.mark_path(log)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


async def with_broker(pool: RunningPool, body: Any) -> Any:
    broker = pool.broker()
    await broker.startup()
    try:
        return await body(broker)
    finally:
        await broker.shutdown()


# ------------------------------------------------------------------ delay and eta
def test_a_delayed_task_starts_at_its_due_time_never_before() -> None:
    """Never early; typically within 50 ms of due (the median of 8, so that one hiccup of
    a loaded machine's scheduler is not taken for the timer's lateness)."""

    async def body(broker: Any) -> list[tuple[float, float]]:
        sent: list[tuple[float, Any]] = []
        for delay in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0):
            at = time.time()
            handle = await task(broker, "started_at").with_labels(delay=delay).kiq("d")
            sent.append((at + delay, handle))
        return [(due, (await h.wait_result(timeout=10)).return_value) for due, h in sent]

    with control_pool() as pool:
        pairs = asyncio.run(with_broker(pool, body))
    lateness = sorted(ran - due for due, ran in pairs)
    assert lateness[0] >= 0, f"a task started {-lateness[0]:.3f} s early"
    assert statistics.median(lateness) <= TOLERANCE, lateness
    assert lateness[-1] <= LOOSE, lateness


def test_an_eta_as_epoch_seconds_or_iso_time_is_when_the_task_starts() -> None:
    from datetime import datetime, timezone

    async def body(broker: Any) -> list[tuple[float, float]]:
        epoch = time.time() + 0.5
        iso = datetime.fromtimestamp(time.time() + 0.8, timezone.utc).isoformat()
        first = await task(broker, "started_at").with_labels(eta=epoch).kiq("epoch")
        second = await task(broker, "sync_started_at").with_labels(eta=iso).kiq("iso")
        return [
            (epoch, (await first.wait_result(timeout=10)).return_value),
            (
                datetime.fromisoformat(iso).timestamp(),
                (await second.wait_result(timeout=10)).return_value,
            ),
        ]

    with control_pool() as pool:
        for due, ran in asyncio.run(with_broker(pool, body)):
            assert due <= ran <= due + LOOSE, (due, ran)


def test_delayed_tasks_do_not_hold_back_the_others() -> None:
    async def body(broker: Any) -> tuple[float, float]:
        late = await task(broker, "started_at").with_labels(delay=2).kiq("late")
        sent = time.time()
        now = await task(broker, "started_at").kiq("now")
        ran_now = (await now.wait_result(timeout=10)).return_value
        await late.wait_result(timeout=10)
        return sent, ran_now

    with control_pool(1) as pool:
        sent, ran_now = asyncio.run(with_broker(pool, body))
        assert ran_now < sent + 1
        assert [tag for tag, _ in starts(pool)] == ["now", "late"]


def test_a_delayed_task_survives_a_restart_and_still_waits_for_its_due_time() -> None:
    import signal

    async def send(broker: Any) -> tuple[str, float]:
        due = time.time() + 5
        handle = await task(broker, "started_at").with_labels(eta=due).kiq("durable")
        return handle.task_id, due

    async def result(broker: Any, task_id: str) -> Any:
        from pool.extensions.handles import PoolTask

        return await PoolTask(task_id, broker.result_backend).wait_result(timeout=20)

    with control_pool(1) as first:
        task_id, due = asyncio.run(with_broker(first, send))
        first.signal(signal.SIGKILL)
        first.wait()
        with control_pool(1, run_dir=first.run_dir) as second:
            ready = time.time()  # a loaded machine may start the new pool after the due time
            ran = asyncio.run(with_broker(second, lambda b: result(b, task_id))).return_value
            assert due <= ran <= max(due, ready) + LOOSE
            assert [tag for tag, _ in starts(first) + starts(second)] == ["durable"]


def test_a_retry_with_a_delay_waits_for_it() -> None:
    async def body(broker: Any) -> Any:
        kick = task(broker, "fails_twice").with_labels(retry_on_error=True, max_retries=3)
        handle = await kick.kiq("retry")
        return (await handle.wait_result(timeout=20)).return_value

    with control_pool() as pool:
        assert asyncio.run(with_broker(pool, body)) == 3
        times = [when for _, when in starts(pool)]
        assert len(times) == 3
        for before, after in itertools.pairwise(times):
            assert after - before >= 0.4  # SmartRetryMiddleware's default_delay


# ------------------------------------------------------------------ priority
def test_a_higher_priority_starts_sooner() -> None:
    async def body(broker: Any) -> None:
        blocker = await task(broker, "sleep_then_mark").kiq("blocker", 0.5)
        handles = [
            await task(broker, "started_at").with_labels(priority=p).kiq(f"p{p}")
            for p in (0, 3, 1, 5, 2)
        ]
        handles.append(await task(broker, "started_at").kiq("plain"))
        await blocker.wait_result(timeout=10)
        for handle in handles:
            await handle.wait_result(timeout=10)

    with control_pool(1, ["--max-async-tasks", "1"]) as pool:
        asyncio.run(with_broker(pool, body))
        assert [tag for tag, _ in starts(pool)] == ["p5", "p3", "p2", "p1", "p0", "plain"]


def test_a_low_priority_task_catches_up_as_it_waits() -> None:
    """Aging (control_app: 0.2 s per level): a priority-0 task that waited 0.7 s goes
    before a priority-2 task sent then (0.4 s ahead), after a priority-5 one (1 s ahead)."""

    async def body(broker: Any) -> None:
        blocker = await task(broker, "sleep_then_mark").kiq("blocker", 1.5)
        low = await task(broker, "started_at").kiq("low")
        await asyncio.sleep(0.7)  # the wait being measured, not a synchronisation
        two = await task(broker, "started_at").with_labels(priority=2).kiq("p2")
        five = await task(broker, "started_at").with_labels(priority=5).kiq("p5")
        for handle in (blocker, low, two, five):
            await handle.wait_result(timeout=10)

    with control_pool(1, ["--max-async-tasks", "1"]) as pool:
        asyncio.run(with_broker(pool, body))
        assert [tag for tag, _ in starts(pool)] == ["p5", "low", "p2"]


# ------------------------------------------------------------------ deduplication
def test_a_task_id_sent_again_while_queued_runs_once_and_each_handle_gets_its_result() -> None:
    async def body(broker: Any) -> list[Any]:
        blocker = await task(broker, "sleep_then_mark").kiq("blocker", 0.3)
        kick = task(broker, "started_at").with_task_id("the-same-id")
        handles = [await kick.kiq("once") for _ in range(3)]
        await blocker.wait_result(timeout=10)
        return [(await h.wait_result(timeout=10)).return_value for h in handles]

    with control_pool(1, ["--max-async-tasks", "1"]) as pool:
        results = asyncio.run(with_broker(pool, body))
        assert len(set(results)) == 1
        assert [tag for tag, _ in starts(pool)] == ["once"]


def test_a_dedup_key_queued_or_running_is_not_queued_again() -> None:
    async def body(broker: Any) -> tuple[list[Any], Any]:
        kick = task(broker, "sleep_then_mark").with_labels(dedup_key="report-42")
        first = await kick.kiq("first", 0.5)
        second = await kick.kiq("second", 0.5)  # another task id, the same key
        assert second.task_id != first.task_id
        results = [(await h.wait_result(timeout=10)).return_value for h in (first, second)]
        third = await kick.kiq("third", 0)  # the first one is done: this one runs
        return results, (await third.wait_result(timeout=10)).return_value

    with control_pool() as pool:
        results, third = asyncio.run(with_broker(pool, body))
        assert results == ["first", "first"]
        assert third == "third"
        assert not pool.mark_path("started-second").exists()


def test_cancelling_a_duplicate_leaves_the_task_it_joined_running() -> None:
    from pool import TaskCancelledError

    async def body(broker: Any) -> tuple[Any, Any, Any]:
        kick = task(broker, "sleep_then_mark").with_labels(dedup_key="once")
        first = await kick.kiq("first", 0.5)
        second = await kick.kiq("second", 0.5)
        answer = await second.cancel()
        results = [await h.wait_result(timeout=10) for h in (first, second)]
        return answer, *results

    with control_pool() as pool:
        answer, first, second = asyncio.run(with_broker(pool, body))
        assert answer.cancelled
        assert first.return_value == "first"
        assert isinstance(second.error, TaskCancelledError)


def test_a_finished_task_id_sent_again_runs_again_with_dedup_off() -> None:
    async def once(broker: Any, labels: dict[str, Any]) -> Any:
        kick = task(broker, "started_at").with_task_id("again").with_labels(**labels)
        return (await (await kick.kiq("x")).wait_result(timeout=10)).return_value

    with control_pool() as pool:
        # each from a producer of its own (a producer keeps the results it got)
        first, same, rerun = (
            asyncio.run(with_broker(pool, lambda b, labels=labels: once(b, labels)))
            for labels in ({}, {}, {"dedup": False})
        )
        assert first == same  # the default: that task id's result
        assert rerun > first
        assert len(starts(pool)) == 2


# ------------------------------------------------------------------ cancel
def test_a_cancelled_queued_task_never_starts_and_its_producer_is_told() -> None:
    from pool import TaskCancelledError

    async def body(broker: Any) -> tuple[Any, Any, Any]:
        blocker = await task(broker, "sleep_then_mark").kiq("blocker", 0.5)
        queued = await task(broker, "sleep_then_mark").kiq("queued", 0)
        delayed = await task(broker, "sleep_then_mark").with_labels(delay=0.3).kiq("later", 0)
        answers = (await queued.cancel(), await broker.cancel(delayed.task_id))
        results = [await h.wait_result(timeout=10) for h in (queued, delayed)]
        return answers, results, (await blocker.wait_result(timeout=10)).return_value

    with control_pool(1, ["--max-async-tasks", "1"]) as pool:
        answers, results, blocker = asyncio.run(with_broker(pool, body))
        assert [(a.cancelled, a.state) for a in answers] == [(True, "queued")] * 2
        for result in results:
            assert result.is_err and isinstance(result.error, TaskCancelledError)
        assert blocker == "blocker"
        assert not pool.mark_path("started-queued").exists()
        assert not pool.mark_path("started-later").exists()


def test_a_running_async_task_gets_cancelled_error_and_its_worker_lives_on() -> None:
    from pool import TaskCancelledError

    async def body(broker: Any, pool: RunningPool) -> tuple[Any, Any]:
        handle = await task(broker, "sleep_then_mark").kiq("running", 30)
        await asyncio.to_thread(pool.wait_mark, "started-running")
        answer = await handle.cancel()
        return answer, await handle.wait_result(timeout=10)

    with control_pool(1) as pool:
        pids = pool.worker_pids()
        answer, result = asyncio.run(with_broker(pool, lambda b: body(b, pool)))
        assert (answer.cancelled, answer.state) == (True, "running")
        assert isinstance(result.error, TaskCancelledError)
        assert pool.wait_mark("cancelled-running") == str(pids[0])
        assert pool.worker_pids() == pids
        assert pool.stats()["totals"]["tasks_failed"] == 0


@pytest.mark.parametrize("name", ["sync_sleep_then_mark", "block_loop"])
def test_a_running_sync_task_or_blocked_loop_is_stopped_by_replacing_its_worker(
    name: str,
) -> None:
    from pool import TaskCancelledError

    async def body(broker: Any, pool: RunningPool) -> tuple[Any, Any, Any]:
        stuck = await task(broker, name).kiq("stuck", 60)
        await asyncio.to_thread(pool.wait_mark, "started-stuck")
        other = await task(broker, "sleep_then_mark").kiq("other", 0.5)
        if name == "sync_sleep_then_mark":  # the other task is running beside it
            await asyncio.to_thread(pool.wait_mark, "started-other")
        answer = await stuck.cancel()
        return answer, await stuck.wait_result(timeout=20), await other.wait_result(timeout=20)

    with control_pool(1, ["--max-async-tasks", "2"]) as pool:
        first = pool.worker_pids()
        answer, stuck, other = asyncio.run(with_broker(pool, lambda b: body(b, pool)))
        assert answer.cancelled and isinstance(stuck.error, TaskCancelledError)
        assert other.return_value == "other"  # ran again on the replacement, unblamed
        stats = pool.wait_ready(1)
        assert [w["pid"] for w in stats["workers"]] != first
        assert stats["totals"]["restarts"] == 0
        assert stats["totals"]["tasks_failed"] == 0
        assert not pool.mark_path("finished-stuck").exists()


def test_cancelling_a_finished_or_unknown_task_says_so() -> None:
    async def body(broker: Any) -> list[Any]:
        done = await task(broker, "started_at").kiq("done")
        await done.wait_result(timeout=10)
        return [await done.cancel(), await broker.cancel("no-such-task")]

    with control_pool() as pool:
        finished, unknown = asyncio.run(with_broker(pool, body))
        assert (finished.cancelled, finished.state) == (False, "finished")
        assert (unknown.cancelled, unknown.state) == (False, "unknown")
        assert not finished and "already finished" in finished.detail


def test_the_cli_cancels_a_task() -> None:
    import subprocess
    import sys

    async def send(broker: Any) -> str:
        return (await task(broker, "sleep_then_mark").with_labels(delay=30).kiq("cli", 0)).task_id

    with control_pool() as pool:
        task_id = asyncio.run(with_broker(pool, send))
        command = [sys.executable, "-m", "pool", "cancel", task_id, "--run-dir", pool.run_dir]
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, env=pool.env)
        assert done.returncode == 0, done.stderr
        assert "cancelled before it started" in done.stdout
        again = subprocess.run(command, capture_output=True, text=True, timeout=30, env=pool.env)
        assert again.returncode == 1
        assert "already finished" in again.stdout


# ------------------------------------------------------------------ hard time limits
def test_a_sync_task_past_its_timeout_is_stopped_by_replacing_its_worker() -> None:
    from pool import TaskiqError, TaskTimeLimitError

    async def body(broker: Any, pool: RunningPool) -> tuple[Any, Any, float]:
        sent = time.monotonic()
        slow = await task(broker, "sync_sleep_then_mark").with_labels(timeout=0.5).kiq("slow", 60)
        await asyncio.to_thread(pool.wait_mark, "started-slow")
        other = await task(broker, "sleep_then_mark").kiq("other", 1)
        result = await slow.wait_result(timeout=20)
        took = time.monotonic() - sent
        return result, await other.wait_result(timeout=20), took

    with control_pool(1, ["--max-async-tasks", "2"]) as pool:
        first = pool.worker_pids()
        slow, other, took = asyncio.run(with_broker(pool, lambda b: body(b, pool)))
        assert isinstance(slow.error, TaskTimeLimitError)
        assert isinstance(slow.error, TaskiqError)
        assert "timeout of 0.5 s" in str(slow.error)
        assert took >= 0.5
        assert other.return_value == "other"
        stats = pool.wait_ready(1)
        assert [w["pid"] for w in stats["workers"]] != first
        assert stats["totals"]["restarts"] == 0
        assert not pool.mark_path("finished-slow").exists()


def test_an_async_task_past_its_timeout_gets_taskiqs_timeout_and_its_worker_lives_on() -> None:
    async def body(broker: Any) -> Any:
        handle = await task(broker, "sleep_then_mark").with_labels(timeout=0.3).kiq("slow", 30)
        return await handle.wait_result(timeout=20)

    with control_pool(1) as pool:
        pids = pool.worker_pids()
        result = asyncio.run(with_broker(pool, body))
        assert isinstance(result.error, TimeoutError)
        assert pool.worker_pids() == pids


def test_an_async_task_blocking_its_loop_past_its_timeout_has_its_worker_replaced() -> None:
    from pool import TaskTimeLimitError

    async def body(broker: Any) -> Any:
        handle = await task(broker, "block_loop").with_labels(timeout=0.3).kiq("blocked", 60)
        return await handle.wait_result(timeout=20)

    with control_pool(1) as pool:
        pids = pool.worker_pids()
        result = asyncio.run(with_broker(pool, body))
        assert isinstance(result.error, TaskTimeLimitError)
        assert [w["pid"] for w in pool.wait_ready(1)["workers"]] != pids


# ------------------------------------------------------------------ concurrency and rate limits
def test_a_concurrency_limit_holds_pool_wide_under_200_concurrent_sends() -> None:
    """control_app: ``broker.limit(send_email, concurrency=5)``; 4 workers with room for 100
    tasks each; the tasks count their concurrent runs themselves."""

    async def body(broker: Any) -> list[Any]:
        kick = task(broker, "send_email")
        handles = await asyncio.gather(*(kick.kiq(f"user{i}") for i in range(200)))
        return [(await h.wait_result(timeout=60)).return_value for h in handles]

    with control_pool(4, ["--max-async-tasks", "100"]) as pool:
        results = asyncio.run(with_broker(pool, body))
        assert sorted(results) == sorted(f"user{i}" for i in range(200))
        now, peak = json.loads(pool.mark_path("count-send_email").read_text())
        assert now == 0
        assert peak == 5
        assert {w["tasks_done"] > 0 for w in pool.stats()["workers"]} == {True}


def test_a_rate_limit_per_key_holds_over_five_seconds_and_other_keys_go_on() -> None:
    """control_app: ``charge`` has ``rate_limit="10/s", limit_key="customer_id"``."""

    async def body(broker: Any) -> None:
        kick = task(broker, "charge").with_labels(rate_limit="10/s", limit_key="customer_id")
        handles = [await kick.kiq(customer_id="a", amount=i) for i in range(50)]
        handles += [await kick.kiq("b", amount=i) for i in range(10)]  # positional: the name
        for handle in handles:
            assert not (await handle.wait_result(timeout=30)).is_err

    with control_pool(4, ["--max-async-tasks", "100"]) as pool:
        asyncio.run(with_broker(pool, body))
        charges = starts(pool, "charges")
        a = sorted(when for who, when in charges if who == "a")
        b = sorted(when for who, when in charges if who == "b")
        assert len(a) == 50 and len(b) == 10
        # at most 10 starts in any second (a start is measured a little after its dispatch)
        for first, eleventh in zip(a, a[10:], strict=False):
            assert eleventh - first >= 1 - TOLERANCE
        assert a[-1] - a[0] >= 4 - TOLERANCE  # five windows of ten
        assert b[-1] - b[0] < 1  # b has a limit of its own


# ------------------------------------------------------------------ the parts, alone
def test_the_queue_serves_redelivered_then_by_priority_with_aging() -> None:
    from pool.runtime.taskqueue import Entry, TaskQueue

    queue = TaskQueue(100, aging=10.0)
    for name, priority in (("a", 0), ("b", 2), ("c", 0), ("d", 1)):
        queue.put(Entry(name, "t", b"", control={"priority": priority} if priority else None))
    queue.put_front(Entry("again", "t", b""))
    gone = Entry("gone", "t", b"", control={"priority": 9})
    queue.put(gone)
    assert queue.remove(gone)
    assert [queue.pop().task_id for _ in range(5)] == ["again", "b", "d", "a", "c"]
    old = Entry("old", "t", b"")
    queue.put(old)
    old.rank -= 30  # it waited 30 s: three levels at 10 s a level
    queue.put(Entry("two", "t", b"", control={"priority": 2}))
    queue.put(Entry("four", "t", b"", control={"priority": 4}))
    assert [queue.pop().task_id for _ in range(3)] == ["four", "old", "two"]
    assert not queue


def test_taskcontrol_reads_the_labels_and_refuses_bad_ones() -> None:
    from taskiq import BrokerMessage

    from pool.runtime.taskcontrol import control_of, parse_eta, parse_rate

    def message(**labels: Any) -> BrokerMessage:
        return BrokerMessage(task_id="1", task_name="t", message=b"{}", labels=labels)

    assert control_of(message()) is None
    assert control_of(message(other="x")) is None
    control = control_of(message(delay="2", priority="3", dedup_key="k", timeout="1.5"))
    assert control is not None
    assert control["eta"] > time.time() + 1.9
    assert (control["priority"], control["dedup"], control["timeout"]) == (3, "t:k", 1.5)
    assert parse_rate("10/s") == (10, 1.0)
    assert parse_rate("100/5m") == (100, 300.0)
    assert parse_rate(7) == (7, 1.0)
    assert parse_eta("1970-01-01T00:01:00") == 60.0
    for bad in ("ten/s", "0/s", "5/0s"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    with pytest.raises(ValueError):
        control_of(message(concurrency="0"))
