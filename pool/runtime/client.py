"""The producer's side of the control socket: send tasks, receive results, ask for stats."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pool.extensions.errors import PoolUnavailableError
from pool.runtime.protocol import (
    Accepted,
    Events,
    Frame,
    FrameError,
    FrameProtocol,
    Progress,
    Reply,
    Request,
    Result,
)
from pool.runtime.rundir import RunDir

logger = logging.getLogger("pool.runtime.client")

ResultSink = Callable[[str, bytes], None]


class ControlClient(FrameProtocol):
    """One authenticated connection to a supervisor."""

    def __init__(
        self,
        authkey: bytes,
        on_result: ResultSink | None = None,
        on_progress: ResultSink | None = None,
    ) -> None:
        super().__init__(authkey=authkey, server_side=False)
        self.on_result = on_result
        self.on_progress = on_progress
        self._replies: dict[int, asyncio.Future[Any]] = {}
        self._next_request = 0
        self.lost_callbacks: list[Callable[[], None]] = []
        # told how many of this connection's Kick frames the supervisor has in its journal
        self.on_accepted: Callable[[int], None] | None = None
        # the events of a subscription (``{"cmd": "events"}``; events.py), as JSON lines
        self.on_events: Callable[[bytes], None] | None = None

    @property
    def peer(self) -> str:
        return "pool client"

    def frame_received(self, frame: Frame) -> None:
        if isinstance(frame, Result):
            if self.on_result is not None:
                self.on_result(frame.task_id, frame.result)
        elif isinstance(frame, Accepted):
            if self.on_accepted is not None:
                self.on_accepted(frame.count)
        elif isinstance(frame, Progress):
            if self.on_progress is not None:
                self.on_progress(frame.task_id, frame.progress)
        elif isinstance(frame, Reply):
            reply = frame.body
            reply_id = reply.get("id") if isinstance(reply, dict) else None
            waiter = self._replies.pop(reply_id, None) if isinstance(reply_id, int) else None
            if waiter is not None and not waiter.done():
                waiter.set_result(reply)
        elif isinstance(frame, Events):
            if self.on_events is not None:
                self.on_events(frame.items)
        else:
            raise FrameError(f"unexpected {type(frame).__name__} frame from the supervisor")

    def connection_closed(self, exc: Exception | None) -> None:
        for waiter in self._replies.values():
            if not waiter.done():
                waiter.set_exception(ConnectionError("the pool closed the connection"))
        self._replies.clear()
        for callback in self.lost_callbacks:
            callback()

    async def request(self, payload: dict[str, Any], timeout: float | None = None) -> Any:
        """Send a command and wait for its reply."""
        waiter: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._next_request += 1
        request_id = self._next_request
        self._replies[request_id] = waiter
        self.send(Request({**payload, "id": request_id}))
        try:
            return await asyncio.wait_for(waiter, timeout)
        finally:
            self._replies.pop(request_id, None)


async def connect(
    run_dir: str | Path | None = None,
    on_result: ResultSink | None = None,
    on_progress: ResultSink | None = None,
    timeout: float = 5.0,
) -> ControlClient:
    """Connect and authenticate to the pool in ``run_dir``; ``SendTaskError`` when none runs."""
    rd = RunDir.at(run_dir)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await _connect_once(rd, on_result, on_progress, deadline - loop.time())
        except PermissionError as exc:  # not worth retrying: a directory of another user
            raise PoolUnavailableError(reason=str(exc)) from exc
        except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
            # A pool that restarts is gone for a moment: retry until the timeout.
            if loop.time() + 0.1 >= deadline:
                raise PoolUnavailableError(
                    reason=f"no pool is running in {rd.path} ({type(exc).__name__}: {exc}); "
                    "start one with `python -m pool run module:broker`"
                ) from exc
            await asyncio.sleep(0.1)


async def _connect_once(
    rd: RunDir, on_result: ResultSink | None, on_progress: ResultSink | None, timeout: float
) -> ControlClient:
    authkey = rd.read_authkey()
    loop = asyncio.get_running_loop()
    _, client = await asyncio.wait_for(
        loop.create_unix_connection(
            lambda: ControlClient(authkey, on_result, on_progress), str(rd.control_socket)
        ),
        max(timeout, 0.05),
    )
    await asyncio.wait_for(client.ready, max(timeout, 0.05))
    # Nothing may wait in this process's buffer: ``drain()`` returns once every byte is in
    # the kernel, whence it reaches the supervisor even if this process exits right away.
    assert client.transport is not None
    client.transport.set_write_buffer_limits(high=0)
    return client


async def request(
    payload: dict[str, Any],
    run_dir: str | Path | None = None,
    timeout: float | None = 30.0,
    connect_timeout: float = 1.0,
) -> Any:
    """One command to the supervisor (``{"cmd": "stats"}``, ...), returns its JSON reply."""
    client = await connect(run_dir, timeout=connect_timeout)
    try:
        return await client.request(payload, timeout)
    finally:
        client.close()


def dumps(payload: Any) -> str:
    return json.dumps(payload, indent=2, sort_keys=True)
