"""The app of tests/test_task_control.py: tasks that say when they ran, and limited ones."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import time
from pathlib import Path

from pool import PoolBroker, SmartRetryMiddleware

broker = PoolBroker(priority_aging=0.2)
broker.add_middlewares(SmartRetryMiddleware(default_retry_count=3, default_delay=0.4))
MARKS = Path(os.environ.get("POOL_TEST_MARKS", "/tmp"))


def _append(name: str, record: object) -> None:
    with open(MARKS / name, "a") as log:
        fcntl.flock(log, fcntl.LOCK_EX)
        log.write(json.dumps(record) + "\n")


@broker.task
async def started_at(tag: str) -> float:
    """Notes (tag, wall-clock time) in the log ``starts`` and returns the time."""
    now = time.time()
    _append("starts", [tag, now])
    return now


@broker.task
def sync_started_at(tag: str) -> float:
    now = time.time()
    _append("starts", [tag, now])
    return now


@broker.task
async def sleep_then_mark(tag: str, seconds: float) -> str:
    """Marks ``started-TAG``, sleeps; on cancellation marks ``cancelled-TAG``."""
    (MARKS / f"started-{tag}").write_text(str(os.getpid()))
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        (MARKS / f"cancelled-{tag}").write_text(str(os.getpid()))
        raise
    (MARKS / f"finished-{tag}").write_text(str(os.getpid()))
    return tag


@broker.task
def sync_sleep_then_mark(tag: str, seconds: float) -> str:
    (MARKS / f"started-{tag}").write_text(str(os.getpid()))
    time.sleep(seconds)
    (MARKS / f"finished-{tag}").write_text(str(os.getpid()))
    return tag


@broker.task
async def block_loop(tag: str, seconds: float) -> str:
    """Blocks its worker's event loop (a cancellation cannot reach it)."""
    (MARKS / f"started-{tag}").write_text(str(os.getpid()))
    time.sleep(seconds)
    (MARKS / f"finished-{tag}").write_text(str(os.getpid()))
    return tag


def _concurrent(name: str, delta: int) -> int:
    """Counts the runs of ``name`` going on now in a file, under a lock; keeps the peak."""
    path = MARKS / f"count-{name}"
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        now, peak = json.loads(f.read() or "[0, 0]")
        now += delta
        peak = max(peak, now)
        f.seek(0)
        f.truncate()
        f.write(json.dumps([now, peak]))
    return now


@broker.task
async def send_email(to: str) -> str:
    _concurrent("send_email", 1)
    try:
        await asyncio.sleep(0.01)
    finally:
        _concurrent("send_email", -1)
    return to


broker.limit(send_email, concurrency=5)


@broker.task(rate_limit="10/s", limit_key="customer_id")
async def charge(customer_id: str, amount: int) -> int:
    _append("charges", [customer_id, time.time()])
    return amount


@broker.task(retry_on_error=True, max_retries=3)
async def fails_twice(tag: str) -> int:
    """Notes its start; fails on its first two attempts."""
    _append("starts", [tag, time.time()])
    attempts = len((MARKS / "starts").read_text().splitlines())
    if attempts < 3:
        raise RuntimeError(f"attempt {attempts} fails")
    return attempts
