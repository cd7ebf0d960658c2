"""Finding the user's broker from ``module:attribute``, and its tasks, as ``taskiq worker`` does.

``MODULE:ATTR`` names a ``taskiq.AsyncBroker`` or a function returning one (taskiq's broker
factory). The current directory and ``--app-dir`` are importable. Task modules named on the
command line must import (an error otherwise: a worker silently missing tasks is worse);
modules found by ``--fs-discover`` that fail to import are logged and skipped, as in taskiq.

Every failure is an :class:`AppImportError` whose message says what went wrong and where,
without a traceback; ``detail`` holds the traceback for ``--log-level DEBUG``.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from taskiq import AsyncBroker

if TYPE_CHECKING:
    from pool.runtime.config import PoolConfig

logger = logging.getLogger("pool.run")

EXPECTED = (
    "expected a taskiq broker: an instance of taskiq.AsyncBroker (e.g. "
    "broker = ListQueueBroker(...) or PoolBroker()), or a function that returns one"
)


class AppImportError(Exception):
    """``MODULE:ATTR`` cannot be imported or does not name a broker."""

    def __init__(self, message: str, detail: str | None = None) -> None:
        super().__init__(message)
        self.detail = detail


def _add_paths(app_dir: str | None) -> None:
    """The current directory, then ``--app-dir`` before it, as taskiq puts them."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    if app_dir:
        path = str(Path(app_dir).resolve())
        if path not in sys.path:
            sys.path.insert(0, path)


def _where(exc: BaseException) -> str:
    """``file:line`` of the innermost frame of the user's code that raised ``exc``."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{exc.filename}:{exc.lineno}"
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if "importlib" not in frame.filename and not frame.filename.startswith("<frozen"):
            return f"{frame.filename}:{frame.lineno}"
    return "?"


def import_module(name: str, what: str) -> Any:
    """Import ``name``; any failure becomes an AppImportError that says what and where."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        detail = traceback.format_exc()
        if exc.name == name or (exc.name and name.startswith(exc.name + ".")):
            raise AppImportError(
                f"cannot import {what} {name!r}: no module named {exc.name!r} "
                f"(looked in {os.getcwd()} and on sys.path; --app-dir adds a directory)",
                detail,
            ) from exc
        raise AppImportError(
            f"importing {what} {name!r} failed at {_where(exc)}: {exc}", detail
        ) from exc
    except SyntaxError as exc:
        line = (exc.text or "").strip()
        shown = f": {line}" if line else ""
        raise AppImportError(
            f"{what} {name!r} has a syntax error at {_where(exc)} ({exc.msg}){shown}",
            traceback.format_exc(),
        ) from exc
    except Exception as exc:
        raise AppImportError(
            f"importing {what} {name!r} raised {type(exc).__name__} at {_where(exc)}: {exc}",
            traceback.format_exc(),
        ) from exc


def load_object(spec: str, app_dir: str | None = None) -> Any:
    """Import ``module:attr`` (the current directory and ``app_dir`` are importable)."""
    module_name, sep, attr_path = spec.partition(":")
    if not sep or not module_name or not attr_path:
        raise AppImportError(f"expected MODULE:ATTR (e.g. app:broker), got {spec!r}")
    _add_paths(app_dir)
    module = import_module(module_name, "module")
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AppImportError(
                f"module {module_name!r} ({getattr(module, '__file__', '?')}) has no "
                f"attribute {attr_path!r}; {EXPECTED}"
            ) from None
    return obj


def describe(obj: Any) -> str:
    """What ``obj`` is, in words, for an error message."""
    if inspect.ismodule(obj):
        return f"the module {obj.__name__}"
    if inspect.isclass(obj):
        kind = "a broker class, not a broker: create one" if issubclass(obj, AsyncBroker) else ""
        name = f"{obj.__module__}.{obj.__qualname__}"
        return f"the class {name}" + (f" ({kind})" if kind else "")
    text = repr(obj)
    text = text if len(text) <= 60 else text[:57] + "..."
    cls = type(obj)
    return f"a {cls.__module__}.{cls.__qualname__} ({text})"


def as_broker(spec: str, obj: Any) -> AsyncBroker:
    """``obj`` if it is a broker, or what the factory function ``obj`` returns."""
    if isinstance(obj, AsyncBroker):
        return obj
    if inspect.isfunction(obj):
        try:
            made = obj()
        except Exception as exc:
            raise AppImportError(
                f"{spec} is a broker factory that raised {type(exc).__name__}: {exc}",
                traceback.format_exc(),
            ) from exc
        if isinstance(made, AsyncBroker):
            return made
        raise AppImportError(f"{spec} is a function that returned {describe(made)}; {EXPECTED}")
    hint = ""
    if type(obj).__name__ == "TaskiqScheduler":
        hint = " (a scheduler runs with `python -m pool scheduler`)"
    raise AppImportError(f"{spec} is {describe(obj)}{hint}; {EXPECTED}")


