"""A PoolBroker traced by taskiq's OpenTelemetryMiddleware (tests/test_observe.py)."""

from __future__ import annotations

from taskiq.middlewares.opentelemetry_middleware import OpenTelemetryMiddleware

from pool import PoolBroker

broker = PoolBroker().with_middlewares(OpenTelemetryMiddleware())


@broker.task
async def traced() -> str:
    from opentelemetry import trace

    return f"{trace.get_current_span().get_span_context().trace_id:032x}"
