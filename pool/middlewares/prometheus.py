"""Prometheus metrics of the tasks a worker runs, served over HTTP by the worker.

Metrics (each labelled by ``task_name``; counters get prometheus' ``_total`` suffix):
``received_tasks``, ``success_tasks``, ``found_errors``, ``saved_results`` (counters),
``execution_time`` (histogram, seconds) and ``in_flight_tasks`` (gauge).

``prometheus_client`` is imported only when a middleware is created, so ``import pool``
stays light.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pool.middlewares.base import TaskiqMiddleware

if TYPE_CHECKING:
    import threading
    from wsgiref.simple_server import WSGIServer

    from prometheus_client import CollectorRegistry

    from pool.message import TaskiqMessage
    from pool.result import TaskiqResult

logger = logging.getLogger("pool.prometheus")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def _enable_multiprocess(path: Path) -> None:
    """Make prometheus_client keep metric values in files under ``path`` (shared by processes).

    prometheus_client picks its storage when it is first imported, from the environment;
    when it was imported earlier without the variable, switch it now (before our metrics
    are created).
    """
    from prometheus_client import values

    path.mkdir(parents=True, exist_ok=True)
    current = os.environ.get(MULTIPROC_ENV)
    if current and Path(current).resolve() != path.resolve():
        logger.warning(
            "%s is %s; prometheus metrics go to %s instead", MULTIPROC_ENV, current, path
        )
    os.environ[MULTIPROC_ENV] = str(path)
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()


class PrometheusMiddleware(TaskiqMiddleware):
    """Count received, successful and failed tasks and time them; serve the metrics.

    :param metrics_path: a directory for prometheus' multiprocess mode. When given, every
        process using it writes its values there, and the server (started by whichever
        worker binds the port first) reports the sum over all worker processes. Empty it
        before starting a pool, as prometheus_client requires. ``None``: each process
        counts only its own tasks.
    :param server_addr: address of the metrics HTTP server (``127.0.0.1``: local only).
    :param server_port: its port (``0``: any free port, see ``server_address``).
    :param registry: the ``CollectorRegistry`` to register the metrics in; default a new,
        private one, so several middlewares (and brokers) can live in one process.

    The HTTP server is started by ``startup()`` only in a worker process
    (``broker.is_worker_process``) and stopped by ``shutdown()``.
    """

    def __init__(
        self,
        metrics_path: Path | str | None = None,
        server_addr: str = "127.0.0.1",
        server_port: int = 9000,
        registry: CollectorRegistry | None = None,
    ) -> None:
        super().__init__()
        try:
            import prometheus_client as prom
        except ImportError as exc:  # pragma: no cover - a declared dependency
            raise ImportError("PrometheusMiddleware needs the prometheus-client package") from exc
        self.metrics_path = Path(metrics_path) if metrics_path is not None else None
        if self.metrics_path is not None:
            _enable_multiprocess(self.metrics_path)
        self.server_addr = server_addr
        self.server_port = server_port
        self.registry: CollectorRegistry = (
            registry if registry is not None else prom.CollectorRegistry(auto_describe=True)
        )
        self.server_address: tuple[str, int] | None = None
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

        labels = ["task_name"]
        reg = self.registry
        self.received_tasks = prom.Counter(
            "received_tasks", "Number of tasks received by workers", labels, registry=reg
        )
        self.success_tasks = prom.Counter(
            "success_tasks", "Number of tasks that finished without error", labels, registry=reg
        )
        self.found_errors = prom.Counter(
            "found_errors", "Number of task runs that raised", labels, registry=reg
        )
        self.saved_results = prom.Counter(
            "saved_results", "Number of results saved in the result backend", labels, registry=reg
        )
        self.execution_time = prom.Histogram(
            "execution_time", "Time a task's function ran, in seconds", labels, registry=reg
        )
        self.in_flight_tasks = prom.Gauge(
            "in_flight_tasks",
            "Number of tasks running now",
            labels,
            registry=reg,
            multiprocess_mode="livesum",
        )

    # ----------------------------------------------------------------- serving
    def _serving_registry(self) -> Any:
        if self.metrics_path is None:
            return self.registry
        from prometheus_client import CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.metrics_path))
        return registry

    def startup(self) -> None:
        """Start the metrics HTTP server, in worker processes only."""
        if not getattr(self.broker, "is_worker_process", False) or self._server is not None:
            return
        from prometheus_client import start_http_server

        try:
            server, thread = start_http_server(
                self.server_port, addr=self.server_addr, registry=self._serving_registry()
            )
        except OSError as exc:
            # In multiprocess mode every worker tries; the first one serves for all.
            level = logging.DEBUG if self.metrics_path is not None else logging.WARNING
            logger.log(
                level,
                "cannot serve prometheus metrics on %s:%s: %s",
                self.server_addr,
                self.server_port,
                exc,
            )
            return
        self._server, self._thread = server, thread
        host, port = server.server_address[:2]
        self.server_address = (str(host), int(port))
        logger.info("prometheus metrics served on http://%s:%d/", host, port)

    def shutdown(self) -> None:
        """Stop the HTTP server; in multiprocess mode, retire this process's live gauges."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self.server_address = None
        if self.metrics_path is not None and getattr(self.broker, "is_worker_process", False):
            from prometheus_client import multiprocess

            try:
                multiprocess.mark_process_dead(os.getpid(), str(self.metrics_path))
            except OSError:
                pass

    # ----------------------------------------------------------------- hooks
    def pre_execute(self, message: TaskiqMessage) -> TaskiqMessage:
        self.received_tasks.labels(message.task_name).inc()
        self.in_flight_tasks.labels(message.task_name).inc()
        return message

    def post_execute(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        name = message.task_name
        if result.is_err:
            self.found_errors.labels(name).inc()
        else:
            self.success_tasks.labels(name).inc()
        self.in_flight_tasks.labels(name).dec()
        self.execution_time.labels(name).observe(result.execution_time)

    def post_save(self, message: TaskiqMessage, result: TaskiqResult[Any]) -> None:
        self.saved_results.labels(message.task_name).inc()


__all__ = ["PrometheusMiddleware"]