def discover(patterns: Sequence[str]) -> list[str]:
    """The modules matching ``--tasks-pattern`` globs under the current directory (taskiq's
    ``--fs-discover``)."""
    found: set[str] = set()
    for pattern in patterns:
        for path in Path().glob(pattern):
            if path.is_file() and path.suffix in (".py", ".pyc", ".pyd", ".so"):
                found.add(str(path.with_name(path.name.partition(".")[0])).replace(os.sep, "."))
            elif path.is_dir():
                found.add(str(path).replace(os.sep, "."))
    return sorted(found)


def load_broker(
    spec: str,
    task_modules: Sequence[str] = (),
    *,
    app_dir: str | None = None,
    fs_discover: bool = False,
    tasks_patterns: Sequence[str] = (),
) -> AsyncBroker:
    """The broker named by ``module:attr``, with its task modules imported (as taskiq does)."""
    broker = as_broker(spec, load_object(spec, app_dir))
    for module in task_modules:
        import_module(module, "task module")
    if fs_discover:
        for module in discover(tasks_patterns):
            try:
                import_module(module, "discovered task module")
            except AppImportError as exc:
                logger.warning("--fs-discover: skipping %s", exc)
                logger.debug("%s", exc.detail)
    return broker


# How the app was last loaded with ``load_app``: a reload (SIGHUP) loads it the same way.
_loaded_with: dict[str, Any] = {}


def load_app(config: PoolConfig) -> AsyncBroker:
    """The broker of ``config.app``, found and completed as ``config`` says."""
    options: dict[str, Any] = {
        "app_dir": config.app_dir,
        "fs_discover": config.fs_discover,
        "tasks_patterns": tuple(config.tasks_patterns),
    }
    _loaded_with.clear()
    _loaded_with.update(options, app=config.app)
    return load_broker(config.app, config.task_modules, **options)


def load_options(spec: str) -> dict[str, Any]:
    """The options ``load_app`` last used for ``spec`` (none for another app)."""
    if _loaded_with.get("app") != spec:
        return {}
    return {k: v for k, v in _loaded_with.items() if k != "app"}


def load_receiver(config: PoolConfig) -> type[Any]:
    """The receiver class of ``--receiver`` with pool's receiver mixed in (checked, with its
    ``--receiver_arg`` names, before any worker starts)."""
    from taskiq.receiver import Receiver

    from pool.runtime.config import TASKIQ_RECEIVER
    from pool.runtime.receiver import PoolReceiver

    if config.receiver == TASKIQ_RECEIVER:
        chosen: Any = Receiver
    else:
        chosen = load_object(config.receiver, config.app_dir)
    if not (inspect.isclass(chosen) and issubclass(chosen, Receiver)):
        raise AppImportError(
            f"--receiver {config.receiver} is {describe(chosen)}; expected a subclass of "
            "taskiq.receiver.Receiver"
        )
    _check_receiver_args(config, chosen)
    if issubclass(chosen, PoolReceiver):
        return chosen
    if chosen is Receiver:
        return PoolReceiver
    # pool's receiver first: its hooks call the user's receiver, then taskiq's
    return type(f"Pool{chosen.__name__}", (PoolReceiver, chosen), {})


# what pool itself passes to the receiver, each set by an option of its own
_RECEIVER_OPTIONS = {
    "executor": "--max-threadpool-threads",
    "validate_params": "--no-parse",
    "max_async_tasks": "--max-async-tasks",
    "max_async_tasks_jitter": "--max-async-tasks-jitter",
    "max_prefetch": "--max-prefetch",
    "propagate_exceptions": "--no-propagate-errors",
    "ack_type": "--ack-type",
    "wait_tasks_timeout": "--wait-tasks-timeout",
    "max_tasks_to_execute": "--max-tasks-per-child",
    "run_startup": None,
    "on_finished": None,
}


def _check_receiver_args(config: PoolConfig, receiver: type[Any]) -> None:
    for name in config.receiver_args:
        if name in _RECEIVER_OPTIONS or name == "broker":
            option = _RECEIVER_OPTIONS.get(name)
            how = f"use {option}" if option else "pool sets it"
            raise AppImportError(f"--receiver_arg {name}=...: {how}")
    params = inspect.signature(receiver.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    for name in config.receiver_args:
        if name not in params or name in ("self", "broker"):
            takes = ", ".join(p for p in params if p not in ("self", "broker"))
            raise AppImportError(
                f"--receiver_arg {name}=...: {config.receiver} takes no argument {name!r} "
                f"(it takes {takes})"
            )
