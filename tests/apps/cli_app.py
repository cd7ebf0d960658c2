"""The app of the command-line tests: `python -m pool run cli_app:broker` with taskiq worker's
arguments (a receiver of its own, discovered task modules, logging options)."""

from __future__ import annotations

import logging
import os
from typing import Any

from taskiq import TaskiqDepends, TaskiqState
from taskiq.receiver import Receiver

from pool import PoolBroker

if os.environ.get("POOL_TEST_APP_LOGGING"):  # the app configures logging itself
    logging.basicConfig(level=logging.INFO, format="APPFMT %(name)s %(message)s")

broker = PoolBroker()
log = logging.getLogger("cli_app")


class GreetingReceiver(Receiver):
    """A receiver of the app's own, with an argument of its own (``--receiver_arg``)."""

    greeting = "unset"

    def __init__(self, *args: Any, greeting: str = "none", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        GreetingReceiver.greeting = greeting


@broker.task(task_name="cli.settings")
async def settings(value: int, state: TaskiqState = TaskiqDepends()) -> dict[str, Any]:
    """What this worker runs with: the receiver's argument, and whether ``value`` was parsed."""
    log.info("settings asked")
    return {"greeting": GreetingReceiver.greeting, "value_type": type(value).__name__}


@broker.task(task_name="cli.tasks")
async def tasks() -> list[str]:
    """The names of the tasks this worker knows."""
    return sorted(broker.get_all_tasks())
