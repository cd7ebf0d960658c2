"""Running a real pool in a subprocess for a test, and checking it leaves nothing behind."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import psutil
from taskiq.exceptions import SendTaskError

from pool import PoolBroker
from pool.extensions.handles import PoolKicker
from pool.runtime.client import request

ROOT = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"
APP = "pool_test_app"


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


async def until(predicate: Callable[[], Any], timeout: float, what: str = "condition") -> Any:
    """``wait_for`` for a test whose event loop must keep running (a producer on it)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


class Restarts:
    """Pools started one after another on one run directory, as a restart does:
    ``with Restarts() as pools: first = pools.start(...)``. At the end every pool is closed
    and the directory removed."""

    def __init__(self) -> None:
        self.run_dir = tempfile.mkdtemp(prefix="pl-", dir="/tmp")
        self.pools: list[RunningPool] = []

    def start(
        self,
        workers: int = 1,
        extra: list[str] | None = None,
        wait_ready: bool = True,
        env: dict[str, str] | None = None,
    ) -> RunningPool:
        running = RunningPool(workers=workers, extra=extra, env=env, run_dir=self.run_dir)
        self.pools.append(running)
        return running.start(wait_ready=wait_ready)

    def __enter__(self) -> Restarts:
        return self

    def __exit__(self, *exc: object) -> None:
        for running in self.pools:
            running.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)


class RunningPool:
    """``python -m pool run`` in a subprocess with its own short run directory."""

    def __init__(
        self,
        workers: int = 2,
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
        app: str = f"{APP}:broker",
        run_dir: str | None = None,
    ) -> None:
        self.owns_run_dir = run_dir is None
        self.run_dir = run_dir or tempfile.mkdtemp(prefix="pl-", dir="/tmp")
        self.marks = Path(tempfile.mkdtemp(prefix="pm-", dir="/tmp"))
        self.workers = workers
        self.args = [
            sys.executable, "-m", "pool", "run", app, "--workers", str(workers),
            "--run-dir", self.run_dir, "--log-level", "INFO", *(extra or []),
        ]  # fmt: skip
        self.env = {
            **os.environ,
            "POOL_TEST_MARKS": str(self.marks),
            "PYTHONPATH": os.pathsep.join([str(APPS), str(ROOT)]),
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen: set[int] = set()
        self.log_path = self.marks / "pool.log"

    # ----------------------------------------------------------------- lifecycle
    def start(self, wait_ready: bool = True) -> RunningPool:
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.args, cwd=str(APPS), env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        if wait_ready:
            self.wait_ready(self.workers)
        return self

    def wait_ready(self, count: int, timeout: float = 30.0) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"pool exited early ({self.proc.returncode}):\n{self.log()}")
            try:
                stats = self.stats()
            except SendTaskError:
                return None
            states = [w["state"] for w in stats["workers"]]
            return stats if states.count("ready") == count and len(states) == count else None

        return wait_for(ready, timeout, f"{count} ready workers")

    def stats(self) -> dict[str, Any]:
        stats = run_sync(request({"cmd": "stats"}, self.run_dir, 10))["stats"]
        self.remember(stats)
        return stats

    def remember(self, stats: dict[str, Any]) -> None:
        self.seen.update(w["pid"] for w in stats["workers"])
        if self.proc is not None:
            try:
                self.seen.update(c.pid for c in psutil.Process(self.proc.pid).children(True))
            except psutil.Error:
                pass

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.stats()["workers"]]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 40.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            try:
                self.stats()
            except Exception:
                pass
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float = 40.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"pool did not stop in {timeout} s:\n{self.log()}") from None

    def close(self) -> None:
        """Kill whatever is left, then fail if any process of the pool survived."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.seen.update(c.pid for c in psutil.Process(self.proc.pid).children(True))
            except psutil.Error:
                pass
            self.proc.kill()
            self.proc.wait(10)
        if hasattr(self, "_log"):
            self._log.close()
        survivors = wait_for_gone(self.seen, 10)
        log = self.log() if survivors else ""
        shutil.rmtree(self.marks, ignore_errors=True)
        if self.owns_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        for pid in survivors:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        assert not survivors, f"orphaned processes left behind: {survivors}\n{log}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    # ----------------------------------------------------------------- tasks
    def broker(self) -> PoolBroker:
        return PoolBroker(run_dir=self.run_dir)

    def mark_path(self, name: str) -> Path:
        return self.marks / name

    def wait_mark(self, name: str, timeout: float = 20.0) -> str:
        path = self.mark_path(name)
        wait_for(path.exists, timeout, f"mark {name}")
        return wait_for(lambda: path.read_text(), timeout, f"content of {name}")

    def __enter__(self) -> RunningPool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_sync(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run ``coro`` to completion, also from inside a running event loop (on a thread)."""
    with concurrent.futures.ThreadPoolExecutor(1) as executor:
        return executor.submit(asyncio.run, coro).result()


def wait_for_gone(pids: set[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        alive = [pid for pid in pids if _alive(pid)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kicker(broker: PoolBroker, task: str) -> PoolKicker[Any, Any]:
    return PoolKicker(f"{APP}:{task}", broker, {})


async def call(
    broker: PoolBroker, task: str, *args: Any, timeout: float = 30, **kwargs: Any
) -> Any:
    """Send a task by name and return its result."""
    handle = await kicker(broker, task).kiq(*args, **kwargs)
    return await handle.wait_result(timeout=timeout)


def dumps(value: Any) -> str:
    return json.dumps(value, indent=1)
