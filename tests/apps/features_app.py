"""taskiq features on PoolBroker under a real pool: typed arguments and results, labels,
acknowledgement types, progress, middlewares. Task names are explicit so that the test
process (which imports this as ``tests.apps.features_app``) and the workers agree."""

from __future__ import annotations

import asyncio
import datetime
import os
import time

from pydantic import BaseModel
from taskiq import Context, TaskiqDepends, TaskiqMessage, TaskiqMiddleware, TaskiqResult
from taskiq.depends.progress_tracker import ProgressTracker, TaskState

from pool import PoolBroker


class Order(BaseModel):
    id: int
    amount: float
    at: datetime.datetime


class Receipt(BaseModel):
    order_id: int
    total: float
    weekday: int


class StampMiddleware(TaskiqMiddleware):
    """A third-party style middleware: it labels every message before it runs."""

    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        message.labels["stamped_by"] = str(os.getpid())
        return message

    def post_save(self, message: TaskiqMessage, result: TaskiqResult[object]) -> None:
        if message.task_name == "features:stamp" and os.environ.get("POOL_TEST_MARKS"):
            path = os.path.join(os.environ["POOL_TEST_MARKS"], f"saved-{message.task_id}")
            with open(path, "w") as handle:
                handle.write("saved")


broker = PoolBroker().with_middlewares(StampMiddleware())


@broker.task(task_name="features:receipt")
async def receipt(order: Order, tip: float = 0.0) -> Receipt:
    """Arguments arrive parsed into their annotated types (a model, a datetime)."""
    assert isinstance(order, Order) and isinstance(order.at, datetime.datetime)
    return Receipt(order_id=order.id, total=order.amount + tip, weekday=order.at.weekday())


@broker.task(task_name="features:stamp")
async def stamp(context: Context = TaskiqDepends()) -> dict[str, object]:
    """What the task's own message says: its id, its labels."""
    return {"task_id": context.message.task_id, "labels": dict(context.message.labels)}


@broker.task(task_name="features:early_ack", ack_type="when_received")
async def early_ack(x: int) -> int:
    """Acknowledged when received: its result travels after the acknowledgement."""
    return x * 2


@broker.task(task_name="features:progress")
async def progress(
    steps: int, release: str, tracker: ProgressTracker[dict[str, int]] = TaskiqDepends()
) -> int:
    """Reports its progress, then waits (at most 20 s) until the test has read it."""
    for step in range(1, steps + 1):
        await tracker.set_progress(TaskState.STARTED, {"step": step})
    seen = await tracker.get_progress()
    assert seen is not None and seen.meta == {"step": steps}
    deadline = time.monotonic() + 20
    while not os.path.exists(release) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return steps


@broker.task(task_name="features:not_json")
async def not_json() -> object:
    return object()  # the JSON serializer refuses it
