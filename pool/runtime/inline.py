"""Run a coroutine in the current asyncio task until it first suspends.

Most tasks a worker runs (a no-op, a lookup in a cache, a computation) finish without ever
waiting. Giving each its own ``asyncio.Task`` costs more than running it: the task object,
a turn of the event loop to start it, another to see it end. Here the worker's consumer
runs each callback *inline*, in a context of its own (as ``create_task`` would give it);
only a callback that suspends gets a task, and it gets the consumer's: the consumer hosts
it from then on and a new consumer takes over the messages. So every callback runs in one
task from start to end, whatever it does with ``asyncio.current_task()`` (a timeout, a
cancel scope, a cancellation by the pool), and no two callbacks share a task while they
wait.

Python 3.12's eager tasks do the same for every task; pool runs on 3.11 too.
"""

from __future__ import annotations

import contextvars
from collections.abc import Coroutine, Generator
from typing import Any


class Suspended:
    """A coroutine that suspended on its first step: ``await`` it to run it to its end in
    the awaiting task, each step in the coroutine's own context (as a task runs it)."""

    __slots__ = ("context", "coro", "waiting_on")

    def __init__(
        self, coro: Coroutine[Any, Any, Any], context: contextvars.Context, waiting_on: Any
    ) -> None:
        self.coro = coro
        self.context = context
        self.waiting_on = waiting_on

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, run, waiting_on = self.coro, self.context.run, self.waiting_on
        while True:
            try:
                sent = yield waiting_on  # the awaiting task waits for it, as for any await
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:  # a cancellation: the coroutine gets it where it waits
                try:
                    waiting_on = run(coro.throw, exc)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    waiting_on = run(coro.send, sent)
                except StopIteration as stop:
                    return stop.value


def run_inline(coro: Coroutine[Any, Any, Any]) -> Suspended | None:
    """Run ``coro`` in a copy of the current context until it ends (None) or first
    suspends (what to ``await`` to finish it). Its exceptions propagate."""
    context = contextvars.copy_context()
    try:
        waiting_on = context.run(coro.send, None)
    except StopIteration:
        return None
    return Suspended(coro, context, waiting_on)
