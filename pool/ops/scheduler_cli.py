"""``python -m pool scheduler``: taskiq's scheduler loop, with pool's run claims.

It takes ``taskiq scheduler``'s arguments, parsed by taskiq's own parser (``SCHEDULER
[MODULES ...]``, ``--app-dir``, ``--fs-discover``, ``--tasks-pattern``, ``--log-level``,
``--no-configure-logging``, ``--skip-first-run``, ``--update-interval``, ``--loop-interval``,
``--send-timeout``), and runs taskiq's ``run_scheduler``: the same loop, timing and logs. What
pool adds (:mod:`pool.extensions.scheduler`): before a run is sent it is claimed, so that
several such processes on the same schedules send each run once; the claim is the first
source's ``run_claim()`` (a ``RedisScheduleSource``), or the Redis given with pool's own
``--claims URL``. And SIGTERM stops it as SIGINT does, gracefully.

Exit status: 0 after SIGINT or SIGTERM (sources and broker shut down), 1 when the scheduler
fails to start or its loop fails, 2 when the arguments are wrong or SCHEDULER cannot be
imported or is not a ``TaskiqScheduler``.
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger("pool.scheduler")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

HELP = "run a taskiq scheduler (taskiq scheduler's arguments), safe to run twice"

DESCRIPTION = """\
Run the TaskiqScheduler named by SCHEDULER (module:attr, or a function returning one) with
taskiq's scheduler loop, until SIGINT or SIGTERM. Arguments are those of `taskiq scheduler`.
Before a run is sent it is claimed, so that several schedulers on the same schedules send
each run once: the claim is the first source's run_claim() (a RedisScheduleSource has one),
or a Redis given with --claims URL.
"""

_LOG_FORMAT = "[%(asctime)s][%(levelname)-7s][%(module)s:%(funcName)s:%(lineno)d] %(message)s"


def _own_parser() -> argparse.ArgumentParser:
    """pool's options, read before taskiq's parser gets the rest."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument(
        "--claims",
        metavar="URL",
        default=None,
        help="Redis (redis://host:port/db) holding the run claims, for schedulers whose "
        "sources have no run_claim() (e.g. LabelScheduleSource)",
    )
    parser.add_argument(
        "--claims-prefix",
        metavar="PREFIX",
        default="pool:schedule-claims",
        help="key prefix of the claims given with --claims (default: %(default)s)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the scheduler; returns the exit status (``argv`` without the program name)."""
    from taskiq.cli.scheduler.args import SchedulerArgs

    argv = list(sys.argv[1:] if argv is None else argv)
    own, rest = _own_parser().parse_known_args(argv)
    try:
        args = SchedulerArgs.from_cli(rest)
    except SystemExit as exc:
        if "-h" in rest or "--help" in rest:
            print("\n" + DESCRIPTION + "\npool's own options:\n" + _own_help())
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return asyncio.run(_serve(args, own))


def run_scheduler(spec: str, log_level: str = "INFO") -> int:
    """``main([spec, "--log-level", log_level])``: the call ``pool.ops.cli`` makes today."""
    return main([spec, "--log-level", log_level.upper()])


def _own_help() -> str:
    text = _own_parser().format_help()
    return text.split("options:", 1)[-1].strip("\n")


async def _serve(args: Any, own: argparse.Namespace) -> int:
    from taskiq import TaskiqScheduler
    from taskiq.cli.scheduler.run import run_scheduler

    from pool.extensions.scheduler import with_run_claims

    if args.configure_logging:
        logging.basicConfig(level=args.log_level, format=_LOG_FORMAT)
    logging.getLogger("pool").setLevel(args.log_level)
    scheduler = _load(args.scheduler, args.app_dir)
    if scheduler is None:
        return EXIT_USAGE
    if not isinstance(scheduler, TaskiqScheduler):
        logger.error(
            "%s is not a TaskiqScheduler but %s (expected e.g. "
            "scheduler = TaskiqScheduler(broker, [LabelScheduleSource(broker)]))",
            args.scheduler, type(scheduler).__name__,
        )  # fmt: skip
        return EXIT_USAGE
    claims = getattr(with_run_claims(scheduler, _claim_of(own)), "run_claims", None)
    args.scheduler = scheduler
    logger.info(
        "scheduler %s with %d source(s); run claims: %s",
        type(scheduler).__name__, len(scheduler.sources),
        claims.claim if claims is not None else "none (every run is sent)",
    )  # fmt: skip
    stopping = _stop_on_signals()
    try:
        await run_scheduler(args)
    except asyncio.CancelledError:
        if not stopping.is_set():
            raise
        return EXIT_OK  # stopped while starting
    except Exception as exc:
        logger.error("the scheduler failed: %s: %s", type(exc).__name__, exc, exc_info=True)
        return EXIT_FAILED
    finally:
        _restore_signals()
    logger.info("scheduler stopped")
    return EXIT_OK


def _load(spec: str, app_dir: str | None) -> Any:
    """The object ``spec`` names (called when it is a function, as taskiq does), or None."""
    from taskiq.cli.utils import import_object

    if spec.count(":") != 1:
        logger.error("expected MODULE:ATTR (e.g. app:scheduler), got %r", spec)
        return None
    try:
        found = import_object(spec, app_dir=app_dir)
        return found() if inspect.isfunction(found) else found
    except Exception as exc:
        logger.error("cannot import %s: %s: %s", spec, type(exc).__name__, exc, exc_info=True)
        return None


def _claim_of(own: argparse.Namespace) -> Any:
    if own.claims is None:
        return None
    from pool.redis import RedisRunClaim

    return RedisRunClaim(own.claims, prefix=own.claims_prefix)


def _stop_on_signals() -> asyncio.Event:
    """SIGINT and SIGTERM cancel the running scheduler; taskiq's loop then shuts it down."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    stopping = asyncio.Event()

    def stop(sig: signal.Signals) -> None:
        if not stopping.is_set():
            logger.info("%s: stopping the scheduler", sig.name)
            stopping.set()
            if task is not None:
                task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop, sig)
    return stopping


def _restore_signals() -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)


if __name__ == "__main__":
    sys.exit(main())
