"""The pool for real: a supervisor subprocess, worker processes, the manager server, pipes."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
from pathlib import Path
from typing import Any

import psutil
import pytest
from taskiq import AsyncTaskiqTask

from pool import (
    PoolBroker,
    SendTaskError,
    TaskiqResultTimeoutError,
    TaskNotFoundError,
    UnknownTaskError,
    WorkerCrashedError,
)
from pool.runtime.rundir import RunDir
from tests.pool_support import (
    Restarts,
    RunningPool,
    call,
    kicker,
    until,
    wait_for,
    wait_for_gone,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def pool2():
    with RunningPool(workers=2) as running:
        yield running


async def test_tasks_run_on_every_worker_and_results_come_back(pool2: RunningPool) -> None:
    broker = pool2.broker()
    handles = [await kicker(broker, "whoami").kiq() for _ in range(40)]
    pids = {(await h.wait_result(timeout=30)).raise_for_error().return_value for h in handles}
    assert pids == set(pool2.worker_pids())
    assert (await call(broker, "add", 2, 3)).return_value == 5
    stats = pool2.stats()
    assert stats["totals"]["tasks_done"] >= 41
    assert stats["throughput"]["last_10s"] > 0
    await broker.shutdown()


async def test_failed_task_gives_error_result_and_counts_as_failed(pool2: RunningPool) -> None:
    broker = pool2.broker()
    result = await call(broker, "fail", "boom")
    assert result.is_err
    assert isinstance(result.error, ValueError)
    assert "boom" in str(result.error)
    assert pool2.stats()["totals"]["tasks_failed"] == 1
    await broker.shutdown()


async def test_state_is_shared_by_three_workers() -> None:
    with RunningPool(workers=3) as running:
        broker = running.broker()
        await call(broker, "set_value", "config", {"debug": True, "n": 3})
        seen = {}
        for _ in range(30):
            value, pid = (await call(broker, "get_value", "config")).return_value
            seen[pid] = value
        assert set(seen) == set(running.worker_pids())
        assert all(value == {"debug": True, "n": 3} for value in seen.values())
        # WORKER_STARTUP ran once per worker, on the same shared state
        assert (await call(broker, "get_value", "workers_started")).return_value[0] == 3
        await broker.shutdown()


async def test_incr_is_exact_from_four_workers() -> None:
    with RunningPool(workers=4) as running:
        broker = running.broker()
        handles = [await kicker(broker, "incr_many").kiq("hits", 2500) for _ in range(4)]
        pids = [(await h.wait_result(timeout=60)).raise_for_error().return_value for h in handles]
        assert len(set(pids)) == 4, "each worker should have taken one of the four tasks"
        assert (await call(broker, "get_value", "hits")).return_value[0] == 10_000
        await broker.shutdown()


async def test_unpicklable_value_stays_in_its_worker(pool2: RunningPool) -> None:
    broker = pool2.broker()
    is_shared, listed, _pid = (await call(broker, "local_client_info")).return_value
    assert is_shared is False
    assert listed is True
    await broker.shutdown()


async def test_worker_killed_mid_task_the_task_completes_on_another(pool2: RunningPool) -> None:
    broker = pool2.broker()
    release = pool2.mark_path("release")
    handle = await kicker(broker, "block_until").kiq(str(release), "victim")
    victim = int(pool2.wait_mark("running-victim"))
    pool2.mark_path("running-victim").unlink()
    os.kill(victim, signal.SIGKILL)
    rerun_on = int(pool2.wait_mark("running-victim"))
    assert rerun_on != victim
    release.touch()
    result = await handle.wait_result(timeout=30)
    assert result.return_value == ["victim", rerun_on]
    stats = pool2.wait_ready(2)
    assert stats["totals"]["restarts"] >= 1
    assert victim not in [w["pid"] for w in stats["workers"]]
    await broker.shutdown()


async def test_poison_task_fails_after_killing_three_workers(pool2: RunningPool) -> None:
    broker = pool2.broker()
    result = await call(broker, "poison", timeout=60)
    assert result.is_err
    assert isinstance(result.error, WorkerCrashedError)
    assert "3 times" in str(result.error)
    assert (await call(broker, "add", 1, 1)).return_value == 2
    await broker.shutdown()


async def test_unknown_task_gives_error_result_naming_it(pool2: RunningPool) -> None:
    broker = pool2.broker()
    result = await call(broker, "no_such_task")
    assert result.is_err
    assert isinstance(result.error, TaskNotFoundError)
    assert isinstance(result.error, UnknownTaskError)  # taskiq's class for it
    assert "pool_test_app:no_such_task" in str(result.error)
    assert (await call(broker, "add", 1, 2)).return_value == 3
    await broker.shutdown()


async def test_kiq_without_a_pool_names_the_run_directory(tmp_path: Path) -> None:
    broker = PoolBroker(run_dir=tmp_path / "nothing-here")
    with pytest.raises(SendTaskError, match="nothing-here"):
        await kicker(broker, "add").kiq(1, 2)


async def test_wait_result_times_out(pool2: RunningPool) -> None:
    broker = pool2.broker()
    handle = await kicker(broker, "block_until").kiq(str(pool2.mark_path("never")), "t", 5.0)
    with pytest.raises(TaskiqResultTimeoutError):
        await handle.wait_result(timeout=0.3)
    await broker.shutdown()


async def test_a_confirmation_rides_with_the_result_or_comes_alone_soon() -> None:
    """The supervisor confirms a task with the next frame to its producer (a lone task's
    result: one wake-up of the producer for both) or within ``CONFIRM_DELAY`` alone (50 ms
    here, so that a loaded machine's round trips still fit in it)."""
    with RunningPool(workers=2, env={"POOL_CONFIRM_DELAY": "0.05"}) as running:
        await _confirmations(running)


async def _confirmations(running: RunningPool) -> None:
    broker = running.broker()
    client = await broker.connection()
    reads = 0
    frames: list[tuple[int, str]] = []  # (read, frame type) as the producer received them
    data_received, frame_received = client.data_received, client.frame_received

    def count_read(data: bytes) -> None:
        nonlocal reads
        reads += 1
        data_received(data)

    def note(frame: object) -> None:
        frames.append((reads, type(frame).__name__))
        frame_received(frame)  # type: ignore[arg-type]

    client.data_received = count_read  # type: ignore[method-assign]
    client.frame_received = note  # type: ignore[method-assign]
    for _ in range(20):
        await call(broker, "noop")
    together = [read for read, kind in frames if kind == "Result" and (read, "Accepted") in frames]
    # sent at once, a confirmation would mostly come alone, before the task even ran
    assert len(together) >= 15, f"results read with their confirmation: {frames}"
    # a task that runs on: its confirmation does not wait for its result
    handle = await kicker(broker, "block_until").kiq(str(running.mark_path("go")), "t", 30.0)
    await until(lambda: not broker._unconfirmed, 5, "the confirmation of a running task")
    assert not broker.pool_results._stored(handle.task_id)
    running.mark_path("go").write_text("")
    assert (await handle.wait_result(timeout=30)).raise_for_error().return_value
    await broker.shutdown()


def test_supervisor_sigkill_leaves_no_process_behind() -> None:
    running = RunningPool(workers=2).start()
    try:
        assert running.proc is not None
        children = psutil.Process(running.proc.pid).children(recursive=True)
        assert len(children) >= 3  # two workers and the state server
        pids = {c.pid for c in children}
        running.proc.kill()
        running.proc.wait(10)
        assert wait_for_gone(pids, 10) == []
    finally:
        running.close()


def test_failing_startup_handler_stops_the_pool_with_its_error() -> None:
    running = RunningPool(workers=2, env={"POOL_TEST_FAIL_STARTUP": "1"}).start(wait_ready=False)
    try:
        code = running.wait(60)
        assert code != 0
        log = running.log()
        assert "database unreachable (test)" in log
        assert "no worker could start" in log
    finally:
        running.close()


def test_a_startup_handler_that_never_returns_is_a_failed_start() -> None:
    running = RunningPool(
        workers=1, env={"POOL_TEST_HANG_STARTUP": "1"}, extra=["--startup-timeout", "0.5"]
    ).start(wait_ready=False)
    try:
        code = running.wait(60)
        assert code == 3
        log = running.log()
        assert "WORKER_STARTUP did not finish in 0.5 s" in log
        assert "no worker could start" in log
    finally:
        running.close()


async def test_a_worker_stuck_at_shutdown_is_killed_and_the_exit_status_says_so() -> None:
    running = RunningPool(workers=1, extra=["--wait-tasks-timeout", "0.5"]).start()
    try:
        broker = PoolBroker(run_dir=running.run_dir, connect_timeout=0.5)
        await kicker(broker, "block_loop_once").kiq("stuck", 30.0)
        running.wait_mark("blocked-stuck")  # its worker's event loop is blocked from now on
        running.signal(signal.SIGTERM)
        assert running.wait(60) == 1
        assert "did not stop in time" in running.log()
    finally:
        running.close()


async def test_graceful_shutdown_drains_in_flight_tasks_and_fires_worker_shutdown() -> None:
    running = RunningPool(workers=2).start()
    try:
        broker = running.broker()
        worker_pids = running.worker_pids()
        handles = [await kicker(broker, "sleep_then_mark").kiq(0.5, f"drain{i}") for i in range(4)]
        for i in range(4):
            running.wait_mark(f"running-drain{i}")
        running.signal(signal.SIGTERM)
        results = [await h.wait_result(timeout=30) for h in handles]
        assert [r.return_value for r in results] == [f"drain{i}" for i in range(4)]
        assert running.wait(30) == 0
        for pid in worker_pids:
            assert running.mark_path(f"shutdown-{pid}").exists(), f"no WORKER_SHUTDOWN in {pid}"
        await broker.shutdown()
    finally:
        running.close()


async def test_a_second_stop_signal_stops_at_once() -> None:
    with RunningPool(workers=1) as running:
        broker = running.broker()
        release = running.mark_path("never")
        await kicker(broker, "block_until").kiq(str(release), "stuck", 60)
        running.wait_mark("running-stuck")
        running.signal(signal.SIGTERM)
        wait_for(lambda: "graceful shutdown" in running.log(), 10, "the first signal logged")
        running.signal(signal.SIGTERM)
        assert running.wait(15) == 1, "forced stop: the stuck task is not waited for"
        await broker.shutdown()


@pytest.mark.parametrize("journal", [[], ["--no-journal"]], ids=["journal", "no-journal"])
async def test_unstarted_tasks_survive_a_graceful_restart(journal: list[str]) -> None:
    extra = ["--max-async-tasks", "1", "--wait-tasks-timeout", "1", *journal]
    with Restarts() as pools:
        first = pools.start(extra=extra)
        release = Path(pools.run_dir) / "release"  # outlives the first pool's marks
        broker = first.broker()
        blocker = await kicker(broker, "block_until").kiq(str(release), "held")
        first.wait_mark("running-held")
        waiting = [await kicker(broker, "add").kiq(i, i) for i in range(5)]
        wait_for(lambda: first.stats()["totals"]["queued"] == 5, 10, "5 queued tasks")
        # with --no-journal nothing is written while the pool runs
        assert RunDir.at(pools.run_dir).spool_file.exists() == (not journal)
        assert first.stop() == 0
        await broker.shutdown()
        first.close()
        assert RunDir.at(pools.run_dir).spool_file.exists()
        release.touch()
        second = pools.start()
        broker = second.broker()
        assert (await blocker.wait_result(timeout=30)).return_value[0] == "held"
        # the handles made before the restart still find their results
        for i, handle in enumerate(waiting):
            handle.result_backend = broker.result_backend
            assert (await handle.wait_result(timeout=30)).return_value == 2 * i
        await broker.shutdown()


async def test_garbage_on_every_socket_does_not_hurt_the_pool(pool2: RunningPool) -> None:
    rd = RunDir.at(pool2.run_dir)
    payloads = [
        b"\x00\x01garbage that is not a frame",
        struct.pack("!IB", 1 << 31, 2),  # oversized length
        struct.pack("!IB", 50, 2) + b"short",  # truncated, then closed
        os.urandom(4096),
    ]
    for path in (rd.control_socket, rd.state_socket):
        for payload in payloads:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(5)
                sock.connect(str(path))
                try:
                    sock.sendall(payload)
                    sock.recv(1024)
                except OSError:
                    pass
    # an authenticated connection sending malformed frames keeps working
    from pool.runtime.client import connect
    from pool.runtime.protocol import Op, encode

    client = await connect(pool2.run_dir)
    client.send_raw(encode(Op.KICK, b"only-one-field"))
    client.send_raw(encode(Op.REQUEST, b"{not json"))
    client.send_raw(encode(99, b"x"))
    reply = await client.request({"cmd": "ping"}, timeout=10)
    assert reply["ok"] is True
    client.close()
    broker = pool2.broker()
    assert (await call(broker, "add", 20, 22)).return_value == 42
    assert len(pool2.stats()["workers"]) == 2
    await broker.shutdown()


async def test_spawn_start_method_shares_state() -> None:
    with RunningPool(workers=2, extra=["--start-method", "spawn"]) as running:
        broker = running.broker()
        await call(broker, "set_value", "spawned", 7)
        handles = [await kicker(broker, "get_value").kiq("spawned") for _ in range(10)]
        values = [(await h.wait_result(timeout=30)).return_value for h in handles]
        assert {v[0] for v in values} == {7}
        assert {v[1] for v in values} == set(running.worker_pids())
        await broker.shutdown()


async def test_full_queue_makes_kiq_wait(tmp_path: Path) -> None:
    extra = ["--max-async-tasks", "1", "--queue-size", "10"]
    with RunningPool(workers=1, extra=extra) as running:
        broker = running.broker()
        release = running.mark_path("release")
        blocker = await kicker(broker, "block_until").kiq(str(release), "b")
        running.wait_mark("running-b")
        total = 20_000

        async def flood() -> list[object]:
            return [await kicker(broker, "noop").kiq() for _ in range(total)]

        sender = asyncio.create_task(flood())
        deadline = asyncio.get_running_loop().time() + 20
        while running.stats()["totals"]["queued"] < 10:
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        await asyncio.wait({sender}, timeout=1.0)
        assert not sender.done(), "kiq should wait while the queue is full"
        # the producer's own commands do not wait behind its tasks
        reply = await broker.request({"cmd": "stats"}, timeout=10)
        assert reply["stats"]["totals"]["queued"] >= 10
        queued = running.stats()["totals"]["queued"]
        assert queued < total
        release.touch()
        handles = await asyncio.wait_for(sender, 60)
        await blocker.wait_result(timeout=30)
        await handles[-1].wait_result(timeout=60)
        await broker.shutdown()


def test_a_producer_that_exits_right_after_kiq_loses_nothing() -> None:
    """kiq returns once the task is in the kernel, so exiting at once loses no task."""
    import subprocess
    import sys

    # a small queue: the supervisor stops reading while it is full, so the producer's
    # writes back up into its own buffers
    with RunningPool(workers=1, extra=["--queue-size", "20", "--max-async-tasks", "1"]) as running:
        producer = (
            "import asyncio\n"
            "from pool import PoolBroker\n"
            "from pool.extensions.handles import PoolKicker\n"
            f"broker = PoolBroker(run_dir={running.run_dir!r})\n"
            "async def main():\n"
            "    kick = PoolKicker('pool_test_app:count_run', broker, {})\n"
            "    for i in range(3000):\n"
            "        await kick.kiq('x' * 2000 + str(i))\n"
            "asyncio.run(main())\n"  # no shutdown: the process just ends
        )
        done = subprocess.run([sys.executable, "-c", producer], timeout=60, cwd=running.run_dir)
        assert done.returncode == 0
        stats = wait_for(
            lambda: (s := running.stats())["totals"]["tasks_done"] >= 3000 and s, 60, "3000 runs"
        )
        assert stats["totals"]["tasks_done"] == 3000


async def test_tasks_that_shared_a_worker_with_a_poison_task_are_not_blamed() -> None:
    """5 worker-killing tasks among 600: exactly those 5 fail; every other task succeeds."""
    with RunningPool(workers=2, extra=["--max-async-tasks", "20"]) as running:
        broker = running.broker()
        handles = []
        for i in range(600):
            if i % 120 == 60:
                handles.append(("poison", await kicker(broker, "poison").kiq()))
            else:
                handles.append(("ok", await kicker(broker, "count_run").kiq(f"p{i}")))
        results = [(kind, await h.wait_result(timeout=90)) for kind, h in handles]
        poisoned = [r for kind, r in results if kind == "poison"]
        innocent = [r for kind, r in results if kind == "ok"]
        assert all(isinstance(r.error, WorkerCrashedError) for r in poisoned)
        blamed = [r for r in innocent if r.is_err]
        assert blamed == [], f"{len(blamed)} innocent task(s) failed: {blamed[:3]}"
        assert len(innocent) == 595
        await broker.shutdown()


async def test_tasks_held_by_a_supervisor_killed_with_sigkill_run_in_the_next_pool() -> None:
    """SIGKILL the supervisor with 2,000 tasks sent: the next pool on its run dir runs them all
    and every waiting handle gets its result (at least once: some may run twice)."""
    with Restarts() as pools:
        first = pools.start(extra=["--max-async-tasks", "2"])
        broker = first.broker()
        handles = [await kicker(broker, "count_run").kiq(f"k{i}") for i in range(2000)]
        assert first.stats()["totals"]["queued"] > 0  # most are still waiting
        first.signal(signal.SIGKILL)
        first.proc.wait(10)  # type: ignore[union-attr]
        first.close()  # its workers and state server exit on their own (checked)
        pools.start(workers=2)
        results = [await h.wait_result(timeout=60) for h in handles]
        lost = [r for r in results if r.is_err or r.return_value < 1]
        assert lost == []
        await broker.shutdown()


async def _held_results_outlast_newer_ones(
    second: RunningPool, gate: Path, held: list[AsyncTaskiqTask[Any]]
) -> None:
    """Open the gate the held tasks wait at, run 100 other tasks to their end on the pool
    ``second`` (which keeps only its newest 20 results), then every held handle's result."""
    gate.touch()
    other = second.broker()
    others = [await kicker(other, "count_run").kiq(f"o{i}") for i in range(100)]
    assert not [r for r in [await h.wait_result(timeout=30) for h in others] if r.is_err]
    await other.shutdown()
    results = [await h.wait_result(timeout=10) for h in held]
    lost = [r for r in results if r.is_err]
    assert lost == [], f"{len(lost)} of 3 results lost"


async def test_handles_not_waited_on_through_a_restart_still_get_their_results() -> None:
    """The producer holds 3 handles of confirmed tasks, waits on none, and the pool is
    SIGKILLed: it reconnects to the next pool at once and asks for their results, so they
    reach it though that pool keeps only its newest 20 results and 100 others finish after
    them. (A task not yet confirmed is sent again instead, and its result comes unasked.)"""
    extra = ["--max-stored-results", "20"]
    with Restarts() as pools:
        gate = Path(pools.run_dir) / "open"
        first = pools.start(extra=extra)
        broker = PoolBroker(run_dir=pools.run_dir, connect_timeout=20)
        held = [await kicker(broker, "block_until").kiq(str(gate), f"h{i}") for i in range(3)]
        # the confirmation may come up to POOL_CONFIRM_DELAY after the tasks
        await until(lambda: not broker._unconfirmed, 10, "the pool to confirm the 3 tasks")
        first.wait_mark("running-h0")
        first.signal(signal.SIGKILL)
        first.proc.wait(10)  # type: ignore[union-attr]
        first.close()
        second = pools.start(extra=extra)
        awaited = second.stats
        await until(lambda: awaited()["results_awaited"] == 3, 20, "the producer to ask again")
        await _held_results_outlast_newer_ones(second, gate, held)
        await broker.shutdown()


async def test_unconfirmed_handles_through_a_restart_still_get_their_results() -> None:
    """The pool is SIGKILLed before it confirms the 3 tasks (its confirmation delay is 30 s):
    the producer sends them again to the next pool, which has them from its journal already,
    runs each once more and pushes its result to the producer unasked, though it keeps only
    its newest 20 results and 100 others finish after them."""
    extra = ["--max-stored-results", "20"]
    with Restarts() as pools:
        gate = Path(pools.run_dir) / "open"
        first = pools.start(extra=extra, env={"POOL_CONFIRM_DELAY": "30"})
        broker = PoolBroker(run_dir=pools.run_dir, connect_timeout=20)
        held = [await kicker(broker, "block_until").kiq(str(gate), f"h{i}") for i in range(3)]
        first.wait_mark("running-h0")
        assert len(broker._unconfirmed) == 3
        first.signal(signal.SIGKILL)
        first.proc.wait(10)  # type: ignore[union-attr]
        first.close()
        second = pools.start(extra=extra)
        await until(lambda: not broker._unconfirmed, 20, "the next pool to confirm them")
        totals = second.stats()["totals"]  # each task once: the journal's and the resent
        assert totals["queued"] + totals["in_flight"] == 3
        await _held_results_outlast_newer_ones(second, gate, held)
        await broker.shutdown()


async def test_a_waiting_producer_learns_when_the_pool_is_gone() -> None:
    from pool import PoolUnavailableError

    with RunningPool(workers=1) as running:
        broker = PoolBroker(run_dir=running.run_dir, connect_timeout=1.0)
        release = running.marks / "never"
        handle = await kicker(broker, "block_until").kiq(str(release), "stuck")
        running.wait_mark("running-stuck")
        running.signal(signal.SIGKILL)
        with pytest.raises(PoolUnavailableError, match=running.run_dir):
            await asyncio.wait_for(handle.wait_result(), 20)  # no timeout of its own
        await broker.shutdown()


async def test_tasks_sent_while_the_pool_stops_run_in_the_next_pool() -> None:
    """A producer keeps sending while the pool shuts down gracefully: every task it sent
    runs, in this pool or (confirmed or sent again) in the next one on the same run dir."""
    with Restarts() as pools:
        first = pools.start(extra=["--max-async-tasks", "2"])
        broker = PoolBroker(run_dir=pools.run_dir, connect_timeout=20)
        handles = [await kicker(broker, "count_run").kiq(f"s{i}") for i in range(200)]
        first.signal(signal.SIGTERM)
        # go on sending while it stops (kiq waits, or its tasks wait to be sent again)
        sending = asyncio.ensure_future(
            asyncio.gather(*(kicker(broker, "count_run").kiq(f"t{i}") for i in range(300)))
        )
        assert first.proc.wait(30) == 0  # type: ignore[union-attr]
        pools.start(workers=2)
        handles += await asyncio.wait_for(sending, 30)
        results = [await h.wait_result(timeout=60) for h in handles]
        assert [r for r in results if r.is_err or r.return_value < 1] == []
        await broker.shutdown()


async def test_the_death_of_the_state_server_stops_the_pool_loudly_and_keeps_its_tasks() -> None:
    """SIGKILL of the state server: the pool says so and exits 5 at once (no worker starts
    one by one against a dead server), and its queued tasks run in the next pool."""
    with Restarts() as pools:
        first = pools.start(extra=["--max-async-tasks", "1", "--wait-tasks-timeout", "1"])
        release = Path(pools.run_dir) / "release"
        broker = first.broker()
        blocker = await kicker(broker, "block_until").kiq(str(release), "held")
        first.wait_mark("running-held")
        queued = [await kicker(broker, "add").kiq(i, 1) for i in range(5)]
        wait_for(lambda: first.stats()["totals"]["queued"] == 5, 10, "5 queued tasks")
        workers = set(first.worker_pids())
        supervisor = psutil.Process(first.proc.pid)  # type: ignore[union-attr]
        (state_server,) = [c for c in supervisor.children() if c.pid not in workers]
        state_server.kill()
        assert first.wait(30) == 5
        log = first.log()
        assert "shared state server" in log and "killed by signal 9" in log
        assert "failed to start" not in log
        release.touch()
        pools.start()
        for i, handle in enumerate(queued):
            handle.result_backend = broker.result_backend
            assert (await handle.wait_result(timeout=30)).return_value == i + 1
        blocker.result_backend = broker.result_backend
        assert (await blocker.wait_result(timeout=30)).return_value[0] == "held"
        await broker.shutdown()


def test_stats_answer_while_the_state_server_is_frozen() -> None:
    """The state's key count is read off the supervisor's loop: a stopped state server
    does not freeze ``pool stats`` (it shows the last count)."""
    with RunningPool(workers=1) as running:
        workers = set(running.worker_pids())
        supervisor = psutil.Process(running.proc.pid)  # type: ignore[union-attr]
        (state_server,) = [c for c in supervisor.children() if c.pid not in workers]
        wait_for(lambda: running.stats()["state"]["keys"] >= 0, 10, "a first key count")
        state_server.suspend()
        try:
            for _ in range(3):  # spans health rounds; each request times out after 10 s
                assert running.stats()["workers"]
        finally:
            state_server.resume()


async def test_a_task_that_outlives_every_stop_is_not_run_again_without_bound() -> None:
    """A task still running when each stop's wait runs out is delivered again, up to
    --max-task-failures (3) times in all; then its producer gets an error result."""
    extra = ["--wait-tasks-timeout", "0.3"]
    with Restarts() as pools:
        never = os.path.join(pools.run_dir, "never")
        broker = PoolBroker(run_dir=pools.run_dir)
        for run in range(3):
            running = pools.start(extra=extra)
            if run == 0:
                handle = await kicker(broker, "block_until").kiq(never, "forever", 600)
            running.wait_mark("running-forever")
            assert running.stop() == 0
        assert "giving up" in running.log()
        last = pools.start(extra=extra)
        result = await handle.wait_result(timeout=30)
        assert isinstance(result.error, WorkerCrashedError)
        assert "still running when its worker's stop timed out" in str(result.error)
        assert not last.mark_path("running-forever").exists(), "not run a fourth time"
        await broker.shutdown()


async def test_requests_through_a_pool_restart_all_succeed() -> None:
    """A web app's pattern: each request sends a task and waits for its result. A stop
    and start of the pool on the same run directory in the middle fails none of them
    (kiq and wait_result reconnect within the broker's connect_timeout)."""
    failures: list[str] = []
    with Restarts() as pools:
        first = pools.start(workers=2)
        broker = PoolBroker(run_dir=pools.run_dir, connect_timeout=20)

        async def web_request(i: int) -> None:
            try:
                handle = await kicker(broker, "add").kiq(i, 1)
                result = await handle.wait_result(timeout=30)
                if result.is_err or result.return_value != i + 1:
                    failures.append(f"{i}: {result.error or result.return_value}")
            except Exception as exc:  # what a web handler would turn into a 500
                failures.append(f"{i}: {type(exc).__name__}: {exc}")

        requests = []
        for i in range(600):
            requests.append(asyncio.ensure_future(web_request(i)))
            if i == 200:
                first.signal(signal.SIGTERM)
            if i == 300:
                await asyncio.get_running_loop().run_in_executor(None, first.wait, 30)
                pools.start(workers=2, wait_ready=False)
            await asyncio.sleep(0.002)  # requests keep arriving while the pool restarts
        await asyncio.wait_for(asyncio.gather(*requests), 60)
        assert failures == []
        await broker.shutdown()
