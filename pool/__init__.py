"""pool: the supervised multiprocess runtime, the shared state and the embedded broker for
taskiq applications.

``from pool import X`` is taskiq's own ``X`` (the very same object) for every public name
of taskiq, plus pool's names: ``PoolBroker``, ``TaskiqState`` (a subclass of taskiq's),
``InMemoryBroker`` (taskiq's, with pool's state) and pool's exceptions. Names are imported
on first use, so ``import pool`` alone stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# pool's own names
_OWN: dict[str, str] = {
    "PoolBroker": "pool.extensions.pool_broker",
    "PoolResultBackend": "pool.extensions.pool_broker",
    "InMemoryBroker": "pool.extensions.inmemory",
    "TaskiqState": "shared_state",
    "WorkerCrashedError": "pool.extensions.errors",
    "PoolUnavailableError": "pool.extensions.errors",
    "TaskNotFoundError": "pool.extensions.errors",
    "MessageTooLargeError": "pool.extensions.errors",
    "TaskCancelledError": "pool.extensions.errors",
    "TaskTimeLimitError": "pool.extensions.errors",
    "Limit": "pool.runtime.taskcontrol",
    # ``async for event in pool.events(run_dir)``: the pool's task and worker events
    "events": "pool.runtime.events",
}

# taskiq's public names beyond ``taskiq.__all__``, by the module that defines them
_TASKIQ_EXTRA: dict[str, str] = {
    "AsyncKicker": "taskiq.kicker",
    "ProgressTracker": "taskiq.depends.progress_tracker",
    "TaskProgress": "taskiq.depends.progress_tracker",
    "TaskState": "taskiq.depends.progress_tracker",
    "EventHandler": "taskiq.abc.broker",
    "TaskiqSerializer": "taskiq.abc.serializer",
    "JSONSerializer": "taskiq.serializers",
    "PickleSerializer": "taskiq.serializers",
    "JSONFormatter": "taskiq.formatters.json_formatter",
    "LabelScheduleSource": "taskiq.schedule_sources",
    "InmemoryResultBackend": "taskiq.brokers.inmemory_broker",
    "DummyResultBackend": "taskiq.result_backends.dummy",
    "Receiver": "taskiq.receiver",
    "CronSpec": "taskiq.scheduler.scheduled_task",
    "CreatedSchedule": "taskiq.scheduler.created_schedule",
    "TaskiqAdminMiddleware": "taskiq.middlewares",
    **{
        name: "taskiq.exceptions"
        for name in (
            "BrokerError",
            "ListenError",
            "UnknownTaskError",
            "ResultBackendError",
            "ResultSetError",
            "TaskRejectedError",
            "ScheduledTaskCancelledError",
            "TaskBrokerMismatchError",
            "SharedBrokerListenError",
            "SharedBrokerSendTaskError",
        )
    },
}

# ``taskiq.__all__``, written out so that ``dir(pool)`` needs no import of taskiq
_TASKIQ_ALL = (
    "AckableMessage",
    "AcknowledgeType",
    "AsyncBroker",
    "AsyncResultBackend",
    "AsyncTaskiqDecoratedTask",
    "AsyncTaskiqTask",
    "BrokerMessage",
    "Context",
    "NoResultError",
    "PrometheusMiddleware",
    "ResultGetError",
    "ResultIsReadyError",
    "ScheduleSource",
    "ScheduledTask",
    "SecurityError",
    "SendTaskError",
    "SimpleRetryMiddleware",
    "SmartRetryMiddleware",
    "TaskiqDepends",
    "TaskiqError",
    "TaskiqEvents",
    "TaskiqFormatter",
    "TaskiqMessage",
    "TaskiqMiddleware",
    "TaskiqResult",
    "TaskiqResultTimeoutError",
    "TaskiqScheduler",
    "ZeroMQBroker",
    "async_shared_broker",
    "gather",
)

__all__ = sorted({*_OWN, *_TASKIQ_EXTRA, *_TASKIQ_ALL})


def __getattr__(name: str) -> Any:
    module = _OWN.get(name) or _TASKIQ_EXTRA.get(name)
    if module is None and name in _TASKIQ_ALL:
        module = "taskiq"
    if module is None:
        raise AttributeError(f"module 'pool' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    from taskiq import (
        AckableMessage,
        AcknowledgeType,
        AsyncBroker,
        AsyncResultBackend,
        AsyncTaskiqDecoratedTask,
        AsyncTaskiqTask,
        BrokerMessage,
        Context,
        NoResultError,
        PrometheusMiddleware,
        ResultGetError,
        ResultIsReadyError,
        ScheduledTask,
        ScheduleSource,
        SecurityError,
        SendTaskError,
        SimpleRetryMiddleware,
        SmartRetryMiddleware,
        TaskiqDepends,
        TaskiqError,
        TaskiqEvents,
        TaskiqFormatter,
        TaskiqMessage,
        TaskiqMiddleware,
        TaskiqResult,
        TaskiqResultTimeoutError,
        TaskiqScheduler,
        ZeroMQBroker,
        async_shared_broker,
        gather,
    )
    from taskiq.abc.broker import EventHandler
    from taskiq.abc.serializer import TaskiqSerializer
    from taskiq.brokers.inmemory_broker import InmemoryResultBackend
    from taskiq.depends.progress_tracker import ProgressTracker, TaskProgress, TaskState
    from taskiq.exceptions import (
        BrokerError,
        ListenError,
        ResultBackendError,
        ResultSetError,
        ScheduledTaskCancelledError,
        SharedBrokerListenError,
        SharedBrokerSendTaskError,
        TaskBrokerMismatchError,
        TaskRejectedError,
        UnknownTaskError,
    )
    from taskiq.formatters.json_formatter import JSONFormatter
    from taskiq.kicker import AsyncKicker
    from taskiq.middlewares import TaskiqAdminMiddleware
    from taskiq.receiver import Receiver
    from taskiq.result_backends.dummy import DummyResultBackend
    from taskiq.schedule_sources import LabelScheduleSource
    from taskiq.scheduler.created_schedule import CreatedSchedule
    from taskiq.scheduler.scheduled_task import CronSpec
    from taskiq.serializers import JSONSerializer, PickleSerializer

    from pool.extensions.errors import (
        MessageTooLargeError,
        PoolUnavailableError,
        TaskCancelledError,
        TaskNotFoundError,
        TaskTimeLimitError,
        WorkerCrashedError,
    )
    from pool.extensions.inmemory import InMemoryBroker
    from pool.extensions.pool_broker import PoolBroker, PoolResultBackend
    from pool.runtime.events import events
    from pool.runtime.taskcontrol import Limit
    from shared_state import TaskiqState
