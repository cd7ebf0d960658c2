"""``pool.runtime.eager``: a coroutine's first step at once, a task only for what waits; and
pool's receiver, which takes a broker's ready messages with it (a batch starts in one turn of
the event loop, where taskiq's prefetcher takes a few turns per message)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import pytest
from taskiq import AsyncBroker, BrokerMessage, TaskiqMessage
from taskiq.receiver import Receiver

from pool import Context, TaskiqDepends
from pool.runtime.eager import eager
from pool.runtime.receiver import PoolReceiver

pytestmark = pytest.mark.timeout(30)


async def test_a_coroutine_that_never_waits_is_done_at_once() -> None:
    async def ready() -> int:
        return 7

    step = eager(ready())
    assert step.done() and not isinstance(step, asyncio.Task)
    assert step.result() == 7


async def test_an_error_in_the_first_step_is_the_futures() -> None:
    async def broken() -> None:
        raise LookupError("no message")

    step = eager(broken())
    assert step.done()
    with pytest.raises(LookupError, match="no message"):
        step.result()


async def test_a_coroutine_that_waits_goes_on_in_a_task_with_what_it_awaited() -> None:
    first = asyncio.get_running_loop().create_future()
    seen: list[str] = []

    async def two_waits() -> str:
        seen.append("first step")
        value = await first
        await asyncio.sleep(0)
        return f"got {value}"

    step = eager(two_waits())
    assert seen == ["first step"] and not step.done()
    first.set_result("it")
    assert await asyncio.wait_for(step, 5) == "got it"


@pytest.mark.parametrize("turns", [0, 1], ids=["before its task ran", "while it waits"])
async def test_cancelling_the_rest_reaches_the_coroutine(turns: int) -> None:
    cleaned: list[bool] = []

    async def waits_forever() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append(True)

    step = eager(waits_forever())
    for _ in range(turns):
        await asyncio.sleep(0)  # the task's first step: it hands the task the coroutine's wait
    step.cancel()
    with pytest.raises(asyncio.CancelledError):
        await step
    assert cleaned == [True]


# ------------------------------------------------------------------ the receiver
class _BatchBroker(AsyncBroker):
    """A broker whose ``listen()`` has ``count`` messages ready, then waits for more."""

    def __init__(self, count: int) -> None:
        super().__init__()
        self.count = count
        self.closed = asyncio.Event()
        self.started_turns: list[int] = []
        self.all_started = asyncio.Event()

    async def kick(self, message: BrokerMessage) -> None:
        raise NotImplementedError

    async def listen(self) -> AsyncGenerator[bytes, None]:
        try:
            for n in range(self.count):
                message = TaskiqMessage(
                    task_id=f"t{n}", task_name="note", labels={}, args=[], kwargs={}
                )
                yield self.formatter.dumps(message).message
            await asyncio.Event().wait()
        finally:
            self.closed.set()


async def _start_turns(receiver_class: type[Receiver], count: int) -> list[int]:
    """The turn of the event loop in which each of ``count`` ready messages started."""
    broker = _BatchBroker(count)
    loop = asyncio.get_running_loop()
    turn = [0]

    def tick() -> None:
        turn[0] += 1
        ticking[0] = loop.call_soon(tick)

    ticking = [loop.call_soon(tick)]

    @broker.task(task_name="note")
    async def note() -> None:
        broker.started_turns.append(turn[0])
        if len(broker.started_turns) == count:
            broker.all_started.set()

    receiver = receiver_class(broker, run_startup=False, max_async_tasks=count)
    finish = asyncio.Event()
    listening = asyncio.create_task(receiver.listen(finish))
    try:
        await asyncio.wait_for(broker.all_started.wait(), 10)
        finish.set()  # while the broker waits for a message: listen() must still end
        await asyncio.wait_for(listening, 10)
        assert broker.closed.is_set()
    finally:
        ticking[0].cancel()
        listening.cancel()
    return broker.started_turns


async def test_a_ready_batch_starts_in_one_turn_under_pools_receiver() -> None:
    turns = await _start_turns(PoolReceiver, 50)
    assert len(turns) == 50
    assert max(turns) - min(turns) == 0


async def test_taskiqs_receiver_takes_turns_for_each_message_of_the_batch() -> None:
    """What the fast path saves: the same batch under taskiq's own prefetcher."""
    turns = await _start_turns(Receiver, 50)
    assert len(turns) == 50
    assert max(turns) - min(turns) >= 50


class _EndingBroker(_BatchBroker):
    """``listen()`` has its messages ready, then ends, or fails with ``error``."""

    def __init__(self, count: int, error: Exception | None = None) -> None:
        super().__init__(count)
        self.error = error

    async def listen(self) -> AsyncGenerator[bytes, None]:
        for n in range(self.count):
            message = TaskiqMessage(
                task_id=f"t{n}", task_name="note", labels={}, args=[], kwargs={}
            )
            yield self.formatter.dumps(message).message
        if self.error is not None:
            raise self.error


async def _listen_to(broker: _EndingBroker) -> list[str]:
    ran: list[str] = []

    @broker.task(task_name="note")
    async def note(context: Context = TaskiqDepends()) -> None:
        ran.append(context.message.task_id)

    receiver = PoolReceiver(broker, run_startup=False, max_async_tasks=10)
    await asyncio.wait_for(receiver.listen(asyncio.Event()), 10)
    return ran


async def test_a_listen_that_ends_ends_the_receiver_after_its_tasks() -> None:
    assert sorted(await _listen_to(_EndingBroker(3))) == ["t0", "t1", "t2"]


async def test_a_listen_that_fails_at_once_fails_the_receiver_as_in_taskiq() -> None:
    with pytest.raises(Exception) as raised:  # taskiq's task group: the same under taskiq
        await _listen_to(_EndingBroker(0, ConnectionError("broker gone")))
    errors = getattr(raised.value, "exceptions", [raised.value])
    assert [repr(error) for error in errors] == ["ConnectionError('broker gone')"]
