"""A full disk under the journal, for real: the run directory on a 1 MiB tmpfs.

Mounting needs root (and a kernel that lets this process mount); otherwise these tests are
skipped and say why. Each test counts what was lost: every task whose ``kiq`` returned must
get a result, from this pool or from the next one on the same run directory.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from taskiq.exceptions import SendTaskError

from pool import PoolBroker
from pool.extensions.handles import PoolTask
from pool.runtime.journal import Journal
from tests.pool_support import RunningPool, kicker, until

pytestmark = pytest.mark.timeout(240)

PAD = "x" * 4000  # each task about 4 KiB in the journal: 1 MiB holds about 250
TOTAL = 1500


@contextmanager
def tiny_filesystem(size: str = "1m") -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted on a fresh directory, unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("a full disk needs a tiny filesystem: mounting a tmpfs needs root")
    mount = Path(tempfile.mkdtemp(prefix="pf-", dir="/tmp"))
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        mount.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        shutil.rmtree(mount, ignore_errors=True)


def grow(mount: Path, size: str) -> None:
    """Give the filesystem more room, keeping its files (the operator frees space)."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)


class Flood:
    """A producer sending ``TOTAL`` tasks of 4 KiB, keeping the handles ``kiq`` returned."""

    def __init__(self, broker: PoolBroker) -> None:
        self.broker = broker
        self.handles: list[Any] = []
        self.kiq_errors: list[str] = []
        self.task = asyncio.ensure_future(self._send())

    async def _send(self) -> None:
        for i in range(TOTAL):
            try:
                self.handles.append(await kicker(self.broker, "count_run").kiq(f"{PAD}{i}"))
            except SendTaskError:
                # the connection closed while kiq waited: the producer still holds the
                # task and sends it again; wait for its result like the others'
                task_id = self.broker._unconfirmed[-1][0]
                self.kiq_errors.append(task_id)
                self.handles.append(PoolTask(task_id, self.broker.result_backend))

    def kept_by_producer(self) -> set[str]:
        """Sent, not yet confirmed on the supervisor's disk: the producer sends them again."""
        return {task_id for task_id, _ in self.broker._unconfirmed}


async def fill_the_disk(running: RunningPool, broker: PoolBroker) -> tuple[Any, Flood]:
    """Block the only worker, then send until the journal cannot be written."""
    release = running.mark_path("release")
    blocker = await kicker(broker, "block_until").kiq(str(release), "b", 200.0)
    await until(running.mark_path("running-b").exists, 30, "the blocking task")
    flood = Flood(broker)
    await until(lambda: "cannot write the task journal" in full_log(running), 60, "a full journal")
    return blocker, flood


def full_log(running: RunningPool) -> str:
    return running.log_path.read_text(errors="replace")


def journal_ids(run_dir: Path) -> set[str]:
    live, _ = Journal(run_dir / "pending.tasks").replay()
    return {entry.task_id for entry in live}


async def results_of(handles: list[Any], timeout: float) -> tuple[list[Any], int]:
    """The results, and how many handles got none (lost) or an error."""
    got = await asyncio.gather(
        *(h.wait_result(timeout=timeout) for h in handles), return_exceptions=True
    )
    lost = sum(1 for r in got if isinstance(r, BaseException) or r.is_err)
    return got, lost


def assert_loud_and_clean(log: str, journal: Path) -> None:
    assert f"CRITICAL pool.runtime.journal: cannot write the task journal {journal}" in log, log
    assert "Traceback" not in log, log


