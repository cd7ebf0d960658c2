"""Redis for work that spans machines: a stream broker, results, schedules and state.

Each class subclasses the matching taskiq ABC (``AsyncBroker``, ``AsyncResultBackend``,
``ScheduleSource``, ``TaskiqState``) and takes taskiq-redis's parameter names and units where
the two overlap. Needs redis-py (``pip install 'taskiq-pool[redis]'``) and Redis 6.2 or newer.
Importing :mod:`pool` never imports this package, so pool works without redis-py installed.
"""

from __future__ import annotations

try:
    import redis as _redis  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "pool.redis needs the redis client library (redis-py), which is not installed: "
        "pip install 'taskiq-pool[redis]'"
    ) from exc

from pool.redis.broker import (
    PoolRedisError,
    RedisListenError,
    RedisQueueFullError,
    RedisSendTaskError,
    RedisStreamBroker,
    RedisVersionError,
)
from pool.redis.result_backend import (
    RedisResultBackend,
    RedisResultGetError,
    RedisResultIsReadyError,
    RedisResultSetError,
)
from pool.redis.schedule import RedisRunClaim, RedisScheduleSource
from pool.redis.state import RedisState, RedisStateBackend

# taskiq-redis's name for the result backend, so that an import line can stay as it is
RedisAsyncResultBackend = RedisResultBackend

__all__ = [
    "PoolRedisError",
    "RedisAsyncResultBackend",
    "RedisListenError",
    "RedisQueueFullError",
    "RedisResultBackend",
    "RedisResultGetError",
    "RedisResultIsReadyError",
    "RedisResultSetError",
    "RedisRunClaim",
    "RedisScheduleSource",
    "RedisSendTaskError",
    "RedisState",
    "RedisStateBackend",
    "RedisStreamBroker",
    "RedisVersionError",
]
