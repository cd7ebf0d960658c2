"""The producer's side of the control socket: send tasks, receive results, ask for stats."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pool.exceptions import SendTaskError
from pool.protocol import FrameError, FrameProtocol, Op, decode_json, encode_json
from pool.rundir import RunDir

logger = logging.getLogger("pool.client")

ResultSink = Callable[[str, bytes], None]


class ControlClient(FrameProtocol):
    """One authenticated connection to a supervisor."""

    def __init__(self, authkey: bytes, on_result: ResultSink | None = None) -> None:
        super().__init__(authkey=authkey, server_side=False)
        self.on_result = on_result
        self._replies: dict[int, asyncio.Future[Any]] = {}
        self._next_request = 0
        self.lost_callbacks: list[Callable[[], None]] = []

    @property
    def peer(self) -> str:
        return "pool client"

    def frame_received(self, op: int, fields: list[bytes]) -> None:
        if op == Op.RESULT and len(fields) == 2:
            if self.on_result is not None:
                self.on_result(fields[0].decode(), fields[1])
        elif op == Op.REPLY:
            reply = decode_json(fields)
            reply_id = reply.get("id") if isinstance(reply, dict) else None
            waiter = self._replies.pop(reply_id, None) if isinstance(reply_id, int) else None
            if waiter is not None and not waiter.done():
                waiter.set_result(reply)
        elif op == Op.ERROR:
            logger.error("pool supervisor: %s", decode_json(fields).get("message"))
        else:
            raise FrameError(f"unexpected op {op} from the supervisor")

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
        self.send_raw(encode_json(Op.REQUEST, {**payload, "id": request_id}))
        try:
            return await asyncio.wait_for(waiter, timeout)
        finally:
            self._replies.pop(request_id, None)


async def connect(
    run_dir: str | Path | None = None,
    on_result: ResultSink | None = None,
    timeout: float = 5.0,
) -> ControlClient:
    """Connect and authenticate to the pool in ``run_dir``; ``SendTaskError`` when none runs."""
    rd = RunDir.at(run_dir)
    try:
        authkey = rd.read_authkey()
        loop = asyncio.get_running_loop()
        _, client = await asyncio.wait_for(
            loop.create_unix_connection(
                lambda: ControlClient(authkey, on_result), str(rd.control_socket)
            ),
            timeout,
        )
        await asyncio.wait_for(client.ready, timeout)
    except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
        raise SendTaskError(
            f"no pool is running in {rd.path} ({type(exc).__name__}: {exc}); "
            "start one with `python -m pool run module:broker`"
        ) from exc
    return client


async def request(
    payload: dict[str, Any], run_dir: str | Path | None = None, timeout: float | None = 30.0
) -> Any:
    """One command to the supervisor (``{"cmd": "stats"}``, ...), returns its JSON reply."""
    client = await connect(run_dir)
    try:
        return await client.request(payload, timeout)
    finally:
        client.close()


def dumps(payload: Any) -> str:
    return json.dumps(payload, indent=2, sort_keys=True)
