"""The wire format between producers, the supervisor and workers.

A frame is ``[u32 size][u8 op][u32 length of each field][the fields]``; each kind of frame
is a small dataclass below, with its fields named.
Every byte read is bounds-checked: a malformed frame is dropped with a log line, an
oversized or unauthenticated one closes the connection. Nothing is ever unpickled.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import hashlib
import hmac
import json
import logging
import os
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

logger = logging.getLogger("pool.runtime.protocol")

MAX_FRAME = int(os.environ.get("POOL_MAX_FRAME", 64 * 1024 * 1024))
# Before authentication a peer may send only small frames (the AUTH frame is 41 bytes),
# buffer at most this much, and must answer the challenge within HANDSHAKE_TIMEOUT s.
UNAUTH_MAX_FRAME = 1024
UNAUTH_MAX_BUFFER = 1024
HANDSHAKE_TIMEOUT = float(os.environ.get("POOL_HANDSHAKE_TIMEOUT", 5.0))
_HEAD = struct.Struct("!IB")
_HEAD_FROM = _HEAD.unpack_from
_LEN = struct.Struct("!I")
NONCE_BYTES = 32


class Op(enum.IntEnum):
    """The number on the wire of each frame kind (see the frame classes below)."""

    # handshake (control socket)
    CHALLENGE = 1
    AUTH = 2
    WELCOME = 3
    # producer <-> supervisor
    KICK = 10
    RESULT = 11
    SUBSCRIBE = 12
    GET_PROGRESS = 13
    KICK_WITH = 14
    PROGRESS = 15
    REQUEST = 20
    REPLY = 21
    ACCEPTED = 22
    EVENTS = 23
    # supervisor <-> worker (pipe)
    TASK = 30
    DONE = 31
    DRAIN = 32
    READY = 33
    STARTUP_FAILED = 34
    HEARTBEAT = 35
    BYE = 36
    FINISHED = 37
    LATE_RESULT = 38
    SAVE_PROGRESS = 39
    CANCEL = 40
    # journal file records
    SPOOLED = 50
    SETTLED = 51
    SPOOLED_WITH = 52


class FrameError(ValueError):
    """A frame that cannot be decoded."""


def encode(op: int, *fields: bytes) -> bytes:
    """A frame: ``[u32 size][u8 op][u32 length of each field][the fields]``."""
    lengths = [len(field) for field in fields]
    size = 1 + 4 * len(fields) + sum(lengths)
    return b"".join((_HEAD.pack(size, op), struct.pack(f"!{len(fields)}I", *lengths), *fields))


# --------------------------------------------------------------------------- named frames
# Each frame kind is a small dataclass; its fields are encoded by their annotated type:
# bytes as they are, str as UTF-8, int and float in decimal, anything else as JSON.
# ``frame`` writes each kind its own ``encode`` and ``decode`` (the way ``dataclasses``
# writes ``__init__``): straight-line code, one struct call for the head and the lengths,
# which frames on the task path (several per task in every process) need.

# how a field of each annotated type becomes bytes, and back (``{}`` is the value)
_ENCODE_FIELD = {
    "bytes": "{}",
    "str": "{}.encode()",
    "int": 'b"%d" % {}',
    "float": "repr(float({})).encode()",
    "bool": '(b"1" if {} else b"0")',
}
_DECODE_FIELD = {
    "bytes": "{}",
    "str": "{}.decode()",
    "int": "int({})",
    "float": "float({})",
    "bool": '({} == b"1")',
}


def _json_encode(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _json_decode(blob: bytes) -> Any:
    return json.loads(blob)


class Frame:
    """Base of every frame kind; ``op``, ``encode`` and ``decode`` are set by :func:`frame`."""

    __slots__ = ()
    op: ClassVar[Op]

    def encode(self) -> bytes:
        """The whole frame: ``[u32 size][u8 op][u32 length of each field][the fields]``."""
        raise NotImplementedError

    @classmethod
    def decode(cls, body: bytes | memoryview) -> Frame:
        """The frame whose body (what follows the op) is ``body``; FrameError if malformed."""
        raise NotImplementedError


FRAMES: dict[int, type[Frame]] = {}
_F = TypeVar("_F", bound=type)


def _codec_source(names: tuple[str, ...], kinds: list[str]) -> str:
    """The source of one frame kind's ``encode`` and ``decode``."""
    count = len(names)
    lines = ["def encode(self):"]
    for i, (name, kind) in enumerate(zip(names, kinds, strict=True)):
        value = _ENCODE_FIELD.get(kind, "_json_encode({})").format(f"self.{name}")
        lines.append(f"    f{i} = {value}")
    lengths = "".join(f", len(f{i})" for i in range(count))
    total = "".join(f" + len(f{i})" for i in range(count))
    fields = "".join(f", f{i}" for i in range(count))
    lines.append(f"    return b''.join((_pack({1 + 4 * count}{total}, OP{lengths}){fields}))")
    lines += [
        "def decode(cls, body):",
        "    if type(body) is not bytes:",
        "        body = bytes(body)",
        f"    if len(body) < {4 * count}:",
        "        raise FrameError(f'{cls.__name__} frame too short')",
        "    l = _unpack_from(body)",
        f"    e0 = {4 * count}",
    ]
    for i in range(count):
        lines.append(f"    e{i + 1} = e{i} + l[{i}]")
    lines += [
        f"    if e{count} != len(body):",
        "        raise FrameError(f'{cls.__name__} frame: fields do not add up to its length')",
        "    try:",
    ]
    values = [
        _DECODE_FIELD.get(kind, "_json_decode({})").format(f"body[e{i}:e{i + 1}]")
        for i, kind in enumerate(kinds)
    ]
    lines += [
        f"        return cls({', '.join(values)})",
        "    except (ValueError, UnicodeDecodeError) as exc:",
        "        raise FrameError(f'bad {cls.__name__} frame: {exc}') from None",
    ]
    return "\n".join(lines)


