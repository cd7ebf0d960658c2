"""Celery: the Redis broker and the Redis result backend, as its docs set them up.

Workers: ``celery -A bench.peer_apps.celery_app worker --concurrency N`` (Celery's default
prefork pool: N child processes run the tasks, their parent reads the queue). Results are
announced by Redis pub/sub, so nothing polls. Every key carries ``BENCH_QUEUE``: the queue's
name, and ``global_keyprefix`` for the broker's and the backend's own keys.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from bench.peer_apps import QUEUE, REDIS_URL

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


class Driver:
    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        app.close()

    async def batch(self, n: int) -> None:
        results = [noop.delay() for _ in range(n)]
        for result in results:
            _check(result.get(timeout=120))

    async def one(self, timeout: float) -> None:
        _check(noop.delay().get(timeout=timeout))


def _check(value: Any) -> None:
    if value is not None:
        raise AssertionError(f"noop returned {value!r}")
