"""SPEC 1: ``from pool import X`` is taskiq's own ``X``; ``import pool`` stays cheap."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import ParamSpec, TypeVar

import pytest
import taskiq

import pool
import shared_state

ROOT = Path(__file__).resolve().parent.parent

# pool's subclasses of taskiq's classes, under taskiq's names
POOL_SUBCLASSES = {"TaskiqState", "InMemoryBroker"}

# ``taskiq.__version__`` is taskiq's version string; ``pool.__version__`` is pool's own
NOT_REEXPORTED = {"__version__"}

TASKIQ_ALL = sorted(set(taskiq.__all__) - POOL_SUBCLASSES - NOT_REEXPORTED)

# public names of taskiq beyond ``taskiq.__all__``, by the module that defines them
TASKIQ_EXTRA = {
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
    "BrokerError": "taskiq.exceptions",
    "ListenError": "taskiq.exceptions",
    "UnknownTaskError": "taskiq.exceptions",
    "ResultBackendError": "taskiq.exceptions",
    "ResultSetError": "taskiq.exceptions",
    "TaskRejectedError": "taskiq.exceptions",
    "ScheduledTaskCancelledError": "taskiq.exceptions",
    "TaskBrokerMismatchError": "taskiq.exceptions",
    "SharedBrokerListenError": "taskiq.exceptions",
    "SharedBrokerSendTaskError": "taskiq.exceptions",
}

POOL_OWN = {
    "PoolBroker": "pool.extensions.pool_broker",
    "PoolResultBackend": "pool.extensions.pool_broker",
    "InMemoryBroker": "pool.extensions.inmemory",
    "TaskiqState": "shared_state",
    "WorkerCrashedError": "pool.extensions.errors",
    "PoolUnavailableError": "pool.extensions.errors",
    "TaskNotFoundError": "pool.extensions.errors",
    "TaskCancelledError": "pool.extensions.errors",
    "TaskTimeLimitError": "pool.extensions.errors",
    "Limit": "pool.runtime.taskcontrol",
}

# what a worker process needs; a producer does not
RUNTIME_MODULES = ["multiprocess", "uvloop", "psutil", "rich", "prometheus_client", "dill"]


def _imported(name: str) -> object:
    namespace: dict[str, object] = {}
    exec(f"from pool import {name}", namespace)
    return namespace[name]


# ------------------------------------------------------------------ the very same objects
@pytest.mark.parametrize("name", TASKIQ_ALL)
def test_every_name_of_taskiq_all_is_taskiqs_own_object(name: str) -> None:
    assert _imported(name) is getattr(taskiq, name)
    assert getattr(pool, name) is getattr(taskiq, name)
    assert name in pool.__all__


@pytest.mark.parametrize(("name", "module"), sorted(TASKIQ_EXTRA.items()))
def test_taskiqs_names_beyond_its_all_are_its_own_objects(name: str, module: str) -> None:
    assert _imported(name) is getattr(importlib.import_module(module), name)
    assert name in pool.__all__


@pytest.mark.parametrize("name", sorted(POOL_SUBCLASSES))
def test_pools_classes_under_taskiqs_names_are_subclasses(name: str) -> None:
    ours, theirs = _imported(name), getattr(taskiq, name)
    assert ours is not theirs
    assert isinstance(ours, type) and issubclass(ours, theirs)


@pytest.mark.parametrize(("name", "module"), sorted(POOL_OWN.items()))
def test_pools_own_names_come_from_pools_modules(name: str, module: str) -> None:
    assert _imported(name) is getattr(importlib.import_module(module), name)
    assert name in pool.__all__


def test_pool_taskiq_state_is_shared_state_taskiq_state() -> None:
    assert pool.TaskiqState is shared_state.TaskiqState


def test_pool_brokers_are_taskiq_async_brokers() -> None:
    assert issubclass(pool.PoolBroker, taskiq.AsyncBroker)
    assert issubclass(pool.InMemoryBroker, taskiq.AsyncBroker)
    assert issubclass(pool.PoolResultBackend, taskiq.AsyncResultBackend)


@pytest.mark.parametrize(
    "name",
    [
        "WorkerCrashedError",
        "PoolUnavailableError",
        "TaskNotFoundError",
        "TaskCancelledError",
        "TaskTimeLimitError",
    ],
)
def test_pools_exceptions_are_taskiq_errors(name: str) -> None:
    error_class = getattr(pool, name)
    assert issubclass(error_class, taskiq.TaskiqError)
    error = error_class("why it failed")
    assert "why it failed" in str(error)
    with pytest.raises(taskiq.TaskiqError):
        raise error


def test_pools_exceptions_are_the_matching_taskiq_errors() -> None:
    assert issubclass(pool.PoolUnavailableError, taskiq.SendTaskError)
    assert issubclass(pool.TaskNotFoundError, taskiq.exceptions.UnknownTaskError)


def test_all_and_dir_list_every_name_and_each_resolves() -> None:
    assert set(TASKIQ_ALL) | set(TASKIQ_EXTRA) | set(POOL_OWN) <= set(pool.__all__)
    assert set(pool.__all__) <= set(dir(pool))
    for name in pool.__all__:
        assert getattr(pool, name) is not None


def test_an_unknown_name_is_an_attribute_error_and_an_import_error() -> None:
    with pytest.raises(AttributeError, match="NoSuchThing"):
        _ = pool.NoSuchThing  # type: ignore[attr-defined]
    with pytest.raises(ImportError):
        exec("from pool import NoSuchThing", {})


def test_async_kicker_can_be_subscripted() -> None:
    params = ParamSpec("params")
    returns = TypeVar("returns")
    generic = pool.AsyncKicker[params, returns]
    assert generic.__origin__ is taskiq.kicker.AsyncKicker  # type: ignore[attr-defined]
    concrete = pool.AsyncKicker[[int, str], bool]
    assert concrete.__origin__ is taskiq.kicker.AsyncKicker  # type: ignore[attr-defined]


# ------------------------------------------------------------------ ``import pool`` is cheap
def _modules_after(code: str, watched: list[str]) -> list[str]:
    """The modules of ``watched`` that a fresh interpreter has imported after ``code``."""
    probe = (
        f"{code}\n"
        "import json, sys\n"
        f"print(json.dumps(sorted(m for m in {watched!r} if m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_import_pool_imports_neither_taskiq_nor_the_runtimes_modules() -> None:
    code = "import pool\ndir(pool)\npool.__all__"
    assert _modules_after(code, ["taskiq", *RUNTIME_MODULES]) == []


def test_a_producer_on_the_inmemory_broker_imports_none_of_the_runtimes_modules() -> None:
    code = (
        "from pool import InMemoryBroker, TaskiqEvents, TaskiqState, Context, TaskiqDepends\n"
        "from pool import TaskiqMiddleware, AsyncKicker, TaskiqResult, gather, TaskiqError\n"
        "import asyncio\n"
        "broker = InMemoryBroker()\n"
        "@broker.task\n"
        "async def add(a: int, b: int) -> int:\n"
        "    return a + b\n"
        "async def main():\n"
        "    async with broker:\n"
        "        task = await add.kiq(1, 2)\n"
        "        result = await task.wait_result(timeout=5, check_interval=0.01)\n"
        "        assert result.return_value == 3\n"
        "asyncio.run(main())\n"
    )
    assert _modules_after(code, RUNTIME_MODULES) == []


def test_the_probe_sees_a_module_that_was_imported() -> None:
    assert _modules_after("import psutil", RUNTIME_MODULES) == ["psutil"]
