"""The supervisor's control socket: producers send tasks and read results; admins ask for
stats and scaling. Every connection first answers the HMAC challenge (see ``protocol``).

What one connection can make the supervisor hold is bounded. Before authentication: one
small frame, ``HANDSHAKE_TIMEOUT`` seconds, and at most ``MAX_UNAUTHENTICATED`` such
connections at once (the others are closed at once; one log line per burst). After it:
while the peer does not read, replies and results wait here (results as the very bytes of
the ResultStore, not copies) and nothing more is read from it; past ``MAX_UNREAD`` bytes
waiting, or once it has read nothing for ``UNREAD_TIMEOUT`` seconds while its replies wait,
the connection is dropped with a log line. Its results stay in the ResultStore, so a new
connection can still ``Subscribe`` to them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import weakref
from collections import Counter, deque
from typing import TYPE_CHECKING, Any

from pool.runtime.protocol import (
    Accepted,
    Frame,
    FrameError,
    FrameProtocol,
    GetProgress,
    Kick,
    KickWith,
    Reply,
    Request,
    Result,
    Subscribe,
)
from pool.runtime.taskqueue import Entry

if TYPE_CHECKING:
    from pool.runtime.supervisor import Supervisor

logger = logging.getLogger("pool.runtime.control")

MAX_UNAUTHENTICATED = 64
# Replies and results written to one connection that its peer has not read yet: above
# WRITE_HIGH_WATER they wait here (and the peer is not read); above MAX_UNREAD it is dropped.
WRITE_HIGH_WATER = 1024 * 1024
MAX_UNREAD = int(os.environ.get("POOL_MAX_UNREAD", 16 * 1024 * 1024))
# s: a peer whose replies wait (its socket is full) and that reads none of them for this
# long is dropped, whatever little it holds: a peer that stopped reading holds nothing for ever
UNREAD_TIMEOUT = float(os.environ.get("POOL_UNREAD_TIMEOUT", 60))
# s: a confirmation waits at most this long for a frame to ride with (see ``confirm``)
CONFIRM_DELAY = float(os.environ.get("POOL_CONFIRM_DELAY", 0.002))
_BURST = 1.0  # s: refusals and failed handshakes within this window share one log line


class HandshakeGate:
    """Counts the connections that have not authenticated yet, refuses those over the cap,
    and logs the ones closed before authenticating, once per burst."""

    def __init__(self, limit: int = MAX_UNAUTHENTICATED) -> None:
        self.limit = limit
        self.waiting = 0
        self.refused = 0  # over the whole run, for tests and stats
        self._burst: Counter[str] = Counter()
        self._timer: asyncio.TimerHandle | None = None

    def admit(self) -> bool:
        if self.waiting >= self.limit:
            self.refused += 1
            self.closed(f"{self.limit} connections were already waiting to authenticate")
            return False
        self.waiting += 1
        return True

    def leave(self) -> None:
        self.waiting -= 1

    def closed(self, reason: str) -> None:
        self._burst[reason.split(" (")[0]] += 1
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(_BURST, self._report)

    def _report(self) -> None:
        self._timer = None
        burst, self._burst = self._burst, Counter()
        logger.warning(
            "control socket: closed %d connection(s) before they authenticated: %s",
            sum(burst.values()),
            "; ".join(f"{count} x {reason}" for reason, count in burst.most_common()),
        )


_gates: weakref.WeakKeyDictionary[Supervisor, HandshakeGate] = weakref.WeakKeyDictionary()


def handshake_gate(supervisor: Supervisor) -> HandshakeGate:
    gate = _gates.get(supervisor)
    if gate is None:
        gate = _gates[supervisor] = HandshakeGate()
    return gate


class ControlConnection(FrameProtocol):
    """One producer or admin connection on the control socket (see the module's doc)."""

    coalesce_writes = True

    def __init__(self, supervisor: Supervisor) -> None:
        super().__init__(authkey=supervisor.authkey, server_side=True)
        self.supervisor = supervisor
        self.subscriptions: set[str] = set()
        self._gate = handshake_gate(supervisor)
        self._gated = False  # counted in the gate: admitted, not authenticated yet
        # frames (or results, as (task id, payload)) waiting for the peer to read, by size
        self._held: deque[tuple[bytes | tuple[str, bytes], int]] = deque()
        self._held_bytes = 0
        self._read_blocks: set[str] = set()
        self._stalled: asyncio.TimerHandle | None = None
        self._confirmation: int | None = None  # an Accepted count not sent yet
        self._confirm_timer: asyncio.TimerHandle | None = None

    @property
    def peer(self) -> str:
        return "control connection"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._gate.admit():
            self.transport = transport  # type: ignore[assignment]
            transport.abort()  # type: ignore[attr-defined]
            return
        self._gated = True
        super().connection_made(transport)
        assert self.transport is not None
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        self.supervisor.connections.add(self)

    def handshake_done(self) -> None:
        if self._gated:
            self._gated = False
            self._gate.leave()

    def handshake_failed(self, reason: str) -> None:
        self._gate.closed(reason)
        self.abort()

    def frame_received(self, frame: Frame) -> None:
        sup = self.supervisor
        if isinstance(frame, Kick):
            sup.enqueue(Entry(frame.task_id, frame.task_name, frame.message, producer=self))
            if sup.queue.full:
                sup.hold_back(self)
        elif isinstance(frame, KickWith):
            entry = Entry(frame.task_id, frame.task_name, frame.message, producer=self)
            entry.control = frame.control if isinstance(frame.control, dict) else None
            sup.enqueue(entry)
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

    # ----------------------------------------------------------------- reading
    def pause(self) -> None:
        """Stop reading while the queue is full: the producer's ``kiq`` waits."""
        self._block_reading("queue")

    def resume(self) -> None:
        self._unblock_reading("queue")

    def _block_reading(self, why: str) -> None:
        if not self._read_blocks and self.transport is not None:
            self.transport.pause_reading()
        self._read_blocks.add(why)

    def _unblock_reading(self, why: str) -> None:
        if why not in self._read_blocks:
            return
        self._read_blocks.discard(why)
        if not self._read_blocks and self.is_open:
            assert self.transport is not None
            self.transport.resume_reading()

    # ----------------------------------------------------------------- writing
    def confirm(self, accepted: int) -> None:
        """Tell the producer that ``accepted`` of its tasks are safe with the pool: with the
        next frame sent to it, or after ``CONFIRM_DELAY``. A lone task's result usually
        comes within that time, and then one wake-up of the producer serves both."""
        self._confirmation = accepted
        if self._flush_scheduled:  # frames leave at the end of this turn: it goes along
            self._send_confirmation()
        elif self._confirm_timer is None:
            self._confirm_timer = self._loop.call_later(CONFIRM_DELAY, self._send_confirmation)

    def _send_confirmation(self) -> None:
        self._confirm_timer = _cancelled(self._confirm_timer)
        accepted, self._confirmation = self._confirmation, None
        if accepted is not None:
            self.send_raw(Accepted(accepted).encode())

    def send_raw(self, frame: bytes) -> None:
        if self._confirmation is not None:
            self._send_confirmation()
        if self._held or self._backlogged():
            self._hold(frame, len(frame))
        else:
            super().send_raw(frame)

    def push_result(self, task_id: str, payload: bytes) -> None:
        """Send a result; while the peer does not read, it waits here unencoded."""
        if self._confirmation is not None:
            self._send_confirmation()
        if self._held or self._backlogged():
            self._hold((task_id, payload), len(payload) + len(task_id) + 13)
        else:
            super().send_raw(Result(task_id, payload).encode())

    @property
    def unread_bytes(self) -> int:
        """What this connection holds for its peer: waiting here or in the write buffer."""
        return self._held_bytes + self.pending_bytes

    def _backlogged(self) -> bool:
        return self._paused or self._outbox_size >= WRITE_HIGH_WATER

    def _hold(self, item: bytes | tuple[str, bytes], size: int) -> None:
        if not self.is_open:
            return
        self._held.append((item, size))
        self._held_bytes += size
        if self._held_bytes > MAX_UNREAD:
            logger.warning(
                "control connection: dropped it: its peer left %d bytes of replies and "
                "results unread (limit %d, POOL_MAX_UNREAD); the results stay in the pool, "
                "for a new connection to ask for",
                self.unread_bytes,
                MAX_UNREAD,
            )
            self._held.clear()
            self._held_bytes = 0
            self.abort()
            return
        self._block_reading("unread")

    def _release(self) -> None:
        """Send what waits here, as far as the peer reads."""
        held = self._held
        while held and not self._backlogged() and self.is_open:
            item, size = held.popleft()
            self._held_bytes -= size
            super().send_raw(item if isinstance(item, bytes) else Result(*item).encode())
        if not held:
            self._unblock_reading("unread")

    def pause_writing(self) -> None:
        """The peer's socket is full: it must read some within ``UNREAD_TIMEOUT``."""
        super().pause_writing()
        if self._stalled is None:
            self._stalled = self._loop.call_later(UNREAD_TIMEOUT, self._drop_stalled)

    def resume_writing(self) -> None:
        self._stalled = _cancelled(self._stalled)
        super().resume_writing()
        if self._held:
            self._release()

    def _drop_stalled(self) -> None:
        self._stalled = None
        if not self._paused or not self.is_open:
            return
        logger.warning(
            "control connection: dropped it: its peer left %d bytes of replies and results "
            "unread for %g s (POOL_UNREAD_TIMEOUT); the results stay in the pool, for a new "
            "connection to ask for",
            self.unread_bytes,
            UNREAD_TIMEOUT,
        )
        self._held.clear()
        self._held_bytes = 0
        self.abort()

    def flush(self) -> None:
        super().flush()
        if self._held and not self._paused:
            self._release()

    def connection_closed(self, exc: Exception | None) -> None:
        self._confirm_timer = _cancelled(self._confirm_timer)
        self._stalled = _cancelled(self._stalled)
        if self._gated:
            self._gated = False
            self._gate.leave()
        self._held.clear()
        self._held_bytes = 0
        self.supervisor.forget(self)
        self.supervisor.results.forget(self)


def _cancelled(timer: asyncio.TimerHandle | None) -> asyncio.TimerHandle | None:
    """Cancel ``timer`` if there is one; ``None``, for the attribute that held it."""
    if timer is not None:
        timer.cancel()
    return None


async def answer(sup: Supervisor, conn: ControlConnection, request: dict[str, Any]) -> None:
    """Run one admin command (stats, scale, ping) and send the reply."""
    reply: dict[str, Any]
    cmd = request.get("cmd")
    try:
        if cmd == "stats":
            await sup.health.fresh_state_keys()
            reply = {"ok": True, "stats": sup.stats()}
        elif cmd == "scale":
            count = int(request["workers"])
            if count < 0:
                raise ValueError("the worker count cannot be negative")
            sup.set_target(count)
            ok, error = await sup.wait_for_target(float(request.get("timeout", 60)))
            reply = {"ok": ok, "error": error, "workers": sup.target}
        elif cmd == "cancel":
            reply = sup.steering.cancel(str(request["task_id"]))
        elif cmd == "events":
            sup.events.subscribe(conn)
            reply = {"ok": True}
        elif cmd == "ping":
            reply = {"ok": True, "pid": os.getpid()}
        else:
            reply = {"ok": False, "error": f"unknown command {cmd!r}"}
    except (KeyError, TypeError, ValueError) as exc:
        reply = {"ok": False, "error": f"bad request: {exc}"}
    reply["id"] = request.get("id")
    conn.send(Reply(reply))
