"""``python -m pool health`` and ``python -m pool events``: the pool seen from outside."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any


def add_observe_commands(commands: Any) -> None:
    health = commands.add_parser(
        "health",
        help="exit 0 if the pool is up and at its target worker count",
        description="For container probes: exit 0 when the pool answers, is not stopping and "
        "has as many ready workers as its target (and, for a PoolBroker, room in its queue); "
        "otherwise print why and exit 1 (3: no pool answers).",
    )
    health.add_argument("--run-dir", default=None, help="run directory of the pool")
    health.add_argument(
        "--timeout", type=float, default=5.0, metavar="SECONDS", help="(default: %(default)s)"
    )
    health.set_defaults(handler=run_command)
    events = commands.add_parser(
        "events",
        help="print the pool's task and worker events as they happen",
        description="Print the pool's events (received, started, succeeded, failed with its "
        "traceback, retried, worker_up, worker_gone, dropped) until Ctrl+C or the pool stops.",
    )
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    events.add_argument("--run-dir", default=None, help="run directory of the pool")
    events.set_defaults(handler=run_command)


def run_command(args: argparse.Namespace) -> int:
    if args.command == "health":
        from pool.ops.health import check

        status, text = check(args.run_dir, args.timeout)
        print(text, file=sys.stdout if status == 0 else sys.stderr)
        return status
    return _events(args.run_dir, args.json)


def _events(run_dir: str | None, as_json: bool) -> int:
    from taskiq.exceptions import SendTaskError

    from pool.runtime.events import event_batches, event_lines
    from pool.runtime.runner import run_event_loop

    async def follow() -> None:
        out = sys.stdout.buffer
        if as_json:  # one write for each frame of the supervisor
            async for blob in event_lines(run_dir):
                out.write(blob + b"\n")
                out.flush()
            return
        async for batch in event_batches(run_dir):
            out.write("".join(f"{describe(item)}\n" for item in batch).encode())
            out.flush()

    try:
        run_event_loop(follow())
    except SendTaskError as exc:
        print(f"pool events: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def describe(item: dict[str, Any]) -> str:
    """One event as one line for a person (a failure: its traceback after it)."""
    when = time.strftime("%H:%M:%S", time.localtime(item.get("time", 0)))
    kind = item.get("event", "?")
    where = f" worker {item['worker']}" if item.get("worker") is not None else ""
    if kind in ("worker_up", "worker_gone"):
        extra = ""
        if "reason" in item:
            extra = f" ({item['reason']}, exit status {item.get('exitcode')})"
        return f"{when} {kind:<11} worker {item.get('worker')} pid {item.get('pid')}{extra}"
    if kind == "dropped":
        return f"{when} {kind:<11} {item.get('count')} event(s) missed: this reader was slow"
    line = f"{when} {kind:<11} {item.get('task_name')} {item.get('task_id')}{where}"
    if "duration" in item:
        line += f" {item['duration'] * 1000:.1f} ms"
    if kind == "retried":
        line += f" attempt {item.get('attempt')}"
    if kind == "failed":
        line += f": {item.get('error')}\n{item.get('traceback', '').rstrip()}"
    return line
