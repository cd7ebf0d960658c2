"""``python -m pool cancel TASK_ID``: cancel a queued or running task of the embedded broker."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from taskiq.exceptions import SendTaskError


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


def run(args: argparse.Namespace) -> int:
    from pool.runtime.client import request

    try:
        reply = asyncio.run(request({"cmd": "cancel", "task_id": args.task_id}, args.run_dir, 10))
    except SendTaskError as exc:
        print(f"pool cancel: {exc}", file=sys.stderr)
        return 1
    if not reply.get("ok"):
        print(f"pool cancel: {reply.get('error')}", file=sys.stderr)
        return 1
    print(f"{reply['detail']} ({reply['state']})")
    return 0 if reply["cancelled"] else 1
