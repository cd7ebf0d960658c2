"""SPEC 1: what ``from pool import ...`` gives, and that ``import pool`` stays cheap."""

from __future__ import annotations

import importlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import pool
import shared_state

ROOT = Path(__file__).resolve().parent.parent

CORE_NAMES = [
    # brokers
    "AsyncBroker",
    "InMemoryBroker",
    "PoolBroker",
    # tasks, results
    "AsyncTaskiqDecoratedTask",
    "AsyncKicker",
    "AsyncTaskiqTask",
    "TaskiqResult",
    "TaskiqMessage",
    "BrokerMessage",
    "AckableMessage",
    "Context",
    "TaskiqDepends",
    "gather",
    # result backends
    "AsyncResultBackend",
    "InMemoryResultBackend",
    "InmemoryResultBackend",
    # middleware
    "TaskiqMiddleware",
    # events, state
    "TaskiqEvents",
    "TaskiqState",
    "EventHandler",
    # exceptions
    "TaskiqError",
    "BrokerError",
    "SendTaskError",
    "ListenError",
    "ResultBackendError",
    "ResultGetError",
    "ResultSetError",
    "ResultIsReadyError",
    "NoResultError",
    "TaskiqResultTimeoutError",
    "SecurityError",
    "UnknownTaskError",
    "TaskRejectedError",
]

# names whose modules are written separately: skipped only while the module does not exist
OPTIONAL_NAMES = {
    "pool.middlewares.retry": ["SimpleRetryMiddleware", "SmartRetryMiddleware"],
    "pool.middlewares.prometheus": ["PrometheusMiddleware"],
    "pool.scheduler": ["TaskiqScheduler", "ScheduleSource", "LabelScheduleSource", "ScheduledTask"],
}

HEAVY_MODULES = ["multiprocess", "uvloop", "psutil", "rich", "prometheus_client", "dill"]


@pytest.mark.parametrize("name", CORE_NAMES)
def test_core_name_is_importable_from_pool(name: str) -> None:
    namespace: dict[str, object] = {}
    exec(f"from pool import {name}", namespace)
    assert namespace[name] is getattr(pool, name)
    assert name in pool.__all__
    assert name in dir(pool)


@pytest.mark.parametrize(
    ("module", "name"), [(m, n) for m, names in OPTIONAL_NAMES.items() for n in names]
)
def test_optional_name_is_importable_from_pool(module: str, name: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not written yet")
    namespace: dict[str, object] = {}
    exec(f"from pool import {name}", namespace)
    assert namespace[name] is getattr(importlib.import_module(module), name)


def test_unknown_name_raises_attribute_error_and_import_error() -> None:
    with pytest.raises(AttributeError):
        _ = pool.NoSuchThing  # type: ignore[attr-defined]
    with pytest.raises(ImportError):
        exec("from pool import NoSuchThing", {})


def test_taskiq_state_is_the_shared_state_class() -> None:
    from pool import TaskiqState

    assert TaskiqState is shared_state.TaskiqState


def test_inmemory_result_backend_has_taskiq_spelling_alias() -> None:
    from pool import InMemoryResultBackend, InmemoryResultBackend

    assert InmemoryResultBackend is InMemoryResultBackend


def test_taskiq_depends_is_taskiq_dependencies_depends() -> None:
    from taskiq_dependencies import Depends

    from pool import TaskiqDepends

    assert TaskiqDepends is Depends


def test_brokers_are_async_brokers() -> None:
    from pool import AsyncBroker, InMemoryBroker, PoolBroker

    assert issubclass(InMemoryBroker, AsyncBroker)
    assert issubclass(PoolBroker, AsyncBroker)


def test_inmemory_result_backend_is_a_result_backend() -> None:
    from pool import AsyncResultBackend, InMemoryResultBackend

    assert issubclass(InMemoryResultBackend, AsyncResultBackend)


EXPECTED_PARENTS = {
    "TaskiqError": "Exception",
    "BrokerError": "TaskiqError",
    "SendTaskError": "BrokerError",
    "ListenError": "BrokerError",
    "ResultBackendError": "TaskiqError",
    "ResultGetError": "ResultBackendError",
    "ResultSetError": "ResultBackendError",
    "ResultIsReadyError": "ResultBackendError",
    "NoResultError": "TaskiqError",
    "TaskiqResultTimeoutError": "TaskiqError",
    "SecurityError": "TaskiqError",
    "UnknownTaskError": "TaskiqError",
    "TaskRejectedError": "TaskiqError",
}


@pytest.mark.parametrize(("name", "parent"), sorted(EXPECTED_PARENTS.items()))
def test_exception_hierarchy_is_as_in_spec(name: str, parent: str) -> None:
    cls = getattr(pool, name)
    parent_cls = Exception if parent == "Exception" else getattr(pool, parent)
    assert cls.__bases__ == (parent_cls,)
    if name != "TaskiqError":
        assert issubclass(cls, pool.TaskiqError)


def test_exceptions_are_raisable_and_catchable_by_base() -> None:
    for name in EXPECTED_PARENTS:
        cls = getattr(pool, name)
        with pytest.raises(pool.TaskiqError if name != "TaskiqError" else Exception):
            raise cls("message")


def test_taskiq_events_compare_equal_to_their_names() -> None:
    from pool import TaskiqEvents

    assert TaskiqEvents.WORKER_STARTUP == "WORKER_STARTUP"
    assert {e.name for e in TaskiqEvents} == {
        "CLIENT_STARTUP",
        "CLIENT_SHUTDOWN",
        "WORKER_STARTUP",
        "WORKER_SHUTDOWN",
    }
    for event in TaskiqEvents:
        assert event == event.name
        assert event.value == event.name
        assert isinstance(event, str)
        assert TaskiqEvents(event.name) is event


def _modules_after(code: str) -> dict[str, list[str]]:
    probe = (
        f"{code}\n"
        "import json, sys\n"
        f"print(json.dumps(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules)))\n"
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


def test_import_pool_does_not_import_heavy_modules() -> None:
    assert _modules_after("import pool") == []


def test_a_producer_using_the_inmemory_broker_does_not_import_heavy_modules() -> None:
    code = (
        "from pool import InMemoryBroker, TaskiqEvents, TaskiqState, Context, TaskiqDepends\n"
        "from pool import TaskiqMiddleware, AsyncKicker, TaskiqResult, gather, TaskiqError\n"
        "import asyncio\n"
        "broker = InMemoryBroker()\n"
        "@broker.task\n"
        "async def add(a, b):\n"
        "    return a + b\n"
        "async def main():\n"
        "    await broker.startup()\n"
        "    task = await add.kiq(1, 2)\n"
        "    assert (await task.wait_result(timeout=5)).return_value == 3\n"
        "    await broker.shutdown()\n"
        "asyncio.run(main())\n"
    )
    assert _modules_after(code) == []


def test_heavy_module_probe_sees_an_imported_module() -> None:
    """The probe itself works: importing one of the modules is reported."""
    assert _modules_after("import psutil") == ["psutil"]
