"""``run_inline``: a worker runs a callback in its consumer's task until it first waits; from
then on that task hosts it alone, as a task of its own would."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from pool.runtime.inline import run_inline

seen: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="unset")


async def test_a_coroutine_that_never_waits_ends_inline_in_a_context_of_its_own() -> None:
    async def quick() -> None:
        seen.set("changed")

    assert run_inline(quick()) is None
    assert seen.get() == "unset"


async def test_a_coroutine_that_waits_keeps_one_task_and_its_context_to_its_end() -> None:
    tasks: list[asyncio.Task[None] | None] = []

    async def slow() -> str:
        seen.set("mine")
        tasks.append(asyncio.current_task())
        async with asyncio.timeout(5):  # bound to the task it started in
            await asyncio.sleep(0.01)
        tasks.append(asyncio.current_task())
        return seen.get()

    async def host() -> str:
        waiting = run_inline(slow())
        assert waiting is not None
        result: str = await waiting
        return result

    task = asyncio.create_task(host())
    assert await task == "mine"
    assert tasks == [task, task]
    assert seen.get() == "unset"


async def test_cancelling_the_host_cancels_the_coroutine_where_it_waits() -> None:
    cleaned = asyncio.Event()

    async def waits_forever() -> None:
        try:
            await asyncio.sleep(60)
        finally:
            cleaned.set()

    async def host() -> None:
        waiting = run_inline(waits_forever())
        assert waiting is not None
        await waiting

    task = asyncio.create_task(host())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned.is_set()


async def test_an_error_after_the_first_wait_reaches_the_host() -> None:
    async def fails() -> None:
        await asyncio.sleep(0)
        raise ValueError("late")

    waiting = run_inline(fails())
    assert waiting is not None
    with pytest.raises(ValueError, match="late"):
        await waiting
