"""``python -m pool``: run, stats, scale, health, events, scheduler, demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from typing import Any

from taskiq.exceptions import SendTaskError

EXIT_USAGE = 2


def _number(kind: type, name: str, check: Any, need: str) -> Any:
    """An argparse type: ``kind`` (int or float) passing ``check``; errors say ``need``."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {need}, got {text!r}") from None
        if not check(value):
            raise argparse.ArgumentTypeError(f"expected {need}, got {text!r}")
        return value

    parse.__name__ = name  # argparse names the type in some messages
    return parse


_positive_int = _number(int, "positive integer", lambda v: v >= 1, "a whole number >= 1")
_non_negative_int = _number(int, "integer", lambda v: v >= 0, "a whole number >= 0")
_positive_float = _number(float, "seconds", lambda v: v > 0, "a number of seconds > 0")
_any_int = _number(int, "integer", lambda v: True, "a whole number")
_port = _number(int, "port", lambda v: 0 <= v <= 65535, "a TCP port from 0 to 65535")


def _autoscale(text: str) -> tuple[int, int]:
    try:
        low, high = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX (e.g. 2,8), got {text!r}") from None
    if low < 0 or high < max(low, 1):
        raise argparse.ArgumentTypeError(f"need 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return low, high


_autoscale.__name__ = "MIN,MAX"


def _receiver_arg(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


_receiver_arg.__name__ = "KEY=VALUE"

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL", "FATAL")
ACK_TYPES = ("when_received", "when_executed", "when_saved")

# ``taskiq worker``'s options that pool accepts and does not apply, and why.
NOT_APPLIED = {
    "use_process_pool": "--use-process-pool: ignored; sync tasks run in each worker's thread "
    "pool (--max-threadpool-threads). pool's workers are processes already (--workers): a "
    "process pool inside a worker would escape pool's supervision (its processes are not "
    "counted in stats or memory limits, nor stopped with the worker)",
    "max_process_pool_processes": "--max-process-pool-processes: ignored, as --use-process-pool is",
    "max_fails": "--max-fails: ignored; pool restarts a crashed worker with backoff for as long "
    "as the pool runs, and stops (exit 3) only when the first workers can never start",
    "hardkill_count": "--hardkill-count: ignored; the first SIGINT/SIGTERM stops the pool "
    "gracefully, the second at once",
}


def _add_run_parser(commands: Any) -> argparse.ArgumentParser:
    from pool.runtime.config import TASKIQ_RECEIVER, TASKIQ_TASKS_PATTERN
    from pool.runtime.config import default_of as default

    run = commands.add_parser(
        "run",
        help="start a supervisor and its worker processes",
        description="Start a supervisor that runs the tasks of MODULE:ATTR (any taskiq broker, "
        "or a function returning one) in worker processes. Takes taskiq worker's arguments, "
        "with the same meaning, and pool's own. SIGINT/SIGTERM: graceful shutdown (twice: "
        "immediate); SIGTTIN/SIGTTOU: one worker more/less; SIGHUP: reload the code and "
        "replace every worker, the new one ready before an old one drains. Exit status: 0 "
        "after a graceful shutdown, 1 after a forced one, 2 for bad usage or an app that "
        "cannot be imported, 3 when no worker could start, 4 when the broker or the state "
        "cannot be reached at start.",
    )
    run.add_argument("app", metavar="MODULE:ATTR", help="the broker, e.g. app:broker")
    run.add_argument(
        "task_modules",
        nargs="*",
        default=[],
        metavar="TASK_MODULE",
        help="modules to import in every worker, where the tasks are defined",
    )
    taskiq = run.add_argument_group("taskiq worker's options (same names and meaning)")
    taskiq.add_argument(
        "--workers",
        "-w",
        type=_non_negative_int,
        default=default("workers"),
        metavar="N",
        help="number of worker processes (default: CPU count, %(default)s here; taskiq's: 2)",
    )
    taskiq.add_argument(
        "--app-dir",
        "-d",
        default=default("app_dir"),
        metavar="DIR",
        help="directory to import the app and the task modules from (besides the current one)",
    )
    taskiq.add_argument(
        "--fs-discover",
        "-fsd",
        action="store_true",
        default=default("fs_discover"),
        help="also import every module under the current directory that matches "
        "--tasks-pattern (one that fails to import is logged and skipped)",
    )
    taskiq.add_argument(
        "--tasks-pattern",
        "-tp",
        dest="tasks_patterns",
        action="append",
        default=None,
        metavar="GLOB",
        help="with --fs-discover: the files to import (repeatable; default: "
        f"{TASKIQ_TASKS_PATTERN})",
    )
    taskiq.add_argument(
        "--receiver",
        default=default("receiver"),
        metavar="MODULE:CLASS",
        help=f"taskiq receiver class to run tasks with, a subclass of {TASKIQ_RECEIVER} "
        "(pool's receiver is mixed into it; default: %(default)s)",
    )
    taskiq.add_argument(
        "--receiver_arg",
        "--receiver-arg",
        dest="receiver_args",
        action="append",
        type=_receiver_arg,
        default=[],
        metavar="KEY=VALUE",
        help="keyword argument of the receiver class, a string (repeatable)",
    )
    taskiq.add_argument(
        "--max-async-tasks",
        type=_positive_int,
        default=default("max_async_tasks"),
        metavar="N",
        help="tasks one worker runs at the same time (default: %(default)s)",
    )
    taskiq.add_argument(
        "--max-async-tasks-jitter",
        type=_non_negative_int,
        default=default("max_async_tasks_jitter"),
        metavar="N",
        help="add 0 to N (random, per worker) to --max-async-tasks (default: %(default)s)",
    )
    taskiq.add_argument(
        "--max-prefetch",
        type=_non_negative_int,
        default=default("max_prefetch"),
        metavar="N",
        help="messages a worker reads ahead of those it runs (default: %(default)s)",
    )
    taskiq.add_argument(
        "--ack-type",
        choices=ACK_TYPES,
        type=str.lower,
        default=default("ack_type"),
        help="when a message is acknowledged (default: %(default)s)",
    )
    taskiq.add_argument(
        "--max-threadpool-threads",
        "--sync-threads",
        dest="sync_threads",
        type=_positive_int,
        default=default("sync_threads"),
        metavar="N",
        help="threads per worker for sync (def) tasks (default: Python's thread pool size)",
    )
    taskiq.add_argument(
        "--no-parse",
        dest="validate_params",
        action="store_false",
        default=default("validate_params"),
        help="do not parse task arguments into their annotated types",
    )
    taskiq.add_argument(
        "--no-propagate-errors",
        dest="propagate_errors",
        action="store_false",
        default=default("propagate_errors"),
        help="do not propagate a task's error to its generator dependencies",
    )
    taskiq.add_argument(
        "--max-tasks-per-child",
        type=_positive_int,
        default=default("max_tasks_per_child"),
        metavar="N",
        help="replace a worker after it ran N tasks (its replacement starts first)",
    )
    taskiq.add_argument(
        "--wait-tasks-timeout",
        type=_positive_float,
        default=default("wait_tasks_timeout"),
        metavar="SECONDS",
        help="how long a stopping worker lets its running tasks finish; what still runs then "
        "is cancelled and delivered again (default: %(default)s; taskiq's: no limit)",
    )
    taskiq.add_argument(
        "--shutdown-timeout",
        type=_positive_float,
        default=default("shutdown_timeout"),
        metavar="SECONDS",
        help="how long a stopping worker's broker shutdown (WORKER_SHUTDOWN handlers "
        "included) may take (default: %(default)s)",
    )
    taskiq.add_argument(
        "--reload",
        "-r",
        action="store_true",
        default=default("reload"),
        help="on a file change, reload the code and replace the workers as SIGHUP does "
        "(needs the reload extra)",
    )
    taskiq.add_argument(
        "--reload-dir",
        dest="reload_dirs",
        action="append",
        default=[],
        metavar="DIR",
        help="with --reload: a directory to watch (repeatable; default: the current one)",
    )
    taskiq.add_argument(
        "--do-not-use-gitignore",
        dest="use_gitignore",
        action="store_false",
        default=default("use_gitignore"),
        help="with --reload: changes to files that .gitignore ignores count too",
    )
    taskiq.add_argument(
        "--log-level",
        default=default("log_level"),
        choices=LOG_LEVELS,
        type=str.upper,
        help="(default: %(default)s; DEBUG also shows tracebacks of import errors)",
    )
    taskiq.add_argument(
        "--log-format",
        default=default("log_format"),
        metavar="FORMAT",
        help="logging format of the supervisor and the workers (default: pool's, which names "
        "the process)",
    )
    taskiq.add_argument(
        "--no-configure-logging",
        dest="configure_logging",
        action="store_false",
        default=default("configure_logging"),
        help="leave logging to the app: pool adds no handler and changes no format",
    )
    ignored = run.add_argument_group(
        "taskiq worker's options that pool accepts but does not apply (a warning says why)"
    )
    ignored.add_argument("--use-process-pool", action="store_true", help="see the warning")
    ignored.add_argument(
        "--max-process-pool-processes", type=_positive_int, default=None, metavar="N"
    )
    ignored.add_argument("--max-fails", type=_any_int, default=-1, metavar="N")
    ignored.add_argument("--hardkill-count", type=_any_int, default=3, metavar="N")
    _add_pool_options(run.add_argument_group("pool's options"), default)
    run.set_defaults(handler=_cmd_run)
    return run


def _add_pool_options(group: Any, default: Any) -> None:
    group.add_argument(
        "--max-memory-per-child",
        type=_positive_float,
        default=default("max_memory_per_child"),
        metavar="MB",
        help="replace a worker whose RSS grows beyond MB megabytes",
    )
    group.add_argument(
        "--autoscale",
        type=_autoscale,
        default=default("autoscale"),
        metavar="MIN,MAX",
        help="grow and shrink the worker count between MIN and MAX with the load",
    )
    group.add_argument(
        "--autoscale-idle",
        type=_positive_float,
        default=default("autoscale_idle"),
        metavar="SECONDS",
        help="with --autoscale: shrink after a worker stayed idle this long (default: %(default)s)",
    )
    group.add_argument(
        "--worker-timeout",
        type=_positive_float,
        default=default("worker_timeout"),
        metavar="SECONDS",
        help="kill and replace a worker whose event loop sent no heartbeat for this long "
        "(a blocking call in an async task); its tasks go to another worker "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--startup-timeout",
        type=_positive_float,
        default=default("startup_timeout"),
        metavar="SECONDS",
        help="a worker whose WORKER_STARTUP handlers did not finish in this time is killed "
        "and counts as a failed start (default: %(default)s)",
    )
    group.add_argument(
        "--metrics-port",
        type=_port,
        default=default("metrics_port"),
        metavar="PORT",
        help="serve Prometheus metrics of the whole pool on this port (0: any free port)",
    )
    group.add_argument(
        "--metrics-addr",
        default=default("metrics_addr"),
        metavar="ADDR",
        help="address of the metrics endpoint (default: %(default)s, loopback only)",
    )
    group.add_argument(
        "--dashboard-port",
        type=_port,
        default=default("dashboard_port"),
        metavar="PORT",
        help="serve the dashboard (workers, throughput, latency, failures, scaling) on this "
        "port (0: any free port)",
    )
    group.add_argument(
        "--dashboard-addr",
        default=default("dashboard_addr"),
        metavar="ADDR",
        help="address of the dashboard (default: %(default)s; beyond loopback the page needs "
        "?token=$(cat RUN_DIR/metrics.token))",
    )
    group.add_argument(
        "--state",
        default=default("state_url"),
        metavar="URL",
        help="keep the shared state in Redis (redis://host:port/db) instead of the pool's own "
        "state server, so that pools on several machines share one state",
    )
    group.add_argument(
        "--state-prefix",
        default=default("state_prefix"),
        metavar="PREFIX",
        help="with --state: the key prefix of this state in Redis (default: %(default)s)",
    )
    group.add_argument(
        "--run-dir",
        default=default("run_dir"),
        metavar="DIR",
        help="private run directory (default: $POOL_RUN_DIR, else ./.pool)",
    )
    group.add_argument(
        "--start-method",
        # not forkserver: a worker's parent must be the supervisor (it dies with it)
        choices=("fork", "spawn"),
        default=default("start_method"),
        help="how worker processes are created: fork (fast; the app is imported once, in the "
        "supervisor) or spawn (each worker imports the app afresh) (default: %(default)s)",
    )
    group.add_argument(
        "--queue-size",
        type=_positive_int,
        default=default("queue_size"),
        metavar="N",
        help="PoolBroker tasks waiting in the supervisor before producers are slowed down "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--max-stored-results",
        type=_positive_int,
        default=default("max_stored_results"),
        metavar="N",
        help="PoolBroker results the supervisor keeps for producers that ask later, newest "
        "first (a result its producer waits for is pushed to it at once) (default: %(default)s)",
    )
    group.add_argument(
        "--no-journal",
        dest="journal",
        action="store_false",
        help="PoolBroker: keep accepted tasks in memory only, not in the run directory's "
        "journal (faster; a supervisor killed with SIGKILL then loses the tasks it held)",
    )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    import pool

    try:
        taskiq_version = version("taskiq")
    except PackageNotFoundError:  # pragma: no cover
        taskiq_version = "?"
    python = sys.version.split()[0]
    return f"taskiq-pool {pool.__version__} (taskiq {taskiq_version}, Python {python})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pool",
        description="The supervised multiprocess runtime, the shared state and the embedded "
        "broker for taskiq applications.",
    )
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    parser.set_defaults(run_parser=_add_run_parser(commands))

    stats = commands.add_parser(
        "stats",
        help="print the supervisor's per-worker stats",
        description="Print the running pool's stats: one row per worker, and totals.",
    )
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.add_argument("--watch", action="store_true", help="refresh every second until Ctrl+C")
    stats.add_argument("--run-dir", default=None, help="run directory of the pool")
    stats.set_defaults(handler=_cmd_stats)

    scale = commands.add_parser(
        "scale",
        help="set the number of workers",
        description="Set the worker count of the running pool and wait until that many are "
        "ready (non-zero exit with the reason when they cannot be).",
    )
    scale.add_argument("workers", type=_non_negative_int, metavar="N")
    scale.add_argument(
        "--timeout",
        type=_positive_float,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for the workers (default: %(default)s)",
    )
    scale.add_argument("--run-dir", default=None, help="run directory of the pool")
    scale.set_defaults(handler=_cmd_scale)

    # commands of their own modules: each sets its parser's handler, as those above
    from pool.ops import cancel_cli, observe_cli

    cancel_cli.add_parser(commands)
    observe_cli.add_observe_commands(commands)

    from pool.ops.scheduler_cli import DESCRIPTION, HELP

    commands.add_parser(
        "scheduler",
        help=HELP,
        description=DESCRIPTION,
        add_help=False,  # its arguments, --help included, go to ``scheduler_cli``
    )

    demo = commands.add_parser(
        "demo",
        help="a short tour on the embedded default",
        description="Start a pool, send a few hundred tasks, show results, state and stats.",
    )
    demo.add_argument("--tasks", type=_positive_int, default=300)
    demo.add_argument("--workers", type=_positive_int, default=2)
    demo.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["scheduler"]:  # taskiq scheduler's arguments, parsed by taskiq's parser
        from pool.ops.scheduler_cli import main as scheduler_main

        return int(scheduler_main(argv[1:]))
    parser = build_parser()
    if argv[:1] == ["run"]:  # task modules may come after options: `run app:broker -w 2 tasks`
        run_parser = parser.get_default("run_parser")
        args = run_parser.parse_intermixed_args(argv[1:], argparse.Namespace(command="run"))
    else:
        args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    return int(args.handler(args))


def run_config(args: argparse.Namespace) -> Any:
    """The ``PoolConfig`` of parsed ``run`` arguments."""
    from pool.runtime.config import PoolConfig, default_of

    return PoolConfig(
        app=args.app,
        workers=args.workers,
        task_modules=list(args.task_modules),
        app_dir=args.app_dir,
        fs_discover=args.fs_discover,
        tasks_patterns=args.tasks_patterns or default_of("tasks_patterns"),
        receiver=args.receiver,
        receiver_args=dict(args.receiver_args),
        max_async_tasks=args.max_async_tasks,
        max_async_tasks_jitter=args.max_async_tasks_jitter,
        max_prefetch=args.max_prefetch,
        ack_type=args.ack_type,
        sync_threads=args.sync_threads,
        validate_params=args.validate_params,
        propagate_errors=args.propagate_errors,
        wait_tasks_timeout=args.wait_tasks_timeout,
        shutdown_timeout=args.shutdown_timeout,
        reload=args.reload,
        reload_dirs=list(args.reload_dirs),
        use_gitignore=args.use_gitignore,
        log_level=args.log_level,
        log_format=args.log_format,
        configure_logging=args.configure_logging,
        max_tasks_per_child=args.max_tasks_per_child,
        max_memory_per_child=args.max_memory_per_child,
        autoscale=args.autoscale,
        autoscale_idle=args.autoscale_idle,
        worker_timeout=args.worker_timeout,
        startup_timeout=args.startup_timeout,
        metrics_port=args.metrics_port,
        metrics_addr=args.metrics_addr,
        dashboard_port=args.dashboard_port,
        dashboard_addr=args.dashboard_addr,
        state_url=args.state,
        state_prefix=args.state_prefix,
        run_dir=args.run_dir,
        start_method=args.start_method,
        queue_size=args.queue_size,
        max_stored_results=args.max_stored_results,
        journal=args.journal,
    )


def not_applied(args: argparse.Namespace) -> list[str]:
    """Why each of taskiq's options given here that pool does not apply is not applied."""
    defaults = {
        "use_process_pool": False,
        "max_process_pool_processes": None,
        "max_fails": -1,
        "hardkill_count": 3,
    }
    return [NOT_APPLIED[name] for name, value in defaults.items() if getattr(args, name) != value]


def _cmd_run(args: argparse.Namespace) -> int:
    from pool.runtime.runner import run_pool

    if args.workers == 0 and args.autoscale is None:
        print(
            "pool run: argument --workers/-w: 0 workers would run no task; give 1 or more "
            "(to pause a running pool: `python -m pool scale 0`; to scale down to no worker "
            "when idle: --autoscale 0,MAX)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    for warning in not_applied(args):
        print(f"pool run: {warning}", file=sys.stderr)
    return run_pool(run_config(args))


def _ask(payload: dict[str, Any], run_dir: str | None, timeout: float | None) -> Any:
    from pool.runtime.client import request

    return asyncio.run(request(payload, run_dir, timeout))


def _cmd_stats(args: argparse.Namespace) -> int:
    from pool.ops.stats_view import render, watch

    try:
        if args.watch:
            return watch(lambda: _ask({"cmd": "stats"}, args.run_dir, 10)["stats"], args.json)
        reply = _ask({"cmd": "stats"}, args.run_dir, 10)
    except SendTaskError as exc:
        print(f"pool stats: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(reply["stats"]))
    else:
        render(reply["stats"])
    return 0


def ask_or_say_why(
    name: str, payload: dict[str, Any], run_dir: str | None, timeout: float
) -> dict[str, Any] | None:
    """The supervisor's reply to a command, or ``None`` once ``pool NAME: why`` is printed
    (no pool answers, or it refused)."""
    try:
        reply: dict[str, Any] = _ask(payload, run_dir, timeout)
    except SendTaskError as exc:
        print(f"pool {name}: {exc}", file=sys.stderr)
        return None
    if not reply.get("ok"):
        print(f"pool {name}: {reply.get('error')}", file=sys.stderr)
        return None
    return reply


def _cmd_scale(args: argparse.Namespace) -> int:
    payload = {"cmd": "scale", "workers": args.workers, "timeout": args.timeout}
    reply = ask_or_say_why("scale", payload, args.run_dir, args.timeout + 10)
    if reply is None:
        return 1
    if reply["workers"] == 0:
        print(
            "0 workers: the pool runs no task until it is scaled up again (`pool scale N` or "
            "SIGTTIN); tasks wait meanwhile, in the supervisor for a PoolBroker, in the broker "
            "otherwise"
        )
    else:
        print(f"{reply['workers']} worker(s) ready")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pool.ops.demo import run_demo

    return run_demo(tasks=args.tasks, workers=args.workers)
