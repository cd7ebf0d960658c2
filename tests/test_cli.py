"""The command line: help for every command, taskiq worker's arguments on `pool run`, and a
clear message with the documented exit status for bad input (2: usage or an app that cannot
be imported, 4: the broker or the state cannot be reached)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from pool import AsyncKicker
from tests.pool_support import APPS, ROOT, RunningPool, wait_for

pytestmark = pytest.mark.timeout(60)


def by_name(name: str, broker: Any) -> AsyncKicker[Any, Any]:
    """The task ``name`` of ``broker``, by name (the test does not import the app)."""
    return AsyncKicker(name, broker, {})


EXIT_USAGE, EXIT_UNREACHABLE = 2, 4


def pool(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pool", *args],
        capture_output=True, text=True, timeout=30, cwd=str(cwd),
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )  # fmt: skip


def app_file(directory: Path, name: str, source: str) -> str:
    """Write module ``name`` into ``directory``; returns ``name:broker``."""
    (directory / f"{name}.py").write_text(textwrap.dedent(source))
    return f"{name}:broker"


def run_in(directory: Path, spec: str, *args: str) -> subprocess.CompletedProcess[str]:
    return pool("run", spec, "--workers", "1", "--run-dir", str(directory / "rd"), *args,
                cwd=directory)  # fmt: skip


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ((), ["run", "stats", "scale", "scheduler", "demo"]),
        (("run",), ["--workers", "--max-async-tasks", "--shutdown-timeout", "--autoscale",
                    "--max-tasks-per-child", "--max-memory-per-child", "--run-dir", "SIGHUP",
                    "--fs-discover", "-fsd", "--tasks-pattern", "--max-prefetch", "--ack-type",
                    "--max-threadpool-threads", "--wait-tasks-timeout", "--no-configure-logging",
                    "--log-level", "--log-format", "--receiver", "--receiver_arg", "--no-parse",
                    "--no-propagate-errors", "--app-dir", "--reload", "--reload-dir",
                    "--do-not-use-gitignore", "--max-async-tasks-jitter", "--use-process-pool",
                    "--max-fails", "--hardkill-count", "Exit status"]),
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


def test_version_names_pool_and_taskiq() -> None:
    done = pool("--version")
    assert done.returncode == 0
    assert done.stdout.startswith("taskiq-pool ") and "taskiq 0.13" in done.stdout


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (["--workers", "x"], "--workers"),
        (["--workers", "-1"], "--workers"),
        (["--max-async-tasks", "0"], "--max-async-tasks"),
        (["--wait-tasks-timeout", "-1"], "--wait-tasks-timeout"),
        (["--shutdown-timeout", "soon"], "--shutdown-timeout"),
        (["--metrics-port", "70000"], "--metrics-port"),
        (["--receiver_arg", "novalue"], "--receiver_arg"),
        (["--ack-type", "sometimes"], "--ack-type"),
        (["--log-level", "LOUD"], "--log-level"),
        (["--start-method", "forkserver"], "--start-method"),
    ],
)
def test_argument_errors_name_the_option_and_what_it_takes(args: list[str], option: str) -> None:
    done = pool("run", "x:y", *args)
    assert done.returncode == EXIT_USAGE
    assert f"argument {option}" in done.stderr
    assert "_int" not in done.stderr and "_float" not in done.stderr, done.stderr


def test_zero_workers_is_refused_with_the_ways_to_run_none(tmp_path: Path) -> None:
    done = pool("run", "pool_test_app:broker", "-w", "0", "--run-dir", str(tmp_path), cwd=APPS)
    assert done.returncode == EXIT_USAGE
    assert "--workers" in done.stderr and "pool scale 0" in done.stderr
    assert "--autoscale 0,MAX" in done.stderr


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import os as broker\n", ["is the module os"]),
        ("broker = {'not': 'a broker'}\n", ["is a builtins.dict"]),
        ("from taskiq import InMemoryBroker as broker\n", ["the class", "create one"]),
        ("def broker():\n    return 42\n", ["is a function that returned a builtins.int"]),
        ("other = 1\n", ["has no attribute 'broker'"]),
    ],
)
def test_an_attr_that_is_not_a_broker_says_what_it_is_and_what_is_expected(
    source: str, expected: list[str], tmp_path: Path
) -> None:
    done = run_in(tmp_path, app_file(tmp_path, "notabroker", source))
    assert done.returncode == EXIT_USAGE
    for words in [*expected, "expected a taskiq broker", "taskiq.AsyncBroker"]:
        assert words in done.stderr, done.stderr


def test_a_broker_factory_function_is_called_as_taskiq_does(tmp_path: Path) -> None:
    spec = app_file(tmp_path, "factory", """
        from pool import PoolBroker

        def broker():
            return PoolBroker()
    """)  # fmt: skip
    with RunningPool(1, app=spec, extra=["--app-dir", str(tmp_path)]) as running:
        assert running.stats()["workers"][0]["state"] == "ready"


def test_an_app_that_raises_at_import_exits_2_with_where_and_no_traceback(tmp_path: Path) -> None:
    spec = app_file(tmp_path, "raising", """
        import os

        raise RuntimeError("database settings missing")
    """)  # fmt: skip
    done = run_in(tmp_path, spec)
    assert done.returncode == EXIT_USAGE
    assert "RuntimeError" in done.stderr and "database settings missing" in done.stderr
    assert f"{tmp_path / 'raising.py'}:4" in done.stderr
    assert "Traceback" not in done.stderr and "--log-level DEBUG" in done.stderr
    debug = run_in(tmp_path, spec, "--log-level", "DEBUG")
    assert debug.returncode == EXIT_USAGE and "Traceback" in debug.stderr


def test_an_app_with_a_syntax_error_exits_2_with_the_line(tmp_path: Path) -> None:
    spec = app_file(tmp_path, "broken", "broker = (\n    1 +\n")
    done = run_in(tmp_path, spec)
    assert done.returncode == EXIT_USAGE
    assert "syntax error" in done.stderr and str(tmp_path / "broken.py") in done.stderr
    assert "Traceback" not in done.stderr


def test_a_missing_module_or_task_module_exits_2(tmp_path: Path) -> None:
    done = run_in(tmp_path, "no_such_module:broker")
    assert done.returncode == EXIT_USAGE and "no module named 'no_such_module'" in done.stderr
    spec = app_file(tmp_path, "fine", "from pool import PoolBroker\nbroker = PoolBroker()\n")
    done = run_in(tmp_path, spec, "no_such_tasks")
    assert done.returncode == EXIT_USAGE
    assert "task module 'no_such_tasks'" in done.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--receiver", "os:path"], "expected a subclass of taskiq.receiver.Receiver"),
        (["--receiver_arg", "colour=red"], "takes no argument 'colour'"),
        (["--receiver_arg", "max_async_tasks=3"], "use --max-async-tasks"),
    ],
)
def test_a_bad_receiver_or_receiver_arg_exits_2(
    args: list[str], expected: str, tmp_path: Path
) -> None:
    done = run_in(tmp_path, "pool_test_app:broker", "--app-dir", str(APPS), *args)
    assert done.returncode == EXIT_USAGE
    assert expected in done.stderr, done.stderr


UNREACHABLE = {
    "redis": ("from taskiq_redis import ListQueueBroker\n"
              "broker = ListQueueBroker('redis://127.0.0.1:1/0')\n", "Connection refused"),
    "rabbitmq": ("from taskiq_aio_pika import AioPikaBroker\n"
                 "broker = AioPikaBroker('amqp://guest:secret@127.0.0.1:1/')\n",
                 "amqp://guest:***@127.0.0.1:1/"),
    "nats": ("from taskiq_nats import PullBasedJetStreamBroker\n"
             "broker = PullBasedJetStreamBroker('nats://127.0.0.1:1')\n", "Connection refused"),
}  # fmt: skip


@pytest.mark.parametrize("kind", list(UNREACHABLE))
def test_an_unreachable_broker_exits_4_with_the_brokers_error(kind: str, tmp_path: Path) -> None:
    source, expected = UNREACHABLE[kind]
    done = run_in(tmp_path, app_file(tmp_path, f"down_{kind}", source))
    assert done.returncode == EXIT_UNREACHABLE, done.stderr
    assert "cannot reach the broker" in done.stderr and expected in done.stderr
    assert "secret" not in done.stderr
    assert "Traceback" not in done.stderr, "the check's own logs stay in the check"


def test_an_unreachable_state_exits_4(tmp_path: Path) -> None:
    done = run_in(tmp_path, "pool_test_app:broker", "--app-dir", str(APPS), "--state",
                  "redis://127.0.0.1:1/0")  # fmt: skip
    assert done.returncode == EXIT_UNREACHABLE
    assert "cannot reach the shared state at redis://127.0.0.1:1/0" in done.stderr


def test_a_metrics_port_in_use_exits_2_naming_the_option(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_in(tmp_path, "pool_test_app:broker", "--metrics-port", str(port))
        assert done.returncode == EXIT_USAGE, "refused before the app is even loaded"
    assert done.returncode == EXIT_USAGE
    assert f"--metrics-port {port}" in done.stderr and "in use" in done.stderr
    assert "Traceback" not in done.stderr


async def test_taskiq_workers_arguments_run_unchanged() -> None:
    """A `taskiq worker` command line, with `taskiq worker` replaced by `python -m pool run`."""
    args = [
        "--fs-discover", "--tasks-pattern", "discovered/**/tasks_*.py",
        "--receiver", "cli_app:GreetingReceiver", "--receiver_arg", "greeting=hello",
        "--no-parse", "--no-propagate-errors", "--max-async-tasks", "7",
        "--max-async-tasks-jitter", "2", "--max-prefetch", "1", "--ack-type", "when_executed",
        "--max-threadpool-threads", "2", "--max-tasks-per-child", "1000",
        "--wait-tasks-timeout", "5", "--shutdown-timeout", "2",
        "--use-process-pool", "--max-fails", "3", "--hardkill-count", "2",
    ]  # fmt: skip
    with RunningPool(2, app="cli_app:broker", extra=args) as running:
        broker = running.broker()
        handle = await by_name("cli.settings", broker).kiq("5")
        answer = (await handle.wait_result(timeout=20)).raise_for_error().return_value
        assert answer == {"greeting": "hello", "value_type": "str"}, "receiver, its arg, no-parse"
        handle = await by_name("cli.tasks", broker).kiq()
        names = (await handle.wait_result(timeout=20)).raise_for_error().return_value
        assert {"discovered.alpha", "discovered.beta"} <= set(names), "--fs-discover"
        await broker.shutdown()
        log = running.log()
        assert "--use-process-pool: ignored" in log and "--max-fails: ignored" in log
        assert running.stop() == 0


async def test_log_format_and_no_configure_logging() -> None:
    fmt = ["--log-format", "TQFMT %(processName)s %(name)s: %(message)s"]
    with RunningPool(1, app="cli_app:broker", extra=fmt) as running:
        broker = running.broker()
        handle = await by_name("cli.settings", broker).kiq(1)
        await handle.wait_result(timeout=20)
        await broker.shutdown()
        wait_for(lambda: "TQFMT pool-worker-0 cli_app: settings asked" in running.log(), 5, "log")
        assert "TQFMT MainProcess pool.runtime.supervisor: pool started" in running.log()
    own = RunningPool(
        1,
        app="cli_app:broker",
        extra=["--no-configure-logging"],
        env={"POOL_TEST_APP_LOGGING": "1"},
    )
    with own as running:
        broker = running.broker()
        handle = await by_name("cli.settings", broker).kiq(1)
        await handle.wait_result(timeout=20)
        await broker.shutdown()
        wait_for(lambda: "APPFMT cli_app settings asked" in running.log(), 5, "the app's format")
        assert "[worker 0" not in running.log(), "pool added no handler of its own"


async def test_scale_to_zero_pauses_and_sigttin_resumes() -> None:
    with RunningPool(1) as running:
        done = pool("scale", "0", "--run-dir", running.run_dir)
        assert done.returncode == 0
        assert "0 workers: the pool runs no task until it is scaled up again" in done.stdout
        wait_for(lambda: running.stats()["workers"] == [], 10, "no worker left")
        running.signal(signal.SIGTTIN)
        running.wait_ready(1)
        running.signal(signal.SIGTTOU)
        wait_for(lambda: running.stats()["target_workers"] == 0, 10, "TTOU to zero")
        assert running.proc is not None and running.proc.poll() is None, "the pool runs on"
