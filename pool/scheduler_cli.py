"""``python -m pool scheduler MODULE:ATTR``: run a TaskiqScheduler until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal

from pool.app import AppImportError, load_object
from pool.runner import configure_logging, run_event_loop

logger = logging.getLogger("pool.scheduler")


async def _serve(scheduler: object) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await scheduler.startup()  # type: ignore[attr-defined]
    try:
        await scheduler.run_forever(stop)  # type: ignore[attr-defined]
    finally:
        await scheduler.shutdown()  # type: ignore[attr-defined]


def run_scheduler(spec: str, log_level: str = "INFO") -> int:
    from pool.scheduler import TaskiqScheduler

    configure_logging(log_level, "scheduler")
    try:
        scheduler = load_object(spec)
    except AppImportError as exc:
        logger.error("%s", exc)
        return 2
    if not isinstance(scheduler, TaskiqScheduler):
        logger.error("%s is a %s, not a TaskiqScheduler", spec, type(scheduler).__name__)
        return 2
    run_event_loop(_serve(scheduler))
    return 0
