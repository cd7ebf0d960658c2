"""``python -m pool cancel TASK_ID``: cancel a queued or running task of the embedded broker."""

from __future__ import annotations

import argparse
from typing import Any


def add_parser(commands: Any) -> None:
    cancel = commands.add_parser(
        "cancel",
        help="cancel a queued or running task (PoolBroker)",
        description="Cancel a task of the running pool's embedded broker: a queued task never "
        "starts, a running one is stopped (an async task gets CancelledError; a sync one is "
        "stopped by replacing its worker). Its producer gets a TaskCancelledError result. "
        "Exit status 0 when it was cancelled, 1 when it had finished, is unknown or no pool "
        "answers.",
    )
    cancel.add_argument("task_id", metavar="TASK_ID")
    cancel.add_argument("--run-dir", default=None, help="run directory of the pool")
    cancel.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pool.ops.cli import ask_or_say_why

    reply = ask_or_say_why("cancel", {"cmd": "cancel", "task_id": args.task_id}, args.run_dir, 10)
    if reply is None:
        return 1
    print(f"{reply['detail']} ({reply['state']})")
    return 0 if reply["cancelled"] else 1
