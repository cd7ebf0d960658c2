"""Prometheus metrics served by the supervisor (``pool run --metrics-port``).

The supervisor sees every task finish, so it counts them itself: the counts survive the
restart of any worker. This module is imported only when metrics are asked for.

The HTTP server is bounded: a connection idle for ``IDLE_TIMEOUT`` seconds is closed (each
holds a thread meanwhile), and beyond ``MAX_CONNECTIONS`` at once new ones are refused.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler

from prometheus_client.exposition import ThreadingWSGIServer

IDLE_TIMEOUT = float(os.environ.get("POOL_METRICS_IDLE_TIMEOUT", 10.0))
MAX_CONNECTIONS = 32
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class PoolMetrics:
    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.tasks = Counter(
            "pool_tasks",
            "Tasks that finished, by task name and status (success or error).",
            ["task_name", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "pool_task_duration_seconds",
            "Time a task ran in its worker.",
            ["task_name"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_Gauges(snapshot))
        self.snapshot = snapshot
        self._server: Any = None

    def observe(self, task_name: str, failed: bool, duration: float) -> None:
        self.tasks.labels(task_name, "error" if failed else "success").inc()
        self.duration.labels(task_name).observe(duration)

    def serve(
        self,
        port: int,
        addr: str,
        token: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> int:
        """Serve ``/metrics``, ``/healthz`` and ``/readyz`` over HTTP; returns the bound port
        (useful with port 0).

        With ``token``, every request must send ``Authorization: Bearer <token>``: the pool
        requires one whenever the endpoint listens beyond loopback. ``/healthz`` and
        ``/readyz`` ask the supervisor's ``loop`` (see ``pool.ops.health``). A connection
        that sends nothing for ``IDLE_TIMEOUT`` seconds is closed, and at most
        ``MAX_CONNECTIONS`` are served at once (the others are closed at once).
        """
        from wsgiref.simple_server import make_server

        from prometheus_client import make_wsgi_app

        metrics_app = make_wsgi_app(self.registry)
        expected = f"Bearer {token}".encode() if token else None

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            if expected is not None and not hmac.compare_digest(
                environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace"), expected
            ):
                return _plain(start_response, "401 Unauthorized", "a bearer token is required")
            path = environ.get("PATH_INFO", "")
            if path in ("/healthz", "/readyz"):
                return _probe(start_response, path, self.snapshot, loop)
            return metrics_app(environ, start_response)

        self._server = make_server(addr, port, app, _BoundedServer, _QuietHandler)
        threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True).start()
        return int(self._server.server_port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class _Gauges:
    """Values read from the supervisor's stats at scrape time."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        stats = self.snapshot()
        by_state = GaugeMetricFamily("pool_workers", "Worker processes by state.", labels=["state"])
        for state in ("starting", "ready", "draining"):
            count = sum(1 for w in stats["workers"] if w["state"] == state)
            by_state.add_metric([state], count)
        yield by_state
        yield GaugeMetricFamily(
            "pool_target_workers", "Workers the pool aims for.", value=stats["target_workers"]
        )
        yield GaugeMetricFamily(
            "pool_queue_depth", "Tasks waiting for a worker.", value=stats["totals"]["queued"]
        )
        yield GaugeMetricFamily(
            "pool_tasks_in_flight", "Tasks running in workers.", value=stats["totals"]["in_flight"]
        )
        yield CounterMetricFamily(
            "pool_worker_restarts", "Workers restarted after they died.",
            value=stats["totals"]["restarts"],
        )  # fmt: skip
        yield GaugeMetricFamily(
            "pool_state_keys", "Keys in the shared state.", value=stats["state"]["keys"]
        )


class _QuietHandler(WSGIRequestHandler):
    timeout = IDLE_TIMEOUT  # socket timeout: an idle connection does not hold its thread

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _BoundedServer(ThreadingWSGIServer):
    """One thread per connection, at most ``MAX_CONNECTIONS`` connections at once."""

    request_queue_size = 64  # the listen backlog: a burst of scrapes waits, is not reset

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.refused = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def _plain(start_response: Callable[..., Any], status: str, text: str) -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain; charset=utf-8")])
    return [f"{text}\n".encode()]


def _probe(
    start_response: Callable[..., Any],
    path: str,
    snapshot: Callable[[], dict[str, Any]],
    loop: asyncio.AbstractEventLoop | None,
) -> list[bytes]:
    """``/healthz``: the supervisor's loop answers; ``/readyz``: and the pool is ready."""
    from pool.ops.health import LOOP_TIMEOUT, readiness

    try:
        if loop is None:
            stats = snapshot()
        else:

            async def take() -> dict[str, Any]:
                return snapshot()

            stats = asyncio.run_coroutine_threadsafe(take(), loop).result(LOOP_TIMEOUT)
    except Exception as exc:
        return _plain(start_response, "503 Service Unavailable", f"not live: {exc!r}")
    if path == "/healthz":
        return _plain(start_response, "200 OK", "ok")
    ok, why = readiness(stats)
    if ok:
        return _plain(start_response, "200 OK", f"ready: {why}")
    return _plain(start_response, "503 Service Unavailable", f"not ready: {why}")
