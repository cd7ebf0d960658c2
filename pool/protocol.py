"""The wire format between producers, the supervisor and workers.

A frame is ``[u32 length][u8 op][fields]`` where each field is ``[u32 length][bytes]``.
Every byte read is bounds-checked: a malformed frame is dropped with a log line, an
oversized or unauthenticated one closes the connection. Nothing is ever unpickled.
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import hmac
import json
import logging
import os
import struct
from collections.abc import Iterator
from typing import Any

logger = logging.getLogger("pool.protocol")

MAX_FRAME = int(os.environ.get("POOL_MAX_FRAME", 64 * 1024 * 1024))
_HEAD = struct.Struct("!IB")
_LEN = struct.Struct("!I")
NONCE_BYTES = 32


class Op(enum.IntEnum):
    # handshake (control socket)
    CHALLENGE = 1
    AUTH = 2
    WELCOME = 3
    # producer <-> supervisor
    KICK = 10  # task_id, task_name, message
    RESULT = 11  # task_id, result
    GET = 12  # task_id: reply RESULT now or when it arrives
    ERROR = 14  # json {"message": ...}
    REQUEST = 20  # json command (stats, scale, ...)
    REPLY = 21  # json answer
    # supervisor <-> worker (pipe)
    TASK = 30  # task_id, task_name, message
    DONE = 31  # task_id, flags, result (may be empty), duration
    DRAIN = 32  # json {"timeout": seconds}
    READY = 33  # json {"pid": ...}
    STARTUP_FAILED = 34  # json {"error": ...}
    HEARTBEAT = 35  # json {"in_flight": n}
    BYE = 36
    COUNTED = 37  # task_name, flags, duration: a task from an external broker finished


class FrameError(ValueError):
    """A frame that cannot be decoded."""


def encode(op: int, *fields: bytes) -> bytes:
    parts = [b""]
    size = 1
    for field in fields:
        parts.append(_LEN.pack(len(field)))
        parts.append(field)
        size += 4 + len(field)
    parts[0] = _HEAD.pack(size, op)
    return b"".join(parts)


def encode_json(op: int, payload: Any) -> bytes:
    return encode(op, json.dumps(payload, separators=(",", ":")).encode())


def decode_fields(body: memoryview) -> list[bytes]:
    fields = []
    pos, end = 0, len(body)
    while pos < end:
        if end - pos < 4:
            raise FrameError("truncated field header")
        (size,) = _LEN.unpack_from(body, pos)
        pos += 4
        if size > end - pos:
            raise FrameError("field longer than its frame")
        fields.append(bytes(body[pos : pos + size]))
        pos += size
    return fields


def decode_json(fields: list[bytes]) -> Any:
    if len(fields) != 1:
        raise FrameError("expected one JSON field")
    try:
        return json.loads(fields[0])
    except (ValueError, UnicodeDecodeError) as exc:
        raise FrameError(f"bad JSON: {exc}") from None


class FrameReader:
    """Accumulates bytes and yields whole frames."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.buffer = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> Iterator[tuple[int, memoryview]]:
        """Yield ``(op, body)``; raises FrameError for a frame that cannot be skipped."""
        self.buffer.extend(data)
        pos = 0
        buf = self.buffer
        end = len(buf)
        try:
            while end - pos >= 5:
                size, op = _HEAD.unpack_from(buf, pos)
                if size < 1 or size > self.max_frame:
                    raise FrameError(f"frame of {size} bytes (limit {self.max_frame})")
                if end - pos - 4 < size:
                    break
                with memoryview(buf) as view:
                    body = view[pos + 5 : pos + 4 + size].tobytes()
                pos += 4 + size
                yield op, memoryview(body)
        finally:
            if pos:
                del buf[:pos]


