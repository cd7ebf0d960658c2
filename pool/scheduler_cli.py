"""``python -m pool scheduler MODULE:ATTR``: run a TaskiqScheduler until SIGINT/SIGTERM.

Exit status: 0 after SIGINT or SIGTERM (the scheduler finishes the current tick, stops its
sources and its broker), 2 when MODULE:ATTR cannot be imported or is not a TaskiqScheduler,
1 when the scheduler fails to start.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING

# Nothing heavy at import time: ``pool.cli`` may import DESCRIPTION and HELP for its parser.
if TYPE_CHECKING:
    from pool.scheduler import TaskiqScheduler

logger = logging.getLogger("pool.scheduler")

EXIT_OK, EXIT_START_FAILED, EXIT_USAGE = 0, 1, 2

DESCRIPTION = """\
Run the TaskiqScheduler named by MODULE:ATTR (e.g. app:scheduler) until SIGINT or SIGTERM,
then exit 0. It reads its schedule sources once a second and sends each due task through
its broker.

Missed runs: cron and interval runs that fell due while no scheduler was running are not
sent on start (cron considers the current minute only; an interval starts counting at the
first tick). A scheduler that falls behind sends each due schedule once, late, never a burst
of the runs it missed. One-shot (time) schedules that became due while it was down are sent
once at start, then deleted from their source.

Several schedulers may run at once when they share a run claim (claim=RedisRunClaim(url),
or a RedisScheduleSource, whose claim is used by default): each run is sent by one of them.
"""

HELP = "run a TaskiqScheduler (cron, one-shot and interval schedules)"
"""For ``pool.cli``: ``commands.add_parser("scheduler", help=HELP, description=DESCRIPTION,
formatter_class=argparse.RawDescriptionHelpFormatter)``."""


async def _serve(scheduler: TaskiqScheduler) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            await scheduler.startup()
        except Exception as exc:
            logger.error(
                "the scheduler failed to start: %s: %s", type(exc).__name__, exc, exc_info=True
            )
            try:
                await scheduler.shutdown()
            except Exception:
                logger.debug("shutdown after a failed start failed too", exc_info=True)
            return EXIT_START_FAILED
        try:
            await scheduler.run_forever(stop)
        finally:
            await scheduler.shutdown()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return EXIT_OK


def run_scheduler(spec: str, log_level: str = "INFO") -> int:
    """Run the scheduler named by ``spec`` until SIGINT/SIGTERM; returns the exit status."""
    from pool.app import AppImportError, load_object
    from pool.runner import configure_logging, run_event_loop
    from pool.scheduler import TaskiqScheduler

    configure_logging(log_level, "scheduler")
    try:
        scheduler = load_object(spec)
    except AppImportError as exc:
        logger.error("%s", exc)
        return EXIT_USAGE
    except Exception as exc:  # the module itself raised while being imported
        logger.error("cannot import %s: %s: %s", spec, type(exc).__name__, exc, exc_info=True)
        return EXIT_USAGE
    if not isinstance(scheduler, TaskiqScheduler):
        logger.error(
            "%s is not a TaskiqScheduler but %s (expected e.g. "
            "scheduler = TaskiqScheduler(broker, [LabelScheduleSource(broker)]))",
            spec,
            type(scheduler).__name__,
        )
        return EXIT_USAGE
    return int(run_event_loop(_serve(scheduler)))
