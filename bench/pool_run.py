"""Start a real ``pool run`` in a subprocess for a benchmark, and stop it."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


class BenchPool:
    """``run_dir`` given: it is the caller's (kept); ``log``: the pool's output goes there."""

    def __init__(
        self,
        workers: int,
        app: str = "bench.apps:broker",
        *extra: str,
        run_dir: str | None = None,
        env: dict[str, str] | None = None,
        log: Path | None = None,
    ) -> None:
        self.owns_run_dir = run_dir is None
        self.run_dir = run_dir or tempfile.mkdtemp(prefix="pb-", dir="/tmp")
        self.workers = workers
        self.args = [sys.executable, "-m", "pool", "run", app, "--workers", str(workers),
                     "--run-dir", self.run_dir, "--log-level", "WARNING", *extra]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = env or {}
        self.log = log

    async def stats(self) -> dict[str, Any]:
        from pool.runtime.client import request

        return (await request({"cmd": "stats"}, self.run_dir, 10))["stats"]

    async def __aenter__(self) -> BenchPool:
        from taskiq.exceptions import SendTaskError

        from pool.runtime.signals import parent_death_signal

        env = {**os.environ, "PYTHONPATH": str(ROOT), **self.env}
        out = open(self.log, "ab") if self.log is not None else None  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                self.args,
                cwd=str(ROOT),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
                # a benchmark killed before it stops its pool leaves no pool behind to
                # share the machine with the next measurement: SIGTERM drains and exits
                preexec_fn=parent_death_signal(signal.SIGTERM),
            )
        finally:
            if out is not None:
                out.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                stats = await self.stats()
                if sum(w["state"] == "ready" for w in stats["workers"]) == self.workers:
                    return self
            except SendTaskError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"pool exited with {self.proc.returncode}")
            await asyncio.sleep(0.05)
        raise RuntimeError("pool not ready in 60 s")

    async def __aexit__(self, *exc: object) -> None:
        assert self.proc is not None
        stop(self.proc)
        if self.owns_run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def stop(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 30 s; always reaped."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
