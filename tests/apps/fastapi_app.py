"""A FastAPI app whose tasks run under `python -m pool run fastapi_app:broker`, with
taskiq-fastapi as its documentation shows it: ``taskiq_fastapi.init(broker, "module:app")``.

Each worker enters the app's lifespan at WORKER_STARTUP and leaves it at WORKER_SHUTDOWN;
a task asks for the ``Request`` and sees the app and the lifespan's state.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import taskiq_fastapi
from fastapi import FastAPI, Request
from taskiq import TaskiqDepends, TaskiqState

try:
    from eco_brokers import make_broker
except ImportError:  # imported by a test, as tests.apps.fastapi_app
    from tests.apps.eco_brokers import make_broker

MARKS = os.environ.get("POOL_TEST_MARKS")


def mark(name: str) -> None:
    if MARKS:
        (Path(MARKS) / name).write_text(str(os.getpid()))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
    mark(f"lifespan-up-{os.getpid()}")
    yield {"db": f"db-of-{os.getpid()}"}  # the ASGI state a request sees
    mark(f"lifespan-down-{os.getpid()}")


app = FastAPI(title="pool-test-api", lifespan=lifespan)


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}


broker = make_broker()
taskiq_fastapi.init(broker, "fastapi_app:app")


@broker.task(task_name="fa.request")
async def from_request(request: Request = TaskiqDepends()) -> dict[str, Any]:
    return {"title": request.app.title, "db": request.state.db, "pid": os.getpid()}


@broker.task(task_name="fa.tiers")
async def tiers(state: TaskiqState = TaskiqDepends()) -> dict[str, Any]:
    """Where taskiq-fastapi's values live in this worker's state."""
    return {
        "pid": os.getpid(),
        "app_is_this_workers": state.fastapi_app is broker_app(),
        "shared": {key: state.is_shared(key) for key in ("fastapi_app", "lf_ctx")},
    }


def broker_app() -> Any:
    import sys

    return sys.modules["fastapi_app"].app if "fastapi_app" in sys.modules else None
