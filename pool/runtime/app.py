"""Finding the user's broker from ``module:attribute``."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from taskiq import AsyncBroker


class AppImportError(Exception):
    """The ``module:attribute`` given on the command line does not name a broker."""


def load_object(spec: str) -> Any:
    """Import ``module:attr`` (the current directory is importable, as with taskiq)."""
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise AppImportError(f"expected MODULE:ATTR (e.g. app:broker), got {spec!r}")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AppImportError(f"cannot import module {module_name!r}: {exc}") from exc
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppImportError(f"module {module_name!r} has no attribute {attr_path!r}") from None
    return obj


def load_broker(spec: str, task_modules: Sequence[str] = ()) -> AsyncBroker:
    """The broker named by ``module:attr``, with its task modules imported (as taskiq does)."""
    obj = load_object(spec)
    if not isinstance(obj, AsyncBroker):
        raise AppImportError(f"{spec} is a {type(obj).__name__}, not a taskiq.AsyncBroker")
    for module in task_modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise AppImportError(f"cannot import task module {module!r}: {exc}") from exc
    return obj
