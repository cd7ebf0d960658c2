"""The dashboard (``pool run --dashboard-port``): one page served by the supervisor.

Routes (on the supervisor's event loop; a small HTTP/1.1 server, one request per
connection)::

    GET  /             the page (index.html beside this module: plain HTML, CSS and JS)
    GET  /api/stats    the supervisor's stats (``stats --json``) and the state's key names
    GET  /api/events   a digest of the event stream (``pool.runtime.events``) as server-sent
                       events, one every ``DIGEST_EVERY`` seconds, with the stats (the page
                       polls nothing and changes once a second)
    POST /api/scale    {"workers": N}: set the worker count

Loopback by default; beyond loopback every request needs the metrics token (the run
directory's ``metrics.token``), as ``Authorization: Bearer`` or ``?token=`` (the page passes
it on from its own address), compared in constant time.

The page is one more subscriber of the supervisor's ``EventHub``, but it gets a digest rather
than every event: how many tasks finished, the durations of the newest of them, the tasks running
now, the failures with their tracebacks. A page open beside a busy pool then costs one
message a second, not a message per task (``make bench`` measures it).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from importlib import resources
from itertools import islice, repeat
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from pool.runtime.events import Batch

if TYPE_CHECKING:
    from pool.runtime.supervisor import Supervisor

logger = logging.getLogger("pool.ops.dashboard")

MAX_REQUEST = 16 * 1024
REQUEST_TIMEOUT = 10.0
MAX_CONNECTIONS = 64
STATE_KEYS_SHOWN = 200
DIGEST_EVERY = 1.0  # s
DURATIONS_KEPT = 256  # per digest: the durations of the newest tasks finished
RUNNING_KEPT = 10_000  # tasks the digest follows as running (the newest)
RUNNING_SHOWN = 50
FAILURES_KEPT = 20


class _SSE:
    """An event-stream response, as the EventHub sees a subscriber's connection."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.closed = asyncio.Event()

    @property
    def is_open(self) -> bool:
        return not self.writer.is_closing()

    @property
    def unread_bytes(self) -> int:
        return self.writer.transport.get_write_buffer_size()

    def send(self, payload: Any) -> None:
        if self.is_open:
            self.writer.write(f"data: {json.dumps(payload)}\n\n".encode())


class _Digest:
    """The page's subscription: folds each event into what the page shows, sent as one
    message every ``DIGEST_EVERY`` seconds. Bounded whatever the rate of tasks."""

    def __init__(self, sse: _SSE) -> None:
        self.conn = sse
        self.finished = 0
        self.durations: list[float] = []
        self.running: dict[str, tuple[str, int | None, float]] = {}
        self.failures: list[dict[str, Any]] = []

    def add(self, batch: Batch) -> None:
        """Fold the events of one flush of the hub (one pass: a busy pool sends thousands)."""
        running, durations = self.running, self.durations
        finished = 0
        for item in batch.items:
            if type(item) is tuple:  # a run of the supervisor's own task events
                kind, at, name, worker, task_ids, run_durations = item
                if kind == "started":
                    running.update(zip(task_ids, repeat((name, worker, at))))
                elif kind == "succeeded":
                    for task_id in task_ids:
                        running.pop(task_id, None)
                    durations += run_durations
                    finished += len(task_ids)
                continue
            assert isinstance(item, dict)
            kind = item["event"]
            if kind == "started":
                running[item["task_id"]] = (item["task_name"], item.get("worker"), item["time"])
            elif kind in ("succeeded", "failed"):
                running.pop(item["task_id"], None)
                durations.append(item["duration"])
                finished += 1
                if kind == "failed":
                    self.failures = [item, *self.failures[: FAILURES_KEPT - 1]]
            elif kind == "cancelled":
                running.pop(item["task_id"], None)
            elif kind == "worker_gone":
                gone = item.get("worker")
                self.running = running = {k: v for k, v in running.items() if v[1] != gone}
        self.finished += finished
        if len(running) > RUNNING_KEPT:  # the oldest are forgotten
            for task_id in list(islice(running, len(running) - RUNNING_KEPT)):
                del running[task_id]
        if len(durations) > DURATIONS_KEPT:  # the newest are kept
            del durations[:-DURATIONS_KEPT]

    def flush(self) -> bool:
        return False  # the page's stream sends the digest on its own clock

    def take(self) -> dict[str, Any]:
        """What happened since the last digest, and what runs now."""
        newest = islice(reversed(self.running.items()), RUNNING_SHOWN)
        digest = {
            "finished": self.finished,
            "durations": self.durations,
            "running": len(self.running),
            "newest_running": [[k, n, w, t] for k, (n, w, t) in newest],
            "failures": self.failures,
        }
        self.finished, self.durations, self.failures = 0, [], []
        return digest


