"""`python -m pool run --reload`: a changed file replaces the workers with the new code, as
SIGHUP does (the new worker ready before an old one drains); ignored files change nothing."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pool import AsyncKicker
from tests.pool_support import RunningPool, wait_for

pytestmark = pytest.mark.timeout(60)


def by_name(name: str, broker: Any) -> AsyncKicker[Any, Any]:
    """The task ``name`` of ``broker``, by name (the test does not import the app)."""
    return AsyncKicker(name, broker, {})


APP = """
from pool import PoolBroker

broker = PoolBroker()


@broker.task(task_name="reloaded.version")
async def version() -> str:
    return {version!r}
"""


def write_app(directory: Path, version: str) -> None:
    path = directory / "reloaded_app.py"
    path.write_text(APP.format(version=version))
    # a new mtime even within the filesystem's timestamp granularity
    stamp = time.time() + 1
    os.utime(path, (stamp, stamp))


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    write_app(tmp_path, "v1")
    (tmp_path / ".gitignore").write_text("ignored/\n*.log\n")
    (tmp_path / "ignored").mkdir()
    yield tmp_path


def reloading_pool(project: Path, *extra: str) -> RunningPool:
    args = ["--reload", "--reload-dir", str(project), "--app-dir", str(project), *extra]
    return RunningPool(workers=2, app="reloaded_app:broker", extra=args)


async def version_of(running: RunningPool) -> str:
    broker = running.broker()
    try:
        handle = await by_name("reloaded.version", broker).kiq()
        return str((await handle.wait_result(timeout=20)).raise_for_error().return_value)
    finally:
        await broker.shutdown()


async def test_a_changed_file_reloads_the_code_and_replaces_every_worker(project: Path) -> None:
    with reloading_pool(project) as running:
        assert await version_of(running) == "v1"
        before = set(running.worker_pids())
        write_app(project, "v2")
        wait_for(
            lambda: "rolling restart" in running.log() and not before & set(running.worker_pids()),
            20,
            "every worker replaced",
        )
        running.wait_ready(2)
        assert await version_of(running) == "v2"
        assert "reloaded_app.py changed" in running.log()
        started = time.monotonic()
        assert running.stop() == 0
        assert time.monotonic() - started < 5, "the watcher does not hold the pool up"


async def test_files_gitignore_ignores_change_nothing_unless_asked(project: Path) -> None:
    with reloading_pool(project) as running:
        pids = set(running.worker_pids())
        (project / "ignored" / "data.txt").write_text("x")
        (project / "pool.log").write_text("x")
        time.sleep(1.5)  # the watcher batches changes for 0.4 s
        assert set(running.worker_pids()) == pids
        assert "rolling restart" not in running.log()
    with reloading_pool(project, "--do-not-use-gitignore") as running:
        pids = set(running.worker_pids())
        (project / "ignored" / "data.txt").write_text("y")
        wait_for(lambda: not pids & set(running.worker_pids()), 20, "workers replaced")


async def test_an_import_error_after_a_change_keeps_the_running_workers(project: Path) -> None:
    with reloading_pool(project) as running:
        pids = set(running.worker_pids())
        (project / "reloaded_app.py").write_text("this is not python\n")
        wait_for(lambda: "failed to import" in running.log(), 20, "the import error logged")
        assert set(running.worker_pids()) == pids
        assert await version_of(running) == "v1"
