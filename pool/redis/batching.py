"""One round trip for many tasks: writes gathered per event-loop turn, and Lua scripts run by
their hash.

A worker finishes many tasks at once; saving each result (and acknowledging each message) in
a round trip of its own costs Redis little but the worker a lot: redis-py spends more time per
command than Redis does. A :class:`Batcher` gathers what is submitted while the event loop
runs the other ready callbacks, and while the previous batch is in flight, then sends it in
one call; each submitter waits for its own batch and sees its error, so retries stay with the
caller. Before it sends, a batch waits one turn of the loop (the tasks that finished in this
turn join it); under load, the writes of many tasks share a call, since what is submitted
while a batch is in flight goes with the next one.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

_Op = TypeVar("_Op")

# the most operations sent in one call (a bound on the size of one command)
BATCH_LIMIT = 500


class Batcher(Generic[_Op]):
    """Operations submitted by concurrent coroutines, sent ``send(ops)`` at a time.

    Belongs to one event loop. A submitter that is cancelled does not withdraw its operation:
    it is sent all the same (what is sent is a save or an acknowledgement, harmless twice).
    """

    def __init__(
        self, send: Callable[[list[_Op]], Awaitable[None]], limit: int = BATCH_LIMIT
    ) -> None:
        self._send = send
        self._limit = limit
        self._pending: list[tuple[_Op, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None

    async def submit(self, op: _Op) -> None:
        """Return once ``op`` was sent with its batch; raise the batch's error."""
        await self.add(op)

    def add(self, op: _Op) -> asyncio.Future[None]:
        """:meth:`submit` without a coroutine of its own: the future of ``op``'s batch (a
        producer's burst holds one per task while it waits)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pending.append((op, future))
        if self._task is None:
            self._task = loop.create_task(self._flush())
        return future

    async def _flush(self) -> None:
        try:
            while self._pending:
                await asyncio.sleep(0)  # one turn: what finishes in it joins the batch
                batch = self._pending[: self._limit]
                del self._pending[: self._limit]
                try:
                    await self._send([op for op, _ in batch])
                except asyncio.CancelledError:
                    for _, future in batch:
                        future.cancel()
                    raise
                except BaseException as exc:
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    for _, future in batch:
                        if not future.done():
                            future.set_result(None)
        finally:
            self._task = None
            for _, future in self._pending:  # left by a cancelled flush
                future.cancel()
            self._pending = []


class Script:
    """A Lua script run by its SHA1 (``EVALSHA``), given in full once Redis lacks it (a
    restarted Redis, or the first call)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, client: aioredis.Redis, keys: list[Any], args: list[Any]) -> Any:
        try:
            return await command(client, "EVALSHA", self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await command(client, "EVAL", self.source, len(keys), *keys, *args)


async def command(client: aioredis.Redis, *args: Any) -> Any:
    """The raw reply of one command (no response callback), sent on a pooled connection
    without redis-py's per-command layers (retry wrapper, observability), which cost more
    than the command. A command that fails on a lost connection (a pooled connection to a
    Redis that restarted) is tried twice more on a new connection, as pool's clients retry
    (it may then run twice)."""
    pool = client.connection_pool
    for attempt in range(3):
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(conn.pack_command(*args), False)
            return await conn.read_response()
        except ResponseError:
            raise  # a whole reply was read: the connection is fine
        except (RedisConnectionError, RedisTimeoutError, OSError):
            await conn.disconnect()
            if attempt == 2:
                raise
        except BaseException:
            await conn.disconnect(nowait=True)  # cancelled: a reply may be left unread
            raise
        finally:
            await pool.release(conn)
        await asyncio.sleep(0.05 * 2**attempt * random.uniform(0.5, 1.0))
    raise AssertionError("unreachable")
