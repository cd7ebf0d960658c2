"""``python -m pool``: run, stats, scale, scheduler, demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from taskiq.exceptions import SendTaskError

EXIT_USAGE = 2


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return value


def _autoscale(text: str) -> tuple[int, int]:
    try:
        low, high = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN,MAX (e.g. 2,8), got {text!r}") from None
    if low < 0 or high < max(low, 1):
        raise argparse.ArgumentTypeError(f"need 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return low, high


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pool",
        description="The supervised multiprocess runtime, the shared state and the embedded "
        "broker for taskiq applications.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="start a supervisor and its worker processes",
        description="Start a supervisor that runs the tasks of MODULE:ATTR (a broker) in worker "
        "processes. SIGINT/SIGTERM: graceful shutdown (twice: immediate); SIGTTIN/SIGTTOU: one "
        "worker more/less; SIGHUP: reload the code and replace every worker, the new one "
        "ready before an old one drains.",
    )
    run.add_argument("app", metavar="MODULE:ATTR", help="the broker, e.g. app:broker")
    run.add_argument(
        "--workers",
        "-w",
        type=_non_negative_int,
        default=os.cpu_count() or 1,
        help="number of worker processes (default: CPU count, %(default)s here)",
    )
    run.add_argument(
        "--max-async-tasks",
        type=_positive_int,
        default=100,
        help="tasks one worker runs at the same time (default: %(default)s)",
    )
    run.add_argument(
        "task_modules",
        nargs="*",
        metavar="TASK_MODULE",
        help="modules to import in every worker, where the tasks are defined",
    )
    run.add_argument(
        "--max-threadpool-threads",
        "--sync-threads",
        dest="sync_threads",
        type=_positive_int,
        default=None,
        help="threads per worker for sync (def) tasks (default: Python's thread pool size)",
    )
    run.add_argument(
        "--max-prefetch",
        type=_non_negative_int,
        default=0,
        help="messages a worker reads ahead of those it runs (default: %(default)s)",
    )
    run.add_argument(
        "--ack-type",
        choices=("when_received", "when_executed", "when_saved"),
        default="when_saved",
        help="when a message is acknowledged (default: %(default)s)",
    )
    run.add_argument(
        "--no-parse",
        dest="validate_params",
        action="store_false",
        help="do not parse task arguments into their annotated types",
    )
    run.add_argument(
        "--shutdown-timeout",
        type=_positive_float,
        default=30.0,
        metavar="SECONDS",
        help="how long a stopping worker lets its tasks finish before cancelling them "
        "(default: %(default)s)",
    )
    run.add_argument(
        "--max-tasks-per-child",
        type=_positive_int,
        default=None,
        metavar="N",
        help="replace a worker after it ran N tasks",
    )
    run.add_argument(
        "--max-memory-per-child",
        type=_positive_float,
        default=None,
        metavar="MB",
        help="replace a worker whose RSS grows beyond MB megabytes",
    )
    run.add_argument(
        "--autoscale",
        type=_autoscale,
        default=None,
        metavar="MIN,MAX",
        help="grow and shrink the worker count between MIN and MAX with the load",
    )
    run.add_argument(
        "--autoscale-idle",
        type=_positive_float,
        default=10.0,
        metavar="SECONDS",
        help="with --autoscale: shrink after a worker stayed idle this long (default: %(default)s)",
    )
    run.add_argument(
        "--worker-timeout",
        type=_positive_float,
        default=60.0,
        metavar="SECONDS",
        help="kill and replace a worker whose event loop sent no heartbeat for this long "
        "(a blocking call in an async task); its tasks go to another worker "
        "(default: %(default)s)",
    )
    run.add_argument(
        "--metrics-port",
        type=_non_negative_int,
        default=None,
        metavar="PORT",
        help="serve Prometheus metrics of the whole pool on this port (0: any free port)",
    )
    run.add_argument(
        "--metrics-addr",
        default="127.0.0.1",
        metavar="ADDR",
        help="address of the metrics endpoint (default: %(default)s, loopback only)",
    )
    run.add_argument(
        "--state",
        default=None,
        metavar="URL",
        help="keep the shared state in Redis (redis://host:port/db) instead of the pool's own "
        "state server, so that pools on several machines share one state",
    )
    run.add_argument(
        "--state-prefix",
        default="pool:state",
        metavar="PREFIX",
        help="with --state: the key prefix of this state in Redis (default: %(default)s)",
    )
    run.add_argument(
        "--run-dir",
        default=None,
        help="private run directory (default: $POOL_RUN_DIR, else ./.pool)",
    )
    run.add_argument(
        "--start-method",
        choices=("fork", "spawn", "forkserver"),
        default="fork",
        help="how worker processes are created (default: %(default)s)",
    )
    run.add_argument(
        "--queue-size",
        type=_positive_int,
        default=10_000,
        help="tasks waiting in the supervisor before producers are slowed down "
        "(default: %(default)s)",
    )
    run.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        type=str.upper,
        help="(default: %(default)s)",
    )

    stats = commands.add_parser(
        "stats",
        help="print the supervisor's per-worker stats",
        description="Print the running pool's stats: one row per worker, and totals.",
    )
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.add_argument("--watch", action="store_true", help="refresh every second until Ctrl+C")
    stats.add_argument("--run-dir", default=None, help="run directory of the pool")

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

    from pool.ops.scheduler_cli import DESCRIPTION, HELP

    sched = commands.add_parser(
        "scheduler",
        help=HELP,
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sched.add_argument("app", metavar="MODULE:ATTR", help="the scheduler, e.g. app:scheduler")
    sched.add_argument("--log-level", default="INFO", type=str.upper)

    demo = commands.add_parser(
        "demo",
        help="a short tour on the embedded default",
        description="Start a pool, send a few hundred tasks, show results, state and stats.",
    )
    demo.add_argument("--tasks", type=_positive_int, default=300)
    demo.add_argument("--workers", type=_positive_int, default=2)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    handler = {
        "run": _cmd_run,
        "stats": _cmd_stats,
        "scale": _cmd_scale,
        "scheduler": _cmd_scheduler,
        "demo": _cmd_demo,
    }[args.command]
    return int(handler(args))


def _cmd_run(args: argparse.Namespace) -> int:
    from pool.runtime.config import PoolConfig
    from pool.runtime.runner import run_pool

    config = PoolConfig(
        app=args.app,
        workers=args.workers,
        task_modules=list(args.task_modules),
        max_prefetch=args.max_prefetch,
        ack_type=args.ack_type,
        validate_params=args.validate_params,
        max_async_tasks=args.max_async_tasks,
        sync_threads=args.sync_threads,
        shutdown_timeout=args.shutdown_timeout,
        max_tasks_per_child=args.max_tasks_per_child,
        max_memory_per_child=args.max_memory_per_child,
        autoscale=args.autoscale,
        autoscale_idle=args.autoscale_idle,
        worker_timeout=args.worker_timeout,
        metrics_port=args.metrics_port,
        metrics_addr=args.metrics_addr,
        state_url=args.state,
        state_prefix=args.state_prefix,
        run_dir=args.run_dir,
        log_level=args.log_level,
        start_method=args.start_method,
        queue_size=args.queue_size,
    )
    return run_pool(config)


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


def _cmd_scale(args: argparse.Namespace) -> int:
    try:
        reply = _ask(
            {"cmd": "scale", "workers": args.workers, "timeout": args.timeout},
            args.run_dir,
            args.timeout + 10,
        )
    except SendTaskError as exc:
        print(f"pool scale: {exc}", file=sys.stderr)
        return 1
    if not reply.get("ok"):
        print(f"pool scale: {reply.get('error')}", file=sys.stderr)
        return 1
    print(f"{reply['workers']} worker(s) ready")
    return 0


def _cmd_scheduler(args: argparse.Namespace) -> int:
    from pool.ops.scheduler_cli import run_scheduler

    return run_scheduler(args.app, args.log_level)


def _cmd_demo(args: argparse.Namespace) -> int:
    from pool.ops.demo import run_demo

    return run_demo(tasks=args.tasks, workers=args.workers)
