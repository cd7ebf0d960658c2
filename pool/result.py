"""The outcome of one task run, and how errors survive the trip between processes."""

from __future__ import annotations

import builtins
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any, Generic, Optional, TypeVar

from pool.exceptions import TaskFailedError

_ReturnType = TypeVar("_ReturnType")


@dataclass
class TaskiqResult(Generic[_ReturnType]):
    """What a task returned or raised, how long it took, and the labels it ran with."""

    is_err: bool
    return_value: _ReturnType = None  # type: ignore[assignment]
    execution_time: float = 0.0
    labels: dict[str, Any] = field(default_factory=dict)
    error: Optional[BaseException] = None  # noqa: UP045
    log: Optional[str] = None  # noqa: UP045

    def raise_for_error(self) -> TaskiqResult[_ReturnType]:
        """Raise the task's exception if it failed, else return the result itself."""
        if self.error is not None:
            raise self.error
        return self

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly form; the error is described, never pickled."""
        return {
            "is_err": self.is_err,
            "return_value": self.return_value,
            "execution_time": self.execution_time,
            "labels": self.labels,
            "error": encode_error(self.error) if self.error is not None else None,
            "log": self.log,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskiqResult[Any]:
        error = data.get("error")
        return_value: Any = data.get("return_value")  # any JSON value, so Any for mypy
        return cls(
            is_err=bool(data.get("is_err")),
            return_value=return_value,
            execution_time=float(data.get("execution_time") or 0.0),
            labels=dict(data.get("labels") or {}),
            error=decode_error(error) if error else None,
            log=data.get("log"),
        )


def _constructor_args(exc: BaseException) -> tuple[Any, ...]:
    """The arguments that rebuild ``exc``: what its ``__reduce__`` says, else ``exc.args``."""
    try:
        reduced = exc.__reduce__()
    except Exception:
        return exc.args
    if isinstance(reduced, tuple) and len(reduced) >= 2 and reduced[0] is type(exc):
        return tuple(reduced[1])
    return exc.args


def encode_error(exc: BaseException) -> dict[str, Any]:
    """Describe an exception with plain data (type, arguments, message, traceback)."""
    cls = type(exc)
    raw = _constructor_args(exc)
    args = [a for a in raw if isinstance(a, (str, int, float, bool, type(None)))]
    return {
        "type": f"{cls.__module__}.{cls.__qualname__}",
        "args": args if len(args) == len(raw) else None,
        "message": str(exc),
        "traceback": "".join(traceback.format_exception(cls, exc, exc.__traceback__)),
    }


def decode_error(data: dict[str, Any]) -> BaseException:
    """Rebuild an exception of the original class when that class is already imported here.

    Nothing is imported on behalf of a message: a class from a module this process has not
    loaded becomes a :class:`TaskFailedError` that carries the type name and message.
    """
    type_name = str(data.get("type") or "Exception")
    message = str(data.get("message") or "")
    module_name, _, qualname = type_name.rpartition(".")
    module = builtins if module_name == "builtins" else sys.modules.get(module_name)
    cls: Any = module
    for part in qualname.split("."):
        cls = getattr(cls, part, None)
    exc: BaseException
    if isinstance(cls, type) and issubclass(cls, BaseException):
        try:
            args = data.get("args")
            exc = cls(*args) if args is not None else cls(message)
        except Exception:
            exc = TaskFailedError(message, type_name)
    else:
        exc = TaskFailedError(message, type_name)
    remote_tb = data.get("traceback")
    if remote_tb and hasattr(exc, "add_note"):
        exc.add_note(f"Traceback in the worker:\n{remote_tb}")
    return exc