async def test_a_full_disk_stops_kiq_and_loses_nothing_once_space_is_freed() -> None:
    with tiny_filesystem() as mount:
        run_dir = mount / "run"
        running = RunningPool(workers=1, run_dir=str(run_dir), extra=["--max-async-tasks", "1"])
        running.owns_run_dir = False
        with running:
            broker = PoolBroker(run_dir=run_dir, connect_timeout=30)
            blocker, flood = await fill_the_disk(running, broker)
            assert_loud_and_clean(full_log(running), run_dir / "pending.tasks")

            # kiq waits: what it returned for is on disk, or kept by the producer
            await asyncio.wait({flood.task}, timeout=1.0)
            assert not flood.task.done(), "kiq should wait while the journal cannot be written"
            returned = {h.task_id for h in flood.handles}
            on_disk = journal_ids(run_dir)
            kept = flood.kept_by_producer()
            assert returned - on_disk <= kept
            assert len(returned) < TOTAL

            # the operator frees space; the pool goes on by itself (its worker still busy)
            grow(mount, "64m")
            await until(
                lambda: "can be written again" in full_log(running), 30, "a writable journal"
            )
            await asyncio.wait_for(flood.task, 120)
            assert running.stats()["totals"]["queued"] >= TOTAL - 1  # none ran yet

            running.mark_path("release").touch()
            _, lost = await results_of([blocker, *flood.handles], 120)
            assert lost == 0, f"{lost} of {TOTAL + 1} task(s) lost"
            await broker.shutdown()
            assert not broker._unconfirmed
            assert running.stop() == 0
            assert "Traceback" not in full_log(running)


async def test_sigterm_at_full_disk_leaves_a_journal_the_next_run_reads() -> None:
    """The operator's report on old code: '19,982 lost, a traceback, a partial file the
    next run ignores'. Now: the file ends on a whole record, the next run resumes every task
    in it, and the producer sends the others again."""
    with tiny_filesystem() as mount:
        run_dir = mount / "run"
        first = RunningPool(workers=1, run_dir=str(run_dir), extra=["--max-async-tasks", "1"])
        first.owns_run_dir = False
        second: RunningPool | None = None
        try:
            first.start()
            broker = PoolBroker(run_dir=run_dir, connect_timeout=60)
            blocker, flood = await fill_the_disk(first, broker)
            first.mark_path("release").touch()
            first.signal(signal.SIGTERM)
            await until(lambda: first.proc.poll() is not None, 60, "the pool to stop")  # type: ignore[union-attr]
            log = full_log(first)
            assert_loud_and_clean(log, run_dir / "pending.tasks")

            journal = run_dir / "pending.tasks"
            data = journal.read_bytes()
            live, _ = Journal(journal).replay()
            assert live, "the journal should hold the tasks not run yet"
            assert not list(run_dir.glob("*.tmp")), "a half-written rewrite was left behind"

            # the next run, on a bigger filesystem: it reads the whole file
            grow(mount, "64m")
            assert journal.read_bytes() == data
            second = RunningPool(workers=2, run_dir=str(run_dir))
            second.owns_run_dir = False
            second.start()
            await asyncio.wait_for(flood.task, 120)
            _, lost = await results_of([blocker, *flood.handles], 120)
            assert lost == 0, f"{lost} of {len(flood.handles) + 1} task(s) lost"
            assert len(flood.handles) == TOTAL
            log = full_log(second)
            assert f"resuming {len(live)} task(s)" in log, log
            assert "damaged" not in log and "truncated" not in log, log
            assert "Traceback" not in log, log
            await broker.shutdown()
            assert second.stop() == 0
        finally:
            first.close()
            if second is not None:
                second.close()


async def test_a_small_disk_holds_the_tasks_not_the_history() -> None:
    """2.4 MiB of tasks through a 1 MiB run directory, workers keeping up: the journal is
    rewritten to the tasks still held (and the stored results, while they fit), none is
    lost, and the pool never stays frozen."""
    with tiny_filesystem() as mount:
        run_dir = mount / "run"
        running = RunningPool(workers=2, run_dir=str(run_dir))
        running.owns_run_dir = False
        with running:
            broker = PoolBroker(run_dir=run_dir)
            handles = []
            for offset in range(0, 600, 100):
                batch = [
                    await kicker(broker, "count_run").kiq(f"{PAD}{i}")
                    for i in range(offset, offset + 100)
                ]
                handles += batch
                _, lost = await results_of(batch, 60)
                assert lost == 0
            await broker.shutdown()
            log = full_log(running)
            # batches of 400 KB may fill 1 MiB before a compaction has room: then the pool
            # says so, holds producers back, and goes on by itself once compacted
            if "CRITICAL" in log:
                assert "can be written again" in log, log
            assert (run_dir / "pending.tasks").stat().st_size < 1024 * 1024
            assert running.stop() == 0