def frame(op: Op) -> Callable[[_F], _F]:
    """Register a dataclass as the frame kind numbered ``op``."""

    def register(cls: _F) -> _F:
        names = tuple(f.name for f in dataclasses.fields(cls))
        kinds = [str(cls.__annotations__[name]) for name in names]
        lengths = struct.Struct(f"!{len(names)}I")
        namespace: dict[str, Any] = {
            "OP": int(op),
            "_pack": struct.Struct(f"!IB{len(names)}I").pack,
            "_unpack_from": lengths.unpack_from,
            "_json_encode": _json_encode,
            "_json_decode": _json_decode,
            "FrameError": FrameError,
        }
        exec(_codec_source(names, kinds), namespace)  # our own fixed template (see above)
        frame_cls: Any = cls
        frame_cls.op = op
        frame_cls.encode = namespace["encode"]
        frame_cls.decode = classmethod(namespace["decode"])
        FRAMES[op] = frame_cls
        return cls

    return register


# handshake ------------------------------------------------------------------------------
@frame(Op.CHALLENGE)
@dataclass(slots=True)
class Challenge(Frame):
    nonce: bytes


@frame(Op.AUTH)
@dataclass(slots=True)
class Auth(Frame):
    """The client's proof (HMAC of the server's nonce) and a nonce of its own."""

    digest: bytes
    nonce: bytes


@frame(Op.WELCOME)
@dataclass(slots=True)
class Welcome(Frame):
    """The server's proof that it holds the authkey too (HMAC of the client's nonce): a
    producer never hands its tasks to a socket someone else put in the run directory."""

    digest: bytes


# producer -> supervisor -----------------------------------------------------------------
@frame(Op.KICK)
@dataclass(slots=True)
class Kick(Frame):
    """A task for the queue: ``message`` is the broker's formatted message, opaque here."""

    task_id: str
    task_name: str
    message: bytes


@frame(Op.KICK_WITH)
@dataclass(slots=True)
class KickWith(Frame):
    """A :class:`Kick` with pool's task control read from its labels (``taskcontrol``)."""

    task_id: str
    task_name: str
    message: bytes
    control: dict


@frame(Op.SUBSCRIBE)
@dataclass(slots=True)
class Subscribe(Frame):
    """Send me the result of ``task_id`` now, or when it arrives."""

    task_id: str


