"""The command line: help for every command, and clear errors for bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.pool_support import APPS, ROOT

pytestmark = pytest.mark.timeout(60)


def pool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pool", *args],
        capture_output=True, text=True, timeout=30, cwd=str(cwd),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ((), ["run", "stats", "scale", "scheduler", "demo"]),
        (("run",), ["--workers", "--max-async-tasks", "--shutdown-timeout", "--autoscale",
                    "--max-tasks-per-child", "--max-memory-per-child", "--run-dir", "SIGHUP"]),
        (("stats",), ["--json", "--watch"]),
        (("scale",), ["N", "--timeout"]),
        (("scheduler",), ["scheduler", "--claims", "--app-dir"]),
        (("demo",), ["--tasks"]),
    ],
)  # fmt: skip
def test_every_command_has_help(command: tuple[str, ...], expected: list[str]) -> None:
    done = pool(*command, "--help")
    assert done.returncode == 0
    for word in expected:
        assert word in done.stdout, word


def test_no_command_prints_usage_and_fails() -> None:
    done = pool()
    assert done.returncode == 2
    assert "COMMAND" in done.stdout


def test_an_app_that_cannot_be_imported_is_a_clear_error(tmp_path: Path) -> None:
    done = pool("run", "no_such_module:broker", "--run-dir", str(tmp_path / "rd"))
    assert done.returncode == 2
    assert "no_such_module" in done.stderr


def test_an_attribute_that_is_not_a_broker_is_a_clear_error(tmp_path: Path) -> None:
    done = pool("run", "pool_test_app:os", "--run-dir", str(tmp_path / "rd"), cwd=APPS)
    assert done.returncode == 2
    assert "broker" in done.stderr.lower()


@pytest.mark.parametrize("value", ["3", "5,2", "a,b", "-1,2"])
def test_bad_autoscale_values_are_refused(value: str, tmp_path: Path) -> None:
    done = pool("run", "x:y", "--autoscale", value, "--run-dir", str(tmp_path))
    assert done.returncode == 2
    assert "--autoscale" in done.stderr


def test_scale_without_a_pool_names_the_run_directory(tmp_path: Path) -> None:
    done = pool("scale", "2", "--run-dir", str(tmp_path / "nowhere"))
    assert done.returncode == 1
    assert "nowhere" in done.stderr
