"""Each Redis peer's app and producer, for ``python -m bench.redis_peers``.

One module per peer. Each holds the no-op task, what its workers run, and a ``Driver``: the
producer side, with ``start()``, ``stop()``, ``batch(n)`` (send ``n`` tasks, await and check
every result) and ``one(timeout)`` (send one task, await and check its result). Settings come
from the environment, so a worker and its producer agree: ``BENCH_QUEUE`` (a name of this run
alone; every key the peer writes contains it), ``BENCH_REDIS_URL`` and ``BENCH_POLL`` (seconds,
for the knobs where a peer polls).

``bench.peer_apps.drive`` runs one driver in a process of its own (arq needs redis-py < 6, so
it runs in a virtualenv of its own), so these modules import only their peer's package.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("BENCH_QUEUE", "bench-peer")
POLL = float(os.environ.get("BENCH_POLL", "0.005"))


class SyncDriver:
    """The ``Driver`` of a peer whose client blocks (dramatiq, Celery): ``send()`` sends one
    no-op task and returns its handle, ``wait(handle, timeout)`` blocks for its result and
    checks it, ``close()`` ends the client."""

    def __init__(
        self,
        send: Callable[[], Any],
        wait: Callable[[Any, float], None],
        close: Callable[[], None],
    ) -> None:
        self.send, self.wait, self.close = send, wait, close

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        self.close()

    async def batch(self, n: int) -> None:
        handles = [self.send() for _ in range(n)]
        for handle in handles:
            self.wait(handle, 120.0)

    async def one(self, timeout: float) -> None:
        self.wait(self.send(), timeout)