@frame(Op.GET_PROGRESS)
@dataclass(slots=True)
class GetProgress(Frame):
    task_id: str


@frame(Op.REQUEST)
@dataclass(slots=True)
class Request(Frame):
    """An admin command (``{"cmd": "stats", "id": 1}``)."""

    body: dict


# supervisor -> producer -----------------------------------------------------------------
@frame(Op.RESULT)
@dataclass(slots=True)
class Result(Frame):
    """A serialized ``TaskiqResult`` (the broker's serializer; opaque to the supervisor)."""

    task_id: str
    result: bytes


@frame(Op.PROGRESS)
@dataclass(slots=True)
class Progress(Frame):
    """The last progress a task reported (empty: none)."""

    task_id: str
    progress: bytes


@frame(Op.REPLY)
@dataclass(slots=True)
class Reply(Frame):
    body: dict


@frame(Op.EVENTS)
@dataclass(slots=True)
class Events(Frame):
    """Events for a subscriber, marshalled once by the supervisor for all its subscribers
    (``events.encode_items``); the subscriber renders them."""

    items: bytes


# supervisor -> worker -------------------------------------------------------------------
@frame(Op.TASK)
@dataclass(slots=True)
class Task(Frame):
    """One delivery of a task; ``delivery`` names this attempt, for its acknowledgement."""

    delivery: int
    task_id: str
    message: bytes


@frame(Op.DRAIN)
@dataclass(slots=True)
class Drain(Frame):
    """Take no more tasks, finish the running ones within ``timeout`` s, then exit."""

    timeout: float


@frame(Op.CANCEL)
@dataclass(slots=True)
class Cancel(Frame):
    """Cancel the running ``delivery`` (its asyncio task gets ``CancelledError``)."""

    delivery: int
    task_id: str


# worker -> supervisor -------------------------------------------------------------------
@frame(Op.READY)
@dataclass(slots=True)
class Ready(Frame):
    pid: int


@frame(Op.STARTUP_FAILED)
@dataclass(slots=True)
class StartupFailed(Frame):
    error: str
    traceback: str


@frame(Op.HEARTBEAT)
@dataclass(slots=True)
class Heartbeat(Frame):
    in_flight: int


@frame(Op.DONE)
@dataclass(slots=True)
class Done(Frame):
    """``delivery`` is acknowledged; ``result`` (may be empty) is saved with it, at once.

    ``outcome`` says how the task ended when it ended before its acknowledgement (the
    default ``--ack-type when_saved``), so that no separate :class:`Finished` is needed:
    0 not yet (a :class:`Finished` follows), 1 succeeded, 2 failed. ``duration_us``: how
    long it ran, in whole microseconds (a float's shortest repr costs the worker 0.6 µs a
    task, an int's decimal 0.1; and every event that shows it renders it again).
    """

    delivery: int
    task_id: str
    result: bytes
    outcome: int
    duration_us: int


@frame(Op.LATE_RESULT)
@dataclass(slots=True)
class LateResult(Frame):
    """A result saved after its message was acknowledged (``--ack-type when_received``)."""

    task_id: str
    result: bytes


@frame(Op.SAVE_PROGRESS)
@dataclass(slots=True)
class SaveProgress(Frame):
    task_id: str
    progress: bytes


@frame(Op.FINISHED)
@dataclass(slots=True)
class Finished(Frame):
    """A task ran to its end in this worker, whichever broker it came from (for stats)."""

    task_name: str
    failed: bool
    duration_us: int  # as in ``Done``


@frame(Op.BYE)
@dataclass(slots=True)
class Bye(Frame):
    """The worker drained and is exiting. Of what it still holds, the deliveries in
    ``interrupted`` were running when the drain's timeout cancelled them; the rest never
    started."""

    interrupted: list[int]


# supervisor -> producer, acceptance ----------------------------------------------------
@frame(Op.ACCEPTED)
@dataclass(slots=True)
class Accepted(Frame):
    """The first ``count`` Kick frames of this connection are in the supervisor's journal:
    the producer may forget them (until then it sends them again after a reconnection)."""

    count: int


