"""A worker that takes its tasks from an external broker (Redis) instead of the supervisor.

Each worker process is its own consumer: it pulls at most ``limit`` messages at a time,
runs them through the receiver (which acknowledges after the result is saved), and tells
the supervisor what finished so that stats and metrics cover the whole pool.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from pool.utils import maybe_awaitable

logger = logging.getLogger("pool.consumer")

Report = Callable[[str, bool, float], None]


class Consumer:
    def __init__(self, broker: Any, receiver: Any, limit: int, report: Report) -> None:
        self.broker = broker
        self.receiver = receiver
        self.slots = asyncio.Semaphore(limit)
        self.report = report
        self.running: set[asyncio.Task[None]] = set()
        self.idle = asyncio.Event()
        self.idle.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Pull and start messages until ``stop`` is set; in-flight tasks keep running."""
        messages = self.broker.listen().__aiter__()
        stopped = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                await self.slots.acquire()
                pulled = asyncio.ensure_future(messages.__anext__())
                await asyncio.wait({pulled, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not pulled.done():
                    # Stopping: a message read but not acknowledged goes back to the broker
                    # (another consumer claims it), so nothing is lost by cancelling here.
                    pulled.cancel()
                    self.slots.release()
                    break
                try:
                    raw = pulled.result()
                except StopAsyncIteration:
                    self.slots.release()
                    break
                self._start(raw)
        finally:
            stopped.cancel()
            await _close(messages)

    def _start(self, raw: Any) -> None:
        task = asyncio.create_task(self._execute(raw))
        self.running.add(task)
        self.idle.clear()
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.running.discard(task)
        self.slots.release()
        if not self.running:
            self.idle.set()

    async def _execute(self, raw: Any) -> None:
        started = time.perf_counter()
        message = self.receiver.parse(raw)
        if message is None:  # logged by parse(); it can never succeed, so drop it
            ack = getattr(raw, "ack", None)
            if ack is not None:
                await maybe_awaitable(ack())
            self.report("unparsable", True, 0.0)
            return
        failed = True
        try:
            result = await self.receiver.callback(raw, message)
            failed = result is not None and result.is_err
        except Exception:
            logger.exception("task %s crashed the receiver", message.task_name)
        self.report(message.task_name, failed, time.perf_counter() - started)


async def _close(messages: Any) -> None:
    close = getattr(messages, "aclose", None)
    if close is not None:
        try:
            await close()
        except (RuntimeError, Exception):  # a generator still running its cancelled step
            logger.debug("closing the broker's listen() failed", exc_info=True)
