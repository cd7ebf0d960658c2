"""pool: an asyncio task queue with taskiq's API, a supervised worker pool and one shared state.

Names are imported lazily so that ``import pool`` stays cheap for producers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    # brokers
    "AsyncBroker": "pool.broker",
    "InMemoryBroker": "pool.inmemory",
    "PoolBroker": "pool.pool_broker",
    # tasks, results
    "AsyncTaskiqDecoratedTask": "pool.decor",
    "AsyncKicker": "pool.kicker",
    "AsyncTaskiqTask": "pool.task",
    "gather": "pool.task",
    "TaskiqResult": "pool.result",
    "TaskiqMessage": "pool.message",
    "BrokerMessage": "pool.message",
    "AckableMessage": "pool.message",
    "Context": "pool.context",
    "TaskiqDepends": "pool.context",
    # result backends
    "AsyncResultBackend": "pool.result_backend",
    "InMemoryResultBackend": "pool.result_backend",
    "InmemoryResultBackend": "pool.result_backend",
    # serialization
    "TaskiqSerializer": "pool.serializers",
    "JSONSerializer": "pool.serializers",
    "PickleSerializer": "pool.serializers",
    "TaskiqFormatter": "pool.serializers",
    # middleware
    "TaskiqMiddleware": "pool.middlewares.base",
    "SimpleRetryMiddleware": "pool.middlewares.retry",
    "SmartRetryMiddleware": "pool.middlewares.retry",
    "PrometheusMiddleware": "pool.middlewares.prometheus",
    # events, state
    "TaskiqEvents": "pool.events",
    "EventHandler": "pool.events",
    "TaskiqState": "shared_state",
    # scheduling
    "TaskiqScheduler": "pool.scheduler",
    "ScheduleSource": "pool.scheduler",
    "LabelScheduleSource": "pool.scheduler",
    "ScheduledTask": "pool.scheduler",
    # exceptions
    "TaskiqError": "pool.exceptions",
    "BrokerError": "pool.exceptions",
    "SendTaskError": "pool.exceptions",
    "ListenError": "pool.exceptions",
    "ResultBackendError": "pool.exceptions",
    "ResultGetError": "pool.exceptions",
    "ResultSetError": "pool.exceptions",
    "ResultIsReadyError": "pool.exceptions",
    "NoResultError": "pool.exceptions",
    "TaskiqResultTimeoutError": "pool.exceptions",
    "SecurityError": "pool.exceptions",
    "UnknownTaskError": "pool.exceptions",
    "TaskRejectedError": "pool.exceptions",
    "TaskFailedError": "pool.exceptions",
    "EventHandlerError": "pool.exceptions",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pool' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:
    from pool.broker import AsyncBroker
    from pool.context import Context, TaskiqDepends
    from pool.decor import AsyncTaskiqDecoratedTask
    from pool.events import EventHandler, TaskiqEvents
    from pool.exceptions import (
        BrokerError,
        EventHandlerError,
        ListenError,
        NoResultError,
        ResultBackendError,
        ResultGetError,
        ResultIsReadyError,
        ResultSetError,
        SecurityError,
        SendTaskError,
        TaskFailedError,
        TaskiqError,
        TaskiqResultTimeoutError,
        TaskRejectedError,
        UnknownTaskError,
    )
    from pool.inmemory import InMemoryBroker
    from pool.kicker import AsyncKicker
    from pool.message import AckableMessage, BrokerMessage, TaskiqMessage
    from pool.middlewares.base import TaskiqMiddleware
    from pool.middlewares.prometheus import PrometheusMiddleware
    from pool.middlewares.retry import SimpleRetryMiddleware, SmartRetryMiddleware
    from pool.pool_broker import PoolBroker
    from pool.result import TaskiqResult
    from pool.result_backend import AsyncResultBackend, InMemoryResultBackend, InmemoryResultBackend
    from pool.scheduler import LabelScheduleSource, ScheduledTask, ScheduleSource, TaskiqScheduler
    from pool.serializers import JSONSerializer, PickleSerializer, TaskiqFormatter, TaskiqSerializer
    from pool.task import AsyncTaskiqTask, gather
    from shared_state import TaskiqState
