"""Seeing the pool: worker logs, ``pool stats``, ``pool health`` and the probes, the metrics
server's bounds, and the task event stream (``pool.events``, ``pool events``)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

import pool
from pool.runtime.client import connect
from tests.pool_support import ROOT, RunningPool, run_sync, wait_for

pytestmark = pytest.mark.timeout(90)

APP = "observe_app:broker"


def observe_pool(workers: int = 2, extra: list[str] | None = None, **kw: Any) -> RunningPool:
    return RunningPool(workers=workers, app=APP, extra=extra, **kw)


async def send(
    running: RunningPool, task: str, *args: Any, timeout: float = 30, **labels: Any
) -> Any:
    from pool.extensions.handles import PoolKicker

    broker = running.broker()
    await broker.startup()
    try:
        handle = await PoolKicker(f"observe_app:{task}", broker, labels).kiq(*args)
        return await handle.wait_result(timeout=timeout)
    finally:
        await broker.shutdown()


async def send_many(running: RunningPool, task: str, count: int) -> list[Any]:
    from pool.extensions.handles import PoolKicker

    broker = running.broker()
    await broker.startup()
    try:
        kicker = PoolKicker(f"observe_app:{task}", broker, {})
        handles = [await kicker.kiq() for _ in range(count)]
        return [await h.wait_result(timeout=60) for h in handles]
    finally:
        await broker.shutdown()


def pool_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pool", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=str(ROOT),
    )


def log_lines(running: RunningPool, needle: str) -> list[str]:
    return [line for line in running.log_path.read_text().splitlines() if needle in line]


class Events:
    """``pool.events(run_dir)`` consumed on a thread of its own, into ``items``."""

    def __init__(self, running: RunningPool) -> None:
        self.running = running
        self.items: list[dict[str, Any]] = []
        self.error: BaseException | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task[None] | None = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.task = asyncio.current_task()  # type: ignore[assignment]
        try:
            async for item in pool.events(self.running.run_dir):
                self.items.append(item)
        except asyncio.CancelledError:
            pass
        except BaseException as exc:
            self.error = exc
            raise

    def __enter__(self) -> Events:
        self.thread.start()
        wait_for(lambda: self.running.stats()["event_subscribers"] >= 1, 20, "a subscriber")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.error is None, self.error
        if self.thread.is_alive() and self.loop is not None and self.task is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)
        self.thread.join(10)
        assert not self.thread.is_alive()

    def of(self, kind: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in list(self.items)
            if e["event"] == kind and all(e.get(k) == v for k, v in fields.items())
        ]

    def wait(self, kind: str, count: int = 1, **fields: Any) -> list[dict[str, Any]]:
        return wait_for(
            lambda: (found := self.of(kind, **fields)) and len(found) >= count and found,
            30,
            f"{count} {kind} event(s) {fields}",
        )


# ----------------------------------------------------------------- logs
def test_a_failing_task_logs_its_traceback_in_the_worker_with_its_name_and_id() -> None:
    with observe_pool(1) as running:
        result = run_sync(send(running, "fail", "boom-1"))
        assert result.is_err
        wait_for(lambda: "ValueError: boom-1" in running.log_path.read_text(), 10, "traceback")
        log = running.log_path.read_text()
        failed = [
            line for line in log.splitlines() if "failed" in line and "observe_app:fail" in line
        ]
        assert len(failed) == 1
        assert "[worker 0 " in failed[0] and "ERROR" in failed[0]
        after = log[log.index(failed[0]) :]
        assert "Traceback (most recent call last)" in after
        assert "raise ValueError(message)" in after
        assert "Exception found while executing function" not in log
        running.stop()


def test_every_line_a_worker_prints_carries_its_worker_id() -> None:
    with observe_pool(1) as running:
        pid = run_sync(send(running, "shout", "hello")).return_value
        wait_for(lambda: "lines" in running.log_path.read_text(), 10, "the prints")
        label = f"[worker 0 {pid}] "
        lines = running.log_path.read_text().splitlines()
        for text in ("out: hello", "err: hello", "two", "lines"):
            assert f"{label}{text}" in lines
        running.stop()


def test_a_drained_worker_exit_is_one_line_and_its_slot_is_not_reused_while_it_drains(
    tmp_path: Path,
) -> None:
    release = tmp_path / "release"
    with observe_pool(2) as running:

        async def hold_both() -> list[Any]:
            from pool.extensions.handles import PoolKicker

            broker = running.broker()
            await broker.startup()
            kicker = PoolKicker("observe_app:hold", broker, {})
            return [await kicker.kiq(str(release), tag) for tag in ("a", "b")]

        run_sync(hold_both())
        running.wait_mark("running-a")
        running.wait_mark("running-b")
        holders = {w["id"]: w["pid"] for w in running.stats()["workers"]}
        running.signal(signal.SIGTTOU)  # one of the busy workers drains, holding its task
        draining = wait_for(
            lambda: [w for w in running.stats()["workers"] if w["state"] == "draining"],
            20,
            "a draining worker",
        )[0]
        running.signal(signal.SIGTTIN)

        def replaced() -> list[dict[str, Any]]:
            workers = running.stats()["workers"]
            states = sorted(w["state"] for w in workers)
            return workers if states == ["draining", "ready", "ready"] else []

        workers = wait_for(replaced, 20, "a new worker beside the draining one")
        new = [w for w in workers if w["pid"] not in holders.values()]
        assert len(new) == 1 and new[0]["id"] not in holders  # a new slot, not the drainer's
        assert [w["pid"] for w in workers if w["id"] == draining["id"]] == [draining["pid"]]
        release.write_text("go")
        wait_for(
            lambda: log_lines(running, f"(pid {draining['pid']}) drained and exited"), 20, "exit"
        )
        about = log_lines(running, f"pid {draining['pid']}")
        assert [line for line in about if "starting" not in line and "ready" not in line] == [
            *log_lines(running, f"(pid {draining['pid']}) drained and exited (scaling down)")
        ]
        running.stop()


def test_a_worker_the_supervisor_kills_is_not_also_said_to_die_unexpectedly() -> None:
    with observe_pool(1, ["--worker-timeout", "1"]) as running:

        async def block() -> None:
            from pool.extensions.handles import PoolKicker

            broker = running.broker()
            await broker.startup()
            await PoolKicker("observe_app:block_loop", broker, {}).kiq(4.0)
            await broker.shutdown()

        run_sync(block())
        wait_for(lambda: log_lines(running, "killing it"), 20, "the kill")
        wait_for(lambda: running.stats()["totals"]["restarts"] == 1, 20, "the restart")
        running.wait_ready(1)
        assert not log_lines(running, "died unexpectedly")
        running.stop()


def test_three_quick_sigttin_add_three_workers() -> None:
    with observe_pool(1) as running:
        for _ in range(3):
            running.signal(signal.SIGTTIN)
            time.sleep(0.02)  # quick (a shell sending three kills), not within the same µs
        wait_for(lambda: log_lines(running, "scaling from 3 to 4"), 20, f"4:\n{running.log()}")
        stats = running.wait_ready(4)
        assert stats["target_workers"] == 4
        assert len(log_lines(running, "scaling from")) == 3
        running.stop()


def test_stats_fits_80_columns_one_line_per_worker_with_in_flight_current() -> None:
    with observe_pool(3) as running:
        results = run_sync(send_many(running, "noop", 2001))
        assert len(results) == 2001
        stats = running.stats()  # asked once every result has arrived
        assert stats["totals"]["in_flight"] == 0
        assert stats["totals"]["tasks_done"] == 2001
        shown = pool_cli("stats", "--run-dir", running.run_dir)
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.splitlines()
        assert max(len(line) for line in lines) <= 80
        assert "…" not in shown.stdout
        for worker in stats["workers"]:
            rows = [
                line
                for line in lines
                if line.split()[:2] == [str(worker["id"]), str(worker["pid"])]
            ]
            assert len(rows) == 1 and "ready" in rows[0]
        header = next(line for line in lines if "restarts" in line)
        assert header.split() == [
            "id",
            "pid",
            "state",
            "up",
            "done",
            "failed",
            "running",
            "RSS",
            "MiB",
            "CPU%",
            "restarts",
        ]
        running.stop()


# ----------------------------------------------------------------- health
def _http(url: str, token: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_health_and_probes_on_a_pool_up_degraded_and_gone() -> None:
    with observe_pool(1, ["--metrics-port", "0"]) as running:
        base = running.stats()["metrics_url"].removesuffix("/metrics")
        up = pool_cli("health", "--run-dir", running.run_dir)
        assert up.returncode == 0 and "ready: 1 of 1 worker(s) ready" in up.stdout
        assert _http(f"{base}/healthz") == (200, "ok\n")
        assert _http(f"{base}/readyz") == (200, "ready: 1 of 1 worker(s) ready\n")

        (running.marks / "fail-startup").write_text("")  # new workers now fail to start
        running.signal(signal.SIGTTIN)
        wait_for(lambda: running.stats()["failed_starts"] >= 1, 20, "a failed start")
        degraded = pool_cli("health", "--run-dir", running.run_dir)
        assert degraded.returncode == 1
        assert "not ready: 1 of 2 worker(s) ready; workers fail to start: RuntimeError: cache " in (
            degraded.stderr
        )
        status, text = _http(f"{base}/readyz")
        assert status == 503 and text.startswith("not ready: 1 of 2 worker(s) ready; workers fail")
        assert _http(f"{base}/healthz") == (200, "ok\n")  # degraded, still live

        (running.marks / "fail-startup").unlink()
        wait_for(lambda: pool_cli("health", "--run-dir", running.run_dir).returncode == 0, 30, "ok")
        assert running.stop() == 0
        gone = pool_cli("health", "--run-dir", running.run_dir, "--timeout", "1")
        assert gone.returncode == 3 and gone.stderr.startswith("not ready: no pool is running")
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"{base}/healthz", timeout=5)


def test_probes_beyond_loopback_need_the_token() -> None:
    extra = ["--metrics-port", "0", "--metrics-addr", "0.0.0.0"]
    with observe_pool(1, extra) as running:
        base = running.stats()["metrics_url"].replace("0.0.0.0", "127.0.0.1")
        base = base.removesuffix("/metrics")
        token = (Path(running.run_dir) / "metrics.token").read_text()
        wrong = "x" * len(token)
        for path in ("/healthz", "/readyz", "/metrics"):
            assert _http(f"{base}{path}")[0] == 401
            assert _http(f"{base}{path}", wrong)[0] == 401
            assert _http(f"{base}{path}", token)[0] == 200
        running.stop()


def test_the_metrics_server_closes_idle_connections_and_bounds_them() -> None:
    env = {"POOL_METRICS_IDLE_TIMEOUT": "1"}
    with observe_pool(1, ["--metrics-port", "0"], env=env) as running:
        url = running.stats()["metrics_url"]
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        supervisor = psutil.Process(running.proc.pid)  # type: ignore[union-attr]
        before = supervisor.num_threads()
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(50)]
        try:
            peak = 0
            deadline = time.monotonic() + 0.8  # less than the idle timeout
            while time.monotonic() < deadline:
                peak = max(peak, supervisor.num_threads() - before)
                time.sleep(0.02)
            assert 20 <= peak <= 32  # one thread per connection, at most MAX_CONNECTIONS
            for sock in idle:  # each is closed by the server (idle, or over the bound)
                assert sock.recv(1) == b""
            wait_for(lambda: supervisor.num_threads() <= before, 10, "threads gone")
            assert _http(url)[0] == 200
        finally:
            for sock in idle:
                sock.close()
        running.stop()


# ----------------------------------------------------------------- events
def test_the_event_stream_tells_each_task_and_worker_event(tmp_path: Path) -> None:
    with observe_pool(1) as running, Events(running) as events:
        ok = run_sync(send(running, "noop"))
        assert not ok.is_err
        bad = run_sync(send(running, "fail", "boom-2"))
        assert bad.is_err

        received = events.wait("received", 2)
        assert {e["task_name"] for e in received} == {"observe_app:noop", "observe_app:fail"}
        noop_id = next(e["task_id"] for e in received if e["task_name"] == "observe_app:noop")
        events.wait("succeeded", task_id=noop_id)
        started = events.of("started", task_id=noop_id)[0]
        assert started["worker"] == 0 and started["time"] > 0
        failed = events.wait("failed", task_name="observe_app:fail")[0]
        assert failed["error"] == "ValueError: boom-2" and failed["worker"] == 0
        assert "Traceback (most recent call last)" in failed["traceback"]
        assert "raise ValueError(message)" in failed["traceback"]
        succeeded = events.of("succeeded", task_id=noop_id)[0]
        for told in (succeeded, failed):  # in seconds, to the whole microsecond
            microseconds = told["duration"] * 1e6
            assert told["duration"] > 0 and abs(microseconds - round(microseconds)) < 1e-6

        running.signal(signal.SIGTTIN)
        up = events.wait("worker_up", worker=1)[0]
        running.signal(signal.SIGTTOU)
        gone = events.wait("worker_gone")[0]
        assert gone["reason"] == "drained" and gone["exitcode"] == 0
        assert gone["worker"] in (0, 1) and gone["pid"] > 0 and up["pid"] > 0
        running.stop()


def test_each_task_of_a_burst_is_told_received_started_succeeded_once_in_that_order() -> None:
    """The supervisor tells the task events of one turn of its loop as runs (one per kind,
    name and worker): however a burst is grouped, each task is told once of each kind, in
    the order they happened."""
    count = 500
    with observe_pool(2) as running, Events(running) as events:
        results = run_sync(send_many(running, "noop", count))
        assert not any(result.is_err for result in results)
        events.wait("succeeded", count)
        told: dict[str, list[str]] = {}
        for one in list(events.items):
            if "task_id" in one:
                told.setdefault(one["task_id"], []).append(one["event"])
        assert len(told) == count
        assert {tuple(kinds) for kinds in told.values()} == {("received", "started", "succeeded")}
        running.stop()


@pytest.mark.parametrize("ack", ["when_saved", "when_received"])
def test_a_retry_of_a_failed_task_is_told_as_retried(ack: str) -> None:
    # the retry has the attempt's task id: it is queued when the attempt ends, not taken for
    # a duplicate of it, whenever the attempt is acknowledged
    with observe_pool(1, ["--ack-type", ack]) as running, Events(running) as events:
        assert run_sync(send(running, "flaky", "t1", retry_on_error=True)).return_value == 2
        events.wait("succeeded", task_name="observe_app:flaky")
        flaky = [e for e in events.items if e.get("task_name") == "observe_app:flaky"]
        kinds = [e["event"] for e in flaky]
        assert kinds.count("received") == 2  # told by the supervisor, each time it is queued
        ran = [e for e in flaky if e["event"] != "received"]
        order = [e["event"] for e in ran]
        assert sorted(order) == ["failed", "retried", "started", "started", "succeeded"]
        # the supervisor tells the retry's start, the worker the attempt's failure: with
        # when_received the retry may start before the failure's event has arrived
        assert order.index("started") < order.index("failed")
        assert order[order.index("retried") + 1] == "started" and order[-1] == "succeeded"
        assert ran[order.index("retried")]["attempt"] == 1
        assert "RuntimeError: first run fails" in ran[order.index("failed")]["traceback"]
        assert len({e["task_id"] for e in flaky}) == 1
        running.stop()


def test_cancelled_tasks_are_told_as_cancelled() -> None:
    from pool.extensions.handles import PoolKicker

    with observe_pool(1, ["--max-async-tasks", "1"]) as running, Events(running) as events:

        async def body() -> None:
            broker = running.broker()
            await broker.startup()
            try:
                never = str(running.marks / "never")
                held = await PoolKicker("observe_app:hold", broker, {}).kiq(never, "c")
                waiting = await PoolKicker("observe_app:noop", broker, {}).kiq()
                await asyncio.get_running_loop().run_in_executor(
                    None, running.wait_mark, "running-c"
                )
                assert (await broker.cancel(waiting.task_id)).state == "queued"
                assert (await broker.cancel(held.task_id)).state == "running"
            finally:
                await broker.shutdown()

        run_sync(body())
        cancelled = events.wait("cancelled", 2)
        assert {e["task_name"] for e in cancelled} == {"observe_app:hold", "observe_app:noop"}
        assert {e["reason"] for e in cancelled} == {"before it started", "while it ran"}
        running.stop()


def test_a_crashed_worker_is_gone_with_its_reason() -> None:
    with observe_pool(1) as running, Events(running) as events:
        victim = running.stats()["workers"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        gone = events.wait("worker_gone", pid=victim)[0]
        assert gone["reason"] == "crashed" and gone["exitcode"] == -signal.SIGKILL
        events.wait("worker_up", worker=0)
        running.stop()


def test_a_slow_subscriber_drops_events_and_is_told_how_many() -> None:
    from pool.runtime import events as ev

    # more events than the socket's buffers, SUBSCRIBER_UNREAD and SUBSCRIBER_BUFFER hold
    tasks = 8000

    with observe_pool(2) as running:

        async def slow() -> tuple[int, int]:
            got: list[dict[str, Any]] = []
            client = await connect(running.run_dir)
            client.on_events = lambda body: got.extend(
                one for item in ev.decode_items(body) for one in ev.as_dicts(item)
            )
            reply = await client.request({"cmd": "events"}, 10)
            assert reply["ok"]
            assert client.transport is not None
            client.transport.pause_reading()  # reads nothing while 3 x tasks events happen
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: run_sync(send_many(running, "noop", tasks))
            )
            client.transport.resume_reading()
            await asyncio.sleep(0)
            deadline = time.monotonic() + 20

            def counts() -> tuple[int, int]:
                dropped = sum(e["count"] for e in got if e["event"] == "dropped")
                return len([e for e in got if e["event"] != "dropped"]), dropped

            while sum(counts()) < 3 * tasks and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            client.close()
            return counts()

        delivered, dropped = run_sync(slow())
        assert dropped > 0
        assert delivered + dropped == 3 * tasks  # each event either delivered or counted
        assert delivered < 3 * tasks - ev.SUBSCRIBER_BUFFER
        assert running.stats()["event_subscribers"] == 0  # forgotten once closed
        running.stop()


def test_pool_events_cli_prints_json_lines_and_text() -> None:
    with observe_pool(1) as running:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        args = [sys.executable, "-m", "pool", "events", "--run-dir", running.run_dir]
        procs = [
            subprocess.Popen([*args, "--json"], stdout=subprocess.PIPE, text=True, env=env),
            subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env),
        ]
        try:
            wait_for(lambda: running.stats()["event_subscribers"] == 2, 20, "two subscribers")
            run_sync(send(running, "fail", "boom-3"))
            as_json = [json.loads(procs[0].stdout.readline()) for _ in range(3)]  # type: ignore[union-attr]
            assert [e["event"] for e in as_json] == ["received", "started", "failed"]
            text = [procs[1].stdout.readline() for _ in range(4)]  # type: ignore[union-attr]
            assert " received " in text[0] and "observe_app:fail" in text[0]
            assert " failed " in text[2] and "ValueError: boom-3" in text[2]
            assert text[3].startswith("Traceback")
        finally:
            running.stop()
            for proc in procs:
                assert proc.wait(20) == 0  # the stream ends with the pool
                proc.stdout.close()  # type: ignore[union-attr]


def test_without_subscribers_workers_send_no_events() -> None:
    with observe_pool(1) as running:
        with Events(running) as events:
            run_sync(send(running, "noop"))
            events.wait("succeeded")
        wait_for(lambda: running.stats()["event_subscribers"] == 0, 20, "no subscriber")
        # the worker was told: a new subscriber sees only what happens after it subscribed
        run_sync(send(running, "noop"))
        with Events(running) as events:
            run_sync(send(running, "noop"))
            events.wait("succeeded")
            assert len(events.of("started")) == 1
        running.stop()


def test_started_events_carry_the_trace_of_taskiqs_opentelemetry_middleware() -> None:
    pytest.importorskip("opentelemetry.semconv")
    from opentelemetry import trace
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
    from taskiq.middlewares.opentelemetry_middleware import OpenTelemetryMiddleware

    from pool.extensions.handles import PoolKicker

    trace_id = 0x5EED_0000_0000_0000_0000_0000_0000_0001
    parent = SpanContext(trace_id, 0x1234, is_remote=False, trace_flags=TraceFlags(1))
    with RunningPool(workers=1, app="otel_app:broker") as running, Events(running) as events:

        async def traced() -> Any:
            broker = running.broker().with_middlewares(OpenTelemetryMiddleware())
            await broker.startup()
            try:
                with trace.use_span(NonRecordingSpan(parent)):
                    handle = await PoolKicker("otel_app:traced", broker, {}).kiq()
                return await handle.wait_result(timeout=30)
            finally:
                await broker.shutdown()

        in_task = run_sync(traced()).return_value
        started = events.wait("started", task_name="otel_app:traced")[0]
        assert started["trace_id"] == f"{trace_id:032x}" == in_task
        assert len(started["span_id"]) == 16
        running.stop()


@pytest.mark.parametrize(
    "task_id", ["0f3a5c2b9d8e4f7a", "ünïcödé", 'quote"and\\back', "ünï-cödé id", "a\nb"]
)
def test_the_supervisor_s_own_events_render_as_the_json_of_their_fields(task_id: str) -> None:
    from pool.runtime.events import render_lines

    def render(item: tuple) -> bytes:
        return render_lines([item])

    name = 'app:odd "name"'
    started = json.loads(render(("started", 1.25, name, 3, [task_id], [])))
    assert started == {
        "event": "started", "time": 1.25, "task_id": task_id, "task_name": name, "worker": 3
    }  # fmt: skip
    received = json.loads(render(("received", 2.5, name, None, [task_id], [])))
    assert received == {"event": "received", "time": 2.5, "task_id": task_id, "task_name": name}
    succeeded = json.loads(render(("succeeded", 3.0, name, 0, [task_id], [0.125])))
    assert succeeded["duration"] == 0.125 and succeeded["worker"] == 0
    assert b"\n" not in render(("started", 1.0, name, 1, [task_id], []))  # one event, one line


def test_a_flush_of_mixed_events_renders_each_as_its_own_line_in_order() -> None:
    """A run's events are rendered with one join: an id that needs escaping among plain ones,
    a worker's dict event between runs, a new time and a new name each keep every line whole
    and in order."""
    from pool.runtime.events import as_dicts, render_lines

    failed = {"event": "failed", "time": 2.0, "task_id": "x", "error": "E: é\n"}
    items: list = [("received", 1.0, "app:a", None, ["t0", "t1", 'odd "id"', "t2"], []), failed]
    items += [
        ("started", 1.0, "app:a", 0, ["t0", "t2"], []),
        ("started", 1.0, "app:a", 1, ["t1"], []),
    ]
    items += [("started", 1.5, "app:b", 0, ["t3"], [])]
    items += [("succeeded", 2.0, "app:a", 1, ["t0", "t1", "t2"], [0.0, 0.125, 2.5e-05])]
    told = [one for item in items for one in as_dicts(item)]
    lines = render_lines(items).decode().split("\n")
    assert [json.loads(line) for line in lines] == told
    assert [one["task_id"] for one in told if one["event"] == "succeeded"] == ["t0", "t1", "t2"]
    assert [one.get("worker") for one in told if one["event"] == "started"] == [0, 0, 1, 0]


def test_a_run_longer_than_a_frame_is_cut_into_frames_that_keep_every_event_in_order() -> None:
    from pool.runtime import events as ev

    ids = [f"t{i}" for i in range(ev.BATCH * 2 + 7)]
    items: list = [{"event": "worker_up", "time": 0.5, "worker": 0, "pid": 1}]
    items += [("succeeded", 1.0, "app:a", 0, ids, [i / 1e6 for i in range(len(ids))])]
    items += [("received", 1.0, "app:a", None, ["last"], [])]
    chunks = ev.Batch(items).chunks()
    assert [count for _, count in chunks] == [ev.BATCH, ev.BATCH, 9]
    told = [
        one for body, _ in chunks for item in ev.decode_items(body) for one in ev.as_dicts(item)
    ]
    assert told == [one for item in items for one in ev.as_dicts(item)]


def test_an_events_frame_decodes_to_its_events_and_as_pool_events_renders_them() -> None:
    """What the supervisor sends (marshalled items) comes back as it was; each event as a
    dict is exactly its JSON line parsed; a frame holding anything else is refused."""
    import marshal

    from pool.runtime import events as ev

    items: list = [
        ("received", 1.0, "app:a", None, ["t0", "t1"], []),
        ("started", 1.0, "app:a", 1, ["t0"], []),
        ("succeeded", 2.0, "app:a", 1, ["t0"], [0.25]),
        {"event": "worker_up", "time": 2.5, "worker": 0, "pid": 12},
    ]
    decoded = ev.decode_items(ev.encode_items(items))
    assert decoded == items
    assert [one for item in decoded for one in ev.as_dicts(item)] == [
        json.loads(line) for line in ev.render_lines(items).split(b"\n")
    ]
    refused = [{"event": "x"}, [("short",)], [compile("1", "f", "eval")], [{"no": "kind"}]]
    refused.append([items[0], ("short",)])
    refused.append([("started", 1.0, "app:a", 1, [], [])])  # a run of no event
    refused.append([("succeeded", 1.0, "app:a", 1, ["t0", "t1"], [0.5])])  # a duration short
    refused.append([("started", 1.0, "app:a", 1, ["t0", 7], [])])  # an id not a str
    refused.append([("weird", 1.0, "app:a", 1, ["t0"], [])])  # not a task event's kind
    for body in map(marshal.dumps, refused):
        with pytest.raises(ValueError, match="other than events"):
            ev.decode_items(body)
