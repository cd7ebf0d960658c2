"""A coroutine's first step run at once, and a task only for the rest if it has to wait.

taskiq's prefetcher (and pool's cancel-safe ``listen``) wrap every ``anext()`` of a broker's
``listen()`` in a task of its own, so that it can be raced with a stop signal or shielded.
When the broker has the next message ready (the rest of a batch it read), that task costs two
turns of the event loop and the callbacks around it, per message: a batch then reaches the
runner one message at a time, and its tasks finish, save and acknowledge one at a time.
Python 3.12's eager tasks do what :func:`eager` does; Python 3.11 has none.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Coroutine
from typing import Any, TypeVar

_T = TypeVar("_T")


_STARTED = object()


class _Resumed(Coroutine[Any, Any, Any]):
    """A coroutine whose first step already ran and suspended on ``pending``, run by a task
    from there on: its task's first step hands the task ``pending``, and what the task sends
    or throws in later goes on to the coroutine (a task cancelled before it ever ran throws
    the cancellation in at the coroutine's suspension point, so it still hears of it)."""

    __slots__ = ("pending", "step")

    def __init__(self, step: Any, pending: Any) -> None:
        self.step, self.pending = step, pending

    def send(self, value: Any) -> Any:
        pending = self.pending
        if pending is _STARTED:
            return self.step.send(value)
        self.pending = _STARTED
        return pending

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        self.pending = _STARTED
        return self.step.throw(typ, val, tb) if val is not None else self.step.throw(typ)

    def close(self) -> None:
        self.step.close()

    def __next__(self) -> Any:
        return self.send(None)

    def __iter__(self) -> _Resumed:
        return self

    def __await__(self) -> _Resumed:
        return self


def eager(coro: Awaitable[_T]) -> asyncio.Future[_T]:
    """Run ``coro`` until it first waits: a future already done (its result or error) when it
    never did, else a task running the rest. The first step runs in the caller's context.
    An awaitable that is not a coroutine (no ``send``) becomes a task, as ``ensure_future``
    makes it."""
    loop = asyncio.get_running_loop()
    if not hasattr(coro, "send"):
        return asyncio.ensure_future(coro)
    try:
        pending = coro.send(None)
    except StopIteration as stop:
        done: asyncio.Future[_T] = loop.create_future()
        done.set_result(stop.value)
        return done
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:
        failed: asyncio.Future[_T] = loop.create_future()
        failed.set_exception(exc)
        return failed
    return asyncio.ensure_future(_Resumed(coro, pending))
