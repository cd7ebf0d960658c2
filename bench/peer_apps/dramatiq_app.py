"""dramatiq: ``RedisBroker`` and the ``Results`` middleware with its Redis backend.

Workers: ``python -m bench.peer_apps.dramatiq_app``, one process each (dramatiq's own CLI has
no option for ``worker_timeout``, the longest an idle consumer sleeps between polls: 1 s by
default; here ``BENCH_POLL``). 8 threads per process, dramatiq's default.
"""

from __future__ import annotations

import signal
import threading

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results
from dramatiq.results.backends.redis import RedisBackend

from bench.peer_apps import POLL, QUEUE, REDIS_URL, SyncDriver

broker = RedisBroker(url=REDIS_URL, namespace=QUEUE)
broker.add_middleware(
    Results(
        backend=RedisBackend(
            url=REDIS_URL, namespace=f"{QUEUE}-results", use_namespace_prefix_keys=True
        )
    )
)
dramatiq.set_broker(broker)


@dramatiq.actor(store_results=True, max_retries=0)
def noop() -> None:
    return None


def Driver() -> SyncDriver:
    return SyncDriver(
        noop.send,
        lambda message, timeout: message.get_result(block=True, timeout=int(timeout * 1000)),
        broker.close,
    )


def main() -> None:
    worker = dramatiq.Worker(broker, worker_timeout=max(1, int(POLL * 1000)), worker_threads=8)
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    worker.start()
    done.wait()
    worker.stop()
    broker.close()


if __name__ == "__main__":
    main()