class Dashboard:
    def __init__(self, supervisor: Supervisor, token: str | None) -> None:
        self.supervisor = supervisor
        self.token = token
        self.server: asyncio.Server | None = None
        self.connections = 0
        self.page = resources.files(__package__).joinpath("index.html").read_bytes()

    async def start(self, addr: str, port: int) -> int:
        self.server = await asyncio.start_server(self._serve, addr, port)
        return int(self.server.sockets[0].getsockname()[1])

    def fds(self) -> list[int]:
        """Sockets a forked worker must close."""
        return [s.fileno() for s in self.server.sockets] if self.server is not None else []

    # ------------------------------------------------------------- HTTP
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= MAX_CONNECTIONS:
            writer.close()
            return
        self.connections += 1
        try:
            method, target, headers, body = await asyncio.wait_for(
                _read_request(reader), REQUEST_TIMEOUT
            )
            await self._route(method, target, headers, body, writer)
        except (asyncio.TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:  # the supervisor's loop ends: so does the stream
            pass
        except Exception:
            logger.exception("dashboard request failed")
        finally:
            self.connections -= 1
            writer.close()

    def _authorized(self, target: str, headers: dict[str, str]) -> bool:
        if self.token is None:
            return True
        given = headers.get("authorization", "").removeprefix("Bearer ")
        if not given:
            given = (parse_qs(urlsplit(target).query).get("token") or [""])[0]
        return hmac.compare_digest(given.encode(), self.token.encode())

    async def _route(
        self,
        method: str,
        target: str,
        headers: dict[str, str],
        body: bytes,
        writer: asyncio.StreamWriter,
    ) -> None:
        if not self._authorized(target, headers):
            return _respond(writer, "401 Unauthorized", b"a token is required\n", "text/plain")
        path = urlsplit(target).path
        if method == "GET" and path == "/":
            return _respond(writer, "200 OK", self.page, "text/html; charset=utf-8")
        if method == "GET" and path == "/api/stats":
            return _json(writer, "200 OK", self.snapshot())
        if method == "POST" and path == "/api/scale":
            return _json(writer, *self._scale(body))
        if method == "GET" and path == "/api/events":
            return await self._stream(writer)
        return _respond(writer, "404 Not Found", b"not found\n", "text/plain")

    def snapshot(self) -> dict[str, Any]:
        stats = self.supervisor.stats()
        try:
            keys = sorted(str(k) for k in list(self.supervisor.broker.state.keys()))
        except Exception:
            keys = []
        stats["state"]["names"] = keys[:STATE_KEYS_SHOWN]
        return stats

    def _scale(self, body: bytes) -> tuple[str, dict[str, Any]]:
        try:
            count = int(json.loads(body or b"{}")["workers"])
            if count < 0:
                raise ValueError("negative")
        except (KeyError, TypeError, ValueError) as exc:
            return "400 Bad Request", {"ok": False, "error": f"bad request: {exc}"}
        self.supervisor.set_target(count)
        return "200 OK", {"ok": True, "workers": count}

    async def _stream(self, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Connection: close\r\n\r\n: subscribed\n\n"
        )
        sse = _SSE(writer)
        digest = _Digest(sse)
        hub = self.supervisor.events
        hub.attach(digest)
        try:
            while sse.is_open and not self.supervisor.stopping:
                await asyncio.sleep(DIGEST_EVERY)
                sse.send({**digest.take(), "stats": self.snapshot()})
                await writer.drain()
        except (ConnectionError, RuntimeError):  # the page went away (uvloop: RuntimeError)
            pass
        finally:
            hub.forget(sse)


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > MAX_REQUEST:
        raise ValueError("request too large")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    length = min(int(headers.get("content-length", "0") or 0), MAX_REQUEST)
    body = await reader.readexactly(length) if length else b""
    return method, target, headers, body


def _respond(writer: asyncio.StreamWriter, status: str, body: bytes, kind: str) -> None:
    writer.write(
        f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
        "Cache-Control: no-store\r\nConnection: close\r\n\r\n".encode()
        + body
    )


def _json(writer: asyncio.StreamWriter, status: str, payload: Any) -> None:
    _respond(writer, status, json.dumps(payload).encode(), "application/json")


async def serve(supervisor: Supervisor, addr: str, port: int) -> Dashboard:
    """Start the dashboard on the supervisor's loop; beyond loopback it needs the token."""
    from pool.runtime.supervisor import _is_loopback

    token = None
    if not _is_loopback(addr):
        token_file = supervisor.run_dir.metrics_token_file
        # one token for the metrics and the dashboard
        exists = supervisor.metrics is not None and token_file.exists()
        token = token_file.read_text() if exists else supervisor.run_dir.new_metrics_token()
    dashboard = Dashboard(supervisor, token)
    bound = await dashboard.start(addr, port)
    supervisor.dashboard_url = f"http://{addr}:{bound}/"
    logger.info("dashboard on %s", supervisor.dashboard_url)
    return dashboard
