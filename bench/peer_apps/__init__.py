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

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("BENCH_QUEUE", "bench-peer")
POLL = float(os.environ.get("BENCH_POLL", "0.005"))
