"""A TCP proxy in front of Redis that counts what its clients send, for ``bench.redis_peers``.

*Commands*: each RESP request the clients send (a command inside ``MULTI``/``EXEC`` counts, and
so do ``MULTI`` and ``EXEC``; ``EVALSHA`` counts once, whatever its script calls). *Round trips*:
per connection, each burst of client bytes that follows a reply (or opens the connection): a
pipeline is one, and so is a blocking read however long it waits. Pub/sub messages pushed by
the server are replies nobody asked for and count nothing. The proxy adds latency, so it is
used only in rounds that count, never in rounds that time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable


class _Requests:
    """Splits a client's byte stream into RESP requests and counts them by command name."""

    def __init__(self, names: Counter[str]) -> None:
        self.buf = bytearray()
        self.names = names

    def feed(self, data: bytes) -> None:
        self.buf += data
        while (name := self._take()) is not None:
            self.names[name] += 1

    def _take(self) -> str | None:
        buf = self.buf
        end = buf.find(b"\r\n")
        if end < 0:
            return None
        if buf[:1] != b"*":  # an inline command
            name = bytes(buf[:end]).split(b" ", 1)[0]
            del buf[: end + 2]
            return name.decode(errors="replace").upper()
        pos, name = end + 2, b""
        for index in range(int(buf[1:end])):
            end = buf.find(b"\r\n", pos)
            if end < 0:
                return None
            start = end + 2
            stop = start + int(buf[pos + 1 : end])
            if stop + 2 > len(buf):
                return None
            if index == 0:
                name = bytes(buf[start:stop])
            pos = stop + 2
        del buf[:pos]
        return name.decode(errors="replace").upper()


class CountingProxy:
    """Listens on 127.0.0.1 (``port`` once started) and forwards every connection to Redis."""

    def __init__(self, host: str = "127.0.0.1", port: int = 6379) -> None:
        self.target = (host, port)
        self.commands: Counter[str] = Counter()
        self.round_trips = 0
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    def snapshot(self) -> dict[str, object]:
        return {
            "commands": dict(self.commands),
            "round_trips": self.round_trips,
            "connections": self.connections,
        }

    async def start(self) -> CountingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._pumps):
            task.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self.target)
        self.connections += 1
        requests = _Requests(self.commands)
        replied = [True]  # the last bytes on this connection came from the server

        def from_client(data: bytes) -> None:
            if replied[0]:
                self.round_trips += 1
                replied[0] = False
            requests.feed(data)

        def from_server(data: bytes) -> None:
            replied[0] = True

        pumps = {
            asyncio.ensure_future(_pump(client_r, server_w, from_client)),
            asyncio.ensure_future(_pump(server_r, client_w, from_server)),
        }
        self._pumps |= pumps
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._pumps -= pumps
            for writer in (client_w, server_w):
                writer.close()


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, seen: Callable[[bytes], None]
) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            seen(data)
            writer.write(data)
            await writer.drain()
