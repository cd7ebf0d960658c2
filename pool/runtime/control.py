"""The supervisor's control socket: producers send tasks and read results; admins ask for
stats and scaling. Every connection first answers the HMAC challenge (see ``protocol``)."""

from __future__ import annotations

import asyncio
import os
from typing import TYPE_CHECKING, Any

from pool.runtime.protocol import (
    Frame,
    FrameError,
    FrameProtocol,
    GetProgress,
    Kick,
    Reply,
    Request,
    Subscribe,
)
from pool.runtime.spool import Entry

if TYPE_CHECKING:
    from pool.runtime.supervisor import Supervisor


class ControlConnection(FrameProtocol):
    """One authenticated producer or admin connection on the control socket."""

    coalesce_writes = True

    def __init__(self, supervisor: Supervisor) -> None:
        super().__init__(authkey=supervisor.authkey, server_side=True)
        self.supervisor = supervisor
        self.subscriptions: set[str] = set()

    @property
    def peer(self) -> str:
        return "control connection"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.supervisor.connections.add(self)

    def frame_received(self, frame: Frame) -> None:
        sup = self.supervisor
        if isinstance(frame, Kick):
            sup.enqueue(Entry(frame.task_id, frame.task_name, frame.message, producer=self))
            if sup.queue.full:
                sup.hold_back(self)
        elif isinstance(frame, Subscribe):
            sup.results.subscribe(frame.task_id, self)
        elif isinstance(frame, GetProgress):
            self.send(sup.results.progress_of(frame.task_id))
        elif isinstance(frame, Request):
            if not isinstance(frame.body, dict):
                raise FrameError("a request must be a JSON object")
            sup.spawn_task(answer(sup, self, frame.body))
        else:
            raise FrameError(f"unexpected {type(frame).__name__} frame")

    def pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_closed(self, exc: Exception | None) -> None:
        self.supervisor.forget(self)
        self.supervisor.results.forget(self)


async def answer(sup: Supervisor, conn: ControlConnection, request: dict[str, Any]) -> None:
    """Run one admin command (stats, scale, ping) and send the reply."""
    reply: dict[str, Any]
    cmd = request.get("cmd")
    try:
        if cmd == "stats":
            reply = {"ok": True, "stats": sup.stats()}
        elif cmd == "scale":
            count = int(request["workers"])
            if count < 0:
                raise ValueError("the worker count cannot be negative")
            sup.set_target(count)
            ok, error = await sup.wait_for_target(float(request.get("timeout", 60)))
            reply = {"ok": ok, "error": error, "workers": sup.target}
        elif cmd == "ping":
            reply = {"ok": True, "pid": os.getpid()}
        else:
            reply = {"ok": False, "error": f"unknown command {cmd!r}"}
    except (KeyError, TypeError, ValueError) as exc:
        reply = {"ok": False, "error": f"bad request: {exc}"}
    reply["id"] = request.get("id")
    conn.send(Reply(reply))
