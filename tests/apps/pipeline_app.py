"""taskiq-pipelines under `python -m pool run pipeline_app:broker`: its middleware sends each
next step from the worker that finished the previous one."""

from __future__ import annotations

from taskiq_pipelines import PipelineMiddleware

try:
    from eco_brokers import make_broker
except ImportError:  # imported by a test, as tests.apps.pipeline_app
    from tests.apps.eco_brokers import make_broker

broker = make_broker().with_middlewares(PipelineMiddleware())


@broker.task(task_name="pl.add_one")
async def add_one(value: int) -> int:
    return value + 1


@broker.task(task_name="pl.repeat")
def repeat(value: int) -> list[int]:
    return [value] * value


@broker.task(task_name="pl.square")
async def square(value: int) -> int:
    return value * value


@broker.task(task_name="pl.is_even")
def is_even(value: int) -> bool:
    return value % 2 == 0
