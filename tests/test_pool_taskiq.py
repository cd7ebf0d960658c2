"""taskiq's API on PoolBroker under a real pool: what a taskiq user sends, the workers get."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Iterator
from pathlib import Path

import pytest
from taskiq import TaskiqResult
from taskiq.depends.progress_tracker import TaskState

from tests.apps import features_app
from tests.apps.features_app import Order, Receipt
from tests.pool_support import RunningPool, wait_for

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def running() -> Iterator[RunningPool]:
    with RunningPool(workers=2, app="features_app:broker") as pool:
        yield pool


@pytest.fixture
async def broker(running: RunningPool):  # type: ignore[no-untyped-def]
    broker = features_app.broker
    broker.run_dir = running.run_dir
    async with broker:  # taskiq's async context manager: startup, then shutdown
        yield broker


async def test_pydantic_and_datetime_arguments_and_a_model_result(broker) -> None:  # type: ignore[no-untyped-def]
    order = Order(id=7, amount=10.5, at=datetime.datetime(2026, 12, 1, 9, 30))  # a Tuesday
    task = await features_app.receipt.kiq(order, tip=1.5)
    result: TaskiqResult[Receipt] = await task.wait_result(timeout=30)
    assert not result.is_err, result.error
    assert result.return_value == Receipt(order_id=7, total=12.0, weekday=1)


async def test_custom_task_id_and_labels_reach_the_task(broker) -> None:  # type: ignore[no-untyped-def]
    kicker = features_app.stamp.kicker().with_task_id("my-own-id").with_labels(team="billing")
    task = await kicker.kiq()
    assert task.task_id == "my-own-id"
    value = (await task.wait_result(timeout=30)).raise_for_error().return_value
    assert value["task_id"] == "my-own-id"
    assert value["labels"]["team"] == "billing"
    assert value["labels"]["stamped_by"].isdigit()  # the app's middleware ran in the worker


async def test_a_middlewares_post_save_runs_after_the_result_is_saved(
    broker,
    running: RunningPool,  # type: ignore[no-untyped-def]
) -> None:
    task = await features_app.stamp.kiq()
    await task.wait_result(timeout=30)
    wait_for(lambda: (running.marks / f"saved-{task.task_id}").exists(), 10, "post_save")


async def test_ack_when_received_still_delivers_the_result(broker) -> None:  # type: ignore[no-untyped-def]
    handles = [await features_app.early_ack.kiq(i) for i in range(20)]
    values = [(await h.wait_result(timeout=30)).return_value for h in handles]
    assert values == [2 * i for i in range(20)]


async def test_progress_set_in_a_worker_is_read_by_the_producer(
    broker,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    release = tmp_path / "release"
    task = await features_app.progress.kiq(3, str(release))
    deadline = asyncio.get_running_loop().time() + 20
    progress = await task.get_progress()
    while (progress is None or progress.meta != {"step": 3}) and (
        asyncio.get_running_loop().time() < deadline
    ):
        await asyncio.sleep(0.02)
        progress = await task.get_progress()
    assert progress is not None and progress.state == TaskState.STARTED
    assert progress.meta == {"step": 3}
    release.touch()
    assert (await task.wait_result(timeout=30)).return_value == 3


async def test_a_result_json_cannot_hold_becomes_an_error_result(broker) -> None:  # type: ignore[no-untyped-def]
    result = await (await features_app.not_json.kiq()).wait_result(timeout=30)
    assert result.is_err
    assert "could not be serialized" in str(result.error)


async def test_many_producers_tasks_at_once(broker) -> None:  # type: ignore[no-untyped-def]
    order = Order(id=1, amount=1.0, at=datetime.datetime(2026, 1, 1))
    handles = await asyncio.gather(*(features_app.receipt.kiq(order, tip=i) for i in range(200)))
    results = await asyncio.gather(*(h.wait_result(timeout=60) for h in handles))
    assert [r.return_value.total for r in results] == [1.0 + i for i in range(200)]


async def test_a_message_over_the_frame_limit_is_refused_at_kiq(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pool import MessageTooLargeError, PoolBroker
    from pool.runtime import protocol

    monkeypatch.setattr(protocol, "MAX_FRAME", 4096)
    broker = PoolBroker(run_dir=tmp_path)  # no pool needed: refused before connecting

    @broker.task(task_name="features:big")
    async def big(blob: str) -> None: ...

    with pytest.raises(MessageTooLargeError, match="POOL_MAX_FRAME"):
        await big.kiq("x" * 10_000)
