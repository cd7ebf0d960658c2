"""Live scaling, recycling, hung workers, rolling restarts, stats and metrics of a real pool."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from pool import AsyncKicker
from tests.pool_support import ROOT, RunningPool, call, kicker, wait_for

pytestmark = pytest.mark.timeout(120)


def pool_cli(
    running: RunningPool, *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pool", *args, "--run-dir", running.run_dir],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(ROOT),
        env=running.env,
    )


def ready_pids(stats: dict[str, Any]) -> set[int]:
    return {w["pid"] for w in stats["workers"] if w["state"] == "ready"}


def startups(running: RunningPool) -> set[int]:
    return {int(p.name.split("-")[1]) for p in running.marks.glob("startup-*")}


def shutdowns(running: RunningPool) -> set[int]:
    return {int(p.name.split("-")[1]) for p in running.marks.glob("shutdown-*")}


def test_scale_command_grows_and_shrinks_with_lifecycle_events() -> None:
    with RunningPool(workers=1) as running:
        first = set(running.worker_pids())
        done = pool_cli(running, "scale", "3")
        assert done.returncode == 0, done.stderr
        assert "3 worker(s) ready" in done.stdout
        stats = running.stats()
        assert len(ready_pids(stats)) == 3 and stats["target_workers"] == 3
        assert ready_pids(stats) <= startups(running), "WORKER_STARTUP ran in each new worker"

        done = pool_cli(running, "scale", "1")
        assert done.returncode == 0, done.stderr
        remaining = running.wait_ready(1)
        gone = ready_pids(stats) - ready_pids(remaining)
        assert len(gone) == 2
        wait_for(lambda: gone <= shutdowns(running), 20, "WORKER_SHUTDOWN in drained workers")
        assert first | ready_pids(stats) >= ready_pids(remaining)


def test_signals_add_and_remove_one_worker() -> None:
    with RunningPool(workers=2) as running:
        running.signal(signal.SIGTTIN)
        running.wait_ready(3)
        running.signal(signal.SIGTTOU)
        running.wait_ready(2)  # signals of one kind sent at once may merge into one
        running.signal(signal.SIGTTOU)
        stats = running.wait_ready(1)
        assert stats["target_workers"] == 1
        wait_for(lambda: len(shutdowns(running)) == 2, 20, "two WORKER_SHUTDOWN marks")


def test_scale_reports_why_workers_cannot_start(tmp_path: Path) -> None:
    switch = tmp_path / "fail"
    with RunningPool(workers=1, env={"POOL_TEST_FAIL_STARTUP_IF": str(switch)}) as running:
        switch.touch()
        done = pool_cli(running, "scale", "2", "--timeout", "30")
        assert done.returncode != 0
        assert "cache unreachable" in done.stderr
        assert len(ready_pids(running.stats())) == 1, "the running worker keeps serving"


async def test_scale_down_loses_no_task_and_runs_none_twice() -> None:
    with RunningPool(workers=4, extra=["--max-async-tasks", "4"]) as running:
        broker = running.broker()
        handles = [await kicker(broker, "count_run").kiq(f"t{i}") for i in range(400)]
        done = pool_cli(running, "scale", "1")
        assert done.returncode == 0, done.stderr
        results = [await h.wait_result(timeout=60) for h in handles]
        assert all(not r.is_err for r in results)
        assert [r.return_value for r in results] == [1] * 400, "each task ran exactly once"
        await broker.shutdown()


async def test_autoscale_grows_under_a_backlog_and_shrinks_when_idle() -> None:
    extra = ["--autoscale", "1,3", "--autoscale-idle", "1", "--max-async-tasks", "1"]
    with RunningPool(workers=1, extra=extra) as running:
        broker = running.broker()
        release = running.mark_path("release")
        handles = [await kicker(broker, "block_until").kiq(str(release), f"b{i}") for i in range(6)]
        wait_for(lambda: running.stats()["target_workers"] == 3, 30, "autoscale up to 3")
        running.wait_ready(3)
        release.touch()
        for handle in handles:
            assert not (await handle.wait_result(timeout=30)).is_err
        wait_for(lambda: running.stats()["target_workers"] == 1, 40, "autoscale down to 1")
        running.wait_ready(1)
        assert "autoscale: 1 -> 2" in running.log()
        await broker.shutdown()


async def test_worker_is_recycled_after_max_tasks() -> None:
    with RunningPool(workers=1, extra=["--max-tasks-per-child", "5"]) as running:
        broker = running.broker()
        pids = [(await call(broker, "whoami")).return_value for _ in range(12)]
        counts = {pid: pids.count(pid) for pid in set(pids)}
        assert len(counts) >= 3
        assert max(counts.values()) <= 5
        first = pids[0]
        wait_for(lambda: first in shutdowns(running), 20, "WORKER_SHUTDOWN of the recycled one")
        await broker.shutdown()


async def test_worker_is_recycled_when_its_memory_grows() -> None:
    with RunningPool(workers=1, extra=["--max-memory-per-child", "120"]) as running:
        broker = running.broker()
        hog_pid = (await call(broker, "hog", 150)).return_value
        stats = wait_for(
            lambda: (
                (s := running.stats())["workers"]
                and hog_pid not in {w["pid"] for w in s["workers"]}
                and s
            ),
            30,
            "the grown worker replaced",
        )
        assert len(ready_pids(stats)) == 1
        assert "MiB > 120 MiB" in running.log()
        assert (await call(broker, "add", 2, 2)).return_value == 4
        await broker.shutdown()


async def test_a_worker_with_a_blocked_loop_is_replaced_and_its_task_redelivered() -> None:
    with RunningPool(workers=2, extra=["--worker-timeout", "2"]) as running:
        broker = running.broker()
        result = await call(broker, "block_loop_once", "x", 60, timeout=60)
        assert not result.is_err
        blocked = int(running.mark_path("blocked-x").read_text())
        assert result.return_value != blocked, "the redelivered run happened elsewhere"
        log = running.log()
        assert "sent no heartbeat" in log and "block_loop_once" in log
        running.wait_ready(2)
        await broker.shutdown()


def write_versioned_app(folder: Path, version: int) -> None:
    (folder / "reload_app.py").write_text(
        textwrap.dedent(
            f"""
            from pool import PoolBroker
            broker = PoolBroker()

            @broker.task(task_name="version")
            def version() -> int:
                return {version}
            """
        )
    )


async def test_sighup_reloads_code_without_dropping_below_target(tmp_path: Path) -> None:
    write_versioned_app(tmp_path, 1)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    with RunningPool(workers=2, app="reload_app:broker", env=env) as running:
        broker = running.broker()
        assert (
            await (await AsyncKicker("version", broker, {}).kiq()).wait_result(timeout=30)
        ).return_value == 1
        before = set(running.worker_pids())
        write_versioned_app(tmp_path, 2)
        running.signal(signal.SIGHUP)
        lowest = 2

        def replaced() -> bool:
            nonlocal lowest
            stats = running.stats()
            lowest = min(lowest, len(ready_pids(stats)))
            pids = {w["pid"] for w in stats["workers"]}
            return len(ready_pids(stats)) == 2 and not pids & before

        wait_for(replaced, 30, "every worker replaced")
        assert lowest >= 2, "ready workers dropped below the target during the restart"
        assert (
            await (await AsyncKicker("version", broker, {}).kiq()).wait_result(timeout=30)
        ).return_value == 2
        await broker.shutdown()


def test_stats_json_and_table() -> None:
    with RunningPool(workers=2) as running:
        done = pool_cli(running, "stats", "--json")
        assert done.returncode == 0, done.stderr
        stats = json.loads(done.stdout)
        assert {"pid", "uptime_s", "target_workers", "workers", "totals", "state"} <= set(stats)
        assert {"last_10s", "last_1m"} == set(stats["throughput"])
        row_fields = {
            "id", "pid", "state", "uptime_s", "tasks_done", "tasks_failed",
            "in_flight", "rss_bytes", "cpu_percent", "restarts",
        }  # fmt: skip
        assert all(row_fields <= set(row) for row in stats["workers"])
        assert all(row["rss_bytes"] > 0 for row in stats["workers"])
        assert {"tasks_done", "tasks_failed", "in_flight", "queued", "restarts"} == set(
            stats["totals"]
        )
        table = pool_cli(running, "stats")
        assert table.returncode == 0 and "total" in table.stdout


def test_stats_without_a_pool_fails_clearly(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pool", "stats", "--run-dir", str(tmp_path / "none")],
        capture_output=True, text=True, timeout=30, cwd=str(ROOT),
    )  # fmt: skip
    assert done.returncode == 1
    assert "none" in done.stderr


async def test_metrics_endpoint_counts_tasks_across_worker_restarts() -> None:
    with RunningPool(workers=2, extra=["--metrics-port", "0"]) as running:
        broker = running.broker()
        url = running.stats()["metrics_url"]
        assert url.startswith("http://127.0.0.1:")
        for i in range(5):
            await call(broker, "add", i, i)
        await call(broker, "fail", "x")
        victim = running.worker_pids()[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(
            lambda: victim not in ready_pids(s := running.wait_ready(2)) and s,
            30,
            "the killed worker replaced",
        )

        def scrape() -> str:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.read().decode()

        body = scrape()
        assert 'pool_tasks_total{status="success",task_name="pool_test_app:add"} 5.0' in body
        assert 'pool_tasks_total{status="error",task_name="pool_test_app:fail"} 1.0' in body
        assert 'pool_workers{state="ready"} 2.0' in body
        assert "pool_task_duration_seconds_bucket" in body
        assert "pool_worker_restarts_total 1.0" in body
        await broker.shutdown()


def test_metrics_beyond_loopback_require_the_token() -> None:
    extra = ["--metrics-port", "0", "--metrics-addr", "0.0.0.0"]
    with RunningPool(workers=1, extra=extra) as running:
        url = running.stats()["metrics_url"].replace("0.0.0.0", "127.0.0.1")
        token_file = Path(running.run_dir) / "metrics.token"
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=5)
        assert refused.value.code == 401
        request = urllib.request.Request(
            url, headers={"Authorization": f"Bearer {token_file.read_text()}"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert "pool_workers" in response.read().decode()


def test_stats_watch_refreshes_until_interrupted() -> None:
    with RunningPool(workers=1) as running:
        watcher = subprocess.Popen(
            [sys.executable, "-m", "pool", "stats", "--watch", "--json",
             "--run-dir", running.run_dir],
            stdout=subprocess.PIPE, text=True, cwd=str(ROOT), env=running.env,
        )  # fmt: skip
        try:
            assert watcher.stdout is not None
            first = json.loads(watcher.stdout.readline())
            second = json.loads(watcher.stdout.readline())
            assert second["uptime_s"] > first["uptime_s"]
            watcher.send_signal(signal.SIGINT)
            assert watcher.wait(10) == 0
        finally:
            if watcher.poll() is None:
                watcher.kill()
                watcher.wait(10)


async def test_a_worker_whose_memory_runs_away_is_stopped_far_below_where_it_would_go() -> None:
    """A task adds 20 MB every 20 ms up to 1.2 GB under a 150 MB limit: the worker is
    replaced past the limit and killed past twice the limit, long before 1.2 GB."""
    extra = ["--max-memory-per-child", "150", "--wait-tasks-timeout", "30"]
    with RunningPool(workers=1, extra=extra) as running:
        broker = running.broker()
        first = running.worker_pids()[0]
        await kicker(broker, "balloon").kiq(20, 60)
        wait_for(lambda: first not in running.worker_pids(), 30, "the ballooning worker gone")
        log = running.log()
        assert "times the limit; killing it" in log
        reached = int(running.wait_mark("balloon-rss"))
        assert reached < 600 * 2**20, f"it reached {reached / 2**20:.0f} MiB"
        await broker.shutdown()
