"""What taskiq's own code costs per no-op task in one process, without any pool I/O: the
floor under each process of pool's embedded path.

- producer: taskiq's ``AsyncKicker.kiq`` with a broker whose ``kick`` does nothing, plus
  decoding the task's result (``TaskiqResult`` from the broker's serializer);
- worker: taskiq's ``Receiver.callback`` on the message, awaited in one task, with an
  acknowledgement and a result backend that do nothing but encode the result;
- supervisor: decoding and encoding its frames of one task (Kick, Task, Done, Result and
  the two journal records), the least any router of opaque bytes does.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.stats import median


def _us(start: float, count: int) -> float:
    return (time.process_time() - start) / count * 1e6


async def _measure(count: int) -> dict[str, float]:
    from taskiq import AckableMessage, TaskiqResult
    from taskiq.kicker import AsyncKicker
    from taskiq.receiver import Receiver

    from pool import PoolBroker
    from pool.runtime import protocol as p

    broker = PoolBroker()

    @broker.task(task_name="noop")
    async def noop() -> None:
        return None

    sent: list[Any] = []

    async def kick(message: Any) -> None:
        sent.append(message)

    broker.kick = kick  # type: ignore[method-assign]
    kicker: AsyncKicker[Any, Any] = AsyncKicker(task_name="noop", broker=broker, labels={})
    result: TaskiqResult[None] = TaskiqResult(
        is_err=False, return_value=None, execution_time=0.0, log=None
    )
    payload = broker.pool_results.encode(result)
    start = time.process_time()
    for _ in range(count):
        await kicker.kiq()
        broker.pool_results.decode(payload)
    producer = _us(start, count)

    class Link:
        def acknowledge(self, delivery: int, task_id: str) -> None: ...

        def save_result(self, task_id: str, payload: bytes) -> None: ...

    broker.worker_link = Link()  # type: ignore[assignment]
    receiver = Receiver(broker, executor=ThreadPoolExecutor(1), run_startup=False)

    def ack() -> None: ...

    start = time.process_time()
    for message in sent:
        await receiver.callback(AckableMessage(data=message.message, ack=ack))
    worker = _us(start, len(sent))

    one = sent[0]
    frames = [
        p.Kick(one.task_id, one.task_name, one.message),
        p.Task(1, one.task_id, one.message),
        p.Done(1, one.task_id, payload, 1, 100),
        p.Result(one.task_id, payload),
        p.Spooled(one.task_id, one.task_name, one.message, 0),
        p.Settled(one.task_id, payload),
    ]
    encoded = [f.encode() for f in frames]
    start = time.process_time()
    for _ in range(count):
        p.decode_frame(p.Op.KICK, encoded[0][5:])
        p.decode_frame(p.Op.DONE, encoded[2][5:])
        for frame in frames[1:]:
            frame.encode()
    supervisor = _us(start, count)
    return {"producer": producer, "supervisor": supervisor, "worker": worker}


def measure(count: int = 20_000, rounds: int = 3) -> dict[str, float]:
    """Medians of ``rounds`` runs, µs of CPU per task."""
    import logging

    logging.getLogger("taskiq.receiver.receiver").setLevel(logging.ERROR)
    runs = [asyncio.run(_measure(count)) for _ in range(rounds)]
    return {key: median([run[key] for run in runs]) for key in runs[0]}


if __name__ == "__main__":
    import json

    print(json.dumps(measure(), indent=1))
