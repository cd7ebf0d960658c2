"""Redis as the engine for work that spans machines: a stream broker, results and state.

Needs redis-py (``pip install 'pool[redis]'``) and Redis 6.2 or newer. Importing :mod:`pool`
never imports this package, so pool works without redis-py installed.
"""

from __future__ import annotations

try:
    import redis as _redis  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "pool.redis needs the redis client library (redis-py), which is not installed: "
        "pip install 'pool[redis]'"
    ) from exc

from pool.redis.broker import RedisStreamBroker
from pool.redis.result_backend import RedisResultBackend
from pool.redis.schedule import RedisRunClaim, RedisScheduleSource
from pool.redis.state import RedisState, RedisStateBackend

__all__ = [
    "RedisResultBackend",
    "RedisRunClaim",
    "RedisScheduleSource",
    "RedisState",
    "RedisStateBackend",
    "RedisStreamBroker",
]