# journal file ---------------------------------------------------------------------------
@frame(Op.SPOOLED)
@dataclass(slots=True)
class Spooled(Frame):
    """A task accepted by the supervisor, kept on disk until it is settled."""

    task_id: str
    task_name: str
    message: bytes
    failures: int


@frame(Op.SETTLED)
@dataclass(slots=True)
class Settled(Frame):
    """A task acknowledged by its worker (or answered with an error): no longer owed.

    ``result`` (may be empty) is kept so that a result a producer did not fetch yet
    survives the supervisor's death too."""

    task_id: str
    result: bytes


@frame(Op.SPOOLED_WITH)
@dataclass(slots=True)
class SpooledWith(Frame):
    """A :class:`Spooled` task with its task control (a delay's due time, ...)."""

    task_id: str
    task_name: str
    message: bytes
    failures: int
    control: dict


def decode_frame(op: int, body: bytes | memoryview) -> Frame:
    kind = FRAMES.get(op)
    if kind is None:
        raise FrameError(f"unknown op {op}")
    return kind.decode(body)


class FrameReader:
    """Accumulates bytes and yields whole frames."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.buffer = bytearray()
        self.max_frame = max_frame

    def feed(self, data: bytes) -> Iterator[tuple[int, bytes]]:
        """Yield ``(op, body)``; raises FrameError for a frame that cannot be skipped.

        Whole frames are cut straight out of ``data`` (one copy each); only a partial frame
        at its end waits in the buffer for the next call."""
        buf = self.buffer
        if buf:
            buf.extend(data)
            source: bytes | bytearray = buf
        else:
            source = data
        pos = 0
        end = len(source)
        try:
            while end - pos >= 5:
                size, op = _HEAD_FROM(source, pos)
                if size < 1 or size > self.max_frame:
                    raise FrameError(f"frame of {size} bytes (limit {self.max_frame})")
                if end - pos - 4 < size:
                    break
                if source is buf:
                    with memoryview(buf) as view:
                        body = view[pos + 5 : pos + 4 + size].tobytes()
                else:
                    body = bytes(source[pos + 5 : pos + 4 + size])
                pos += 4 + size
                yield op, body
        finally:
            if source is buf:
                if pos:
                    del buf[:pos]
            elif pos < end:
                buf.extend(memoryview(source)[pos:])


class FrameProtocol(asyncio.Protocol):
    """An asyncio protocol speaking frames, with optional HMAC challenge authentication.

    The server side sends a random nonce; the client answers HMAC-SHA256(authkey, nonce).
    Until that answer checks out, any other frame closes the connection, and so do a frame
    over ``UNAUTH_MAX_FRAME`` bytes, more than ``UNAUTH_MAX_BUFFER`` bytes buffered, and no
    answer within ``HANDSHAKE_TIMEOUT`` seconds.
    """

    coalesce_writes = False

    def __init__(self, authkey: bytes | None = None, server_side: bool = False) -> None:
        self.authkey = authkey
        self.server_side = server_side
        self.transport: asyncio.Transport | None = None
        self.authenticated = authkey is None
        self.reader = FrameReader(MAX_FRAME if self.authenticated else UNAUTH_MAX_FRAME)
        self._nonce = b""
        self._handshake_timer: asyncio.TimerHandle | None = None
        loop = asyncio.get_event_loop()
        self._loop = loop
        # Frames sent during one turn of the event loop leave in one write (one syscall).
        self._outbox: list[bytes] = []
        self._outbox_size = 0
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
            return
        self._handshake_timer = self._loop.call_later(HANDSHAKE_TIMEOUT, self._handshake_expired)
        if self.server_side:
            self._nonce = os.urandom(NONCE_BYTES)
            self.send(Challenge(self._nonce))

    def data_received(self, data: bytes) -> None:
        if not self.authenticated and len(self.reader.buffer) + len(data) > UNAUTH_MAX_BUFFER:
            self.handshake_failed(f"over {UNAUTH_MAX_BUFFER} bytes sent before authenticating")
            return
        try:
            for op, body in self.reader.feed(data):
                if not self.authenticated:
                    self._handshake(op, body)
                    if self.transport is None or self.transport.is_closing():
                        return
                    continue
                try:
                    self.frame_received(decode_frame(op, body))
                except FrameError as exc:
                    logger.warning("%s: dropped a malformed frame (op %s): %s", self.peer, op, exc)
                except Exception:
                    logger.exception("%s: error while handling op %s", self.peer, op)
        except FrameError as exc:
            if not self.authenticated:
                self.handshake_failed(f"a bad frame before authenticating ({exc})")
                return
            logger.warning("%s: closing connection: %s", self.peer, exc)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self._outbox.clear()
        self._outbox_size = 0
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
    def frame_received(self, frame: Frame) -> None:
        """Called for each frame after authentication."""

    def connection_closed(self, exc: Exception | None) -> None:
        """Called once when the connection is gone."""

    def handshake_done(self) -> None:
        """Called once when the peer has authenticated."""

    def handshake_failed(self, reason: str) -> None:
        """The peer did not authenticate (``reason`` says why): log it and close at once."""
        logger.warning("%s: closing connection: %s", self.peer, reason)
        self.abort()

    # ----------------------------------------------------------------- helpers
    @property
    def peer(self) -> str:
        return type(self).__name__

    @property
    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    @property
    def write_paused(self) -> bool:
        """The peer is slow to read: ``drain()`` would wait."""
        return self._paused

    @property
    def pending_bytes(self) -> int:
        """Bytes written and not yet taken by the kernel (this turn's frames included)."""
        buffered = self.transport.get_write_buffer_size() if self.transport is not None else 0
        return self._outbox_size + buffered

    def send(self, frame: Frame) -> None:
        self.send_raw(frame.encode())

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
        self._outbox_size += len(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the queued frames now."""
        self._flush_scheduled = False
        if not self._outbox:
            return
        frames, self._outbox = self._outbox, []
        self._outbox_size = 0
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
        """Close once what was written has left (a peer that never reads keeps it open:
        see :meth:`abort`)."""
        if self.transport is not None:
            self.flush()
            self.transport.close()

    def abort(self) -> None:
        """Close now, dropping whatever the peer has not read yet."""
        self._outbox.clear()
        self._outbox_size = 0
        if self.transport is not None:
            self.transport.abort()

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if not self.authenticated and self.transport is not None:
            self.handshake_failed(f"no authentication within {HANDSHAKE_TIMEOUT:g} s")

    def _authenticated(self) -> None:
        self.authenticated = True
        self.reader.max_frame = MAX_FRAME
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self._set_ready()
        self.handshake_done()

    def _set_ready(self) -> None:
        if not self.ready.done():
            self.ready.set_result(None)

    def _handshake(self, op: int, body: bytes) -> None:
        assert self.authkey is not None
        try:
            frame: Frame | None = decode_frame(op, body)
        except FrameError:
            frame = None
        if self.server_side:
            expected = _proof(self.authkey, b"client", self._nonce)
            if (
                isinstance(frame, Auth)
                and hmac.compare_digest(frame.digest, expected)
                and len(frame.nonce) == NONCE_BYTES
            ):
                self.send(Welcome(_proof(self.authkey, b"server", frame.nonce)))
                self._authenticated()
                return
            self.handshake_failed("authentication failed")
            return
        if isinstance(frame, Challenge) and len(frame.nonce) == NONCE_BYTES and not self._nonce:
            self._nonce = os.urandom(NONCE_BYTES)
            self.send(Auth(_proof(self.authkey, b"client", frame.nonce), self._nonce))
        elif isinstance(frame, Welcome) and self._nonce:
            if not hmac.compare_digest(frame.digest, _proof(self.authkey, b"server", self._nonce)):
                self.handshake_failed(
                    "the server does not hold this run directory's authkey: not the pool's "
                    "supervisor"
                )
                return
            self._authenticated()
        else:
            self.handshake_failed(f"unexpected handshake frame (op {op})")


def _proof(authkey: bytes, role: bytes, nonce: bytes) -> bytes:
    """HMAC-SHA256 of the other side's nonce; the role keeps a proof from being replayed
    to its sender."""
    return hmac.new(authkey, role + nonce, hashlib.sha256).digest()
