"""Prometheus metrics served by the supervisor (``pool run --metrics-port``).

The supervisor sees every task finish, so it counts them itself: the counts survive the
restart of any worker. prometheus-client is imported only when metrics are asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

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
        self._server: Any = None

    def observe(self, task_name: str, failed: bool, duration: float) -> None:
        self.tasks.labels(task_name, "error" if failed else "success").inc()
        self.duration.labels(task_name).observe(duration)

    def serve(self, port: int, addr: str, token: str | None = None) -> int:
        """Serve ``/metrics`` over HTTP; returns the bound port (useful with port 0).

        With ``token``, a scrape must send ``Authorization: Bearer <token>``: the pool
        requires one whenever the endpoint listens beyond loopback.
        """
        import threading
        from wsgiref.simple_server import WSGIRequestHandler, make_server

        from prometheus_client import make_wsgi_app
        from prometheus_client.exposition import ThreadingWSGIServer

        metrics_app = make_wsgi_app(self.registry)
        expected = f"Bearer {token}" if token else None

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
            if expected is not None and environ.get("HTTP_AUTHORIZATION") != expected:
                start_response("401 Unauthorized", [("Content-Type", "text/plain")])
                return [b"a bearer token is required\n"]
            return metrics_app(environ, start_response)

        class QuietHandler(WSGIRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = make_server(addr, port, app, ThreadingWSGIServer, QuietHandler)
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