class FrameProtocol(asyncio.Protocol):
    """An asyncio protocol speaking frames, with optional HMAC challenge authentication.

    The server side sends a random nonce; the client answers HMAC-SHA256(authkey, nonce).
    Until that answer checks out, any other frame closes the connection.
    """

    coalesce_writes = False

    def __init__(self, authkey: bytes | None = None, server_side: bool = False) -> None:
        self.authkey = authkey
        self.server_side = server_side
        self.transport: asyncio.Transport | None = None
        self.reader = FrameReader()
        self.authenticated = authkey is None
        self._nonce = b""
        loop = asyncio.get_event_loop()
        self._loop = loop
        # Frames sent during one turn of the event loop leave in one write (one syscall).
        self._outbox: list[bytes] = []
        self._flush_scheduled = False
        self.ready: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []

    # ----------------------------------------------------------------- asyncio hooks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.authenticated:
            self._set_ready()
        elif self.server_side:
            self._nonce = os.urandom(NONCE_BYTES)
            self.send(Op.CHALLENGE, self._nonce)

    def data_received(self, data: bytes) -> None:
        try:
            for op, body in self.reader.feed(data):
                if not self.authenticated:
                    self._handshake(op, body)
                    if self.transport is None or self.transport.is_closing():
                        return
                    continue
                try:
                    fields = decode_fields(body)
                    self.frame_received(op, fields)
                except FrameError as exc:
                    logger.warning("%s: dropped a malformed frame (op %s): %s", self.peer, op, exc)
                except Exception:
                    logger.exception("%s: error while handling op %s", self.peer, op)
        except FrameError as exc:
            logger.warning("%s: closing connection: %s", self.peer, exc)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("connection closed before it was ready"))
            self.ready.exception()  # mark retrieved
        if not self.closed.done():
            self.closed.set_result(None)
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionError("connection lost"))
                waiter.exception()
        self._drain_waiters.clear()
        self.transport = None
        try:
            self.connection_closed(exc)
        except Exception:
            logger.exception("%s: error in close handler", self.peer)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # ----------------------------------------------------------------- to override
    def frame_received(self, op: int, fields: list[bytes]) -> None:
        """Called for each frame after authentication."""

    def connection_closed(self, exc: Exception | None) -> None:
        """Called once when the connection is gone."""

    # ----------------------------------------------------------------- helpers
    @property
    def peer(self) -> str:
        return type(self).__name__

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def send(self, op: int, *fields: bytes) -> None:
        self.send_raw(encode(op, *fields))

    def send_raw(self, frame: bytes) -> None:
        """Write ``frame``; with ``coalesce_writes``, together with the others of this turn
        of the event loop (only for peers whose loop never blocks: a producer's ``kiq`` must
        have written its task when it returns)."""
        if self.transport is None or self.transport.is_closing():
            return
        if not self.coalesce_writes:
            self.transport.write(frame)
            return
        self._outbox.append(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the queued frames now."""
        self._flush_scheduled = False
        if not self._outbox:
            return
        frames, self._outbox = self._outbox, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

    async def drain(self) -> None:
        """Wait while the peer is slow to read (write buffer above the high mark)."""
        if not self._paused:
            return
        if self.transport is None:
            raise ConnectionError("connection lost")
        waiter = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(waiter)
        await waiter

    def close(self) -> None:
        if self.transport is not None:
            self.flush()
            self.transport.close()

    def _set_ready(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def _handshake(self, op: int, body: memoryview) -> None:
        assert self.authkey is not None
        try:
            fields = decode_fields(body)
        except FrameError:
            fields = []
        if self.server_side:
            expected = hmac.new(self.authkey, self._nonce, hashlib.sha256).digest()
            if op == Op.AUTH and len(fields) == 1 and hmac.compare_digest(fields[0], expected):
                self.authenticated = True
                self.send(Op.WELCOME)
                self._set_ready()
                return
            logger.warning("%s: authentication failed; closing", self.peer)
            self.close()
            return
        if op == Op.CHALLENGE and len(fields) == 1 and len(fields[0]) == NONCE_BYTES:
            self.send(Op.AUTH, hmac.new(self.authkey, fields[0], hashlib.sha256).digest())
            self._nonce = fields[0]
        elif op == Op.WELCOME and self._nonce:
            self.authenticated = True
            self._set_ready()
        else:
            logger.warning("%s: unexpected handshake frame %s; closing", self.peer, op)
            self.close()
