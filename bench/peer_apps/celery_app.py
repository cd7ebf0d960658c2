"""Celery: the Redis broker and the Redis result backend, as its docs set them up.

Workers: ``celery -A bench.peer_apps.celery_app worker --concurrency N`` (Celery's default
prefork pool: N child processes run the tasks, their parent reads the queue). Results are
announced by Redis pub/sub, so nothing polls. Every key carries ``BENCH_QUEUE``: the queue's
name, and ``global_keyprefix`` for the broker's and the backend's own keys.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from bench.peer_apps import QUEUE, REDIS_URL, SyncDriver

app = Celery("bench_celery", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_default_queue=QUEUE,
    broker_transport_options={"global_keyprefix": f"{QUEUE}-"},
    result_backend_transport_options={"global_keyprefix": f"{QUEUE}-"},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="noop")
def noop() -> None:
    return None


def Driver() -> SyncDriver:
    return SyncDriver(noop.delay, _wait, app.close)


def _wait(result: Any, timeout: float) -> None:
    value = result.get(timeout=timeout)
    if value is not None:
        raise AssertionError(f"noop returned {value!r}")
