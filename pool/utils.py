"""Small helpers shared by several modules."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable
from typing import Any, TypeVar, cast

T = TypeVar("T")


async def maybe_awaitable(value: T | Awaitable[T]) -> T:
    """Await ``value`` when it is awaitable, so hooks may be sync or async."""
    if inspect.isawaitable(value):
        return await value
    return cast(T, value)


def callable_name(func: Any) -> str:
    """A readable dotted name for logs and error messages."""
    module = getattr(func, "__module__", None) or ""
    name = getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)
    return f"{module}.{name}" if module else name
