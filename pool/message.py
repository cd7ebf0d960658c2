"""Messages as they travel from a producer to a worker."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

AckCallback = Callable[[], Optional[Awaitable[None]]]  # noqa: UP045


@dataclass
class TaskiqMessage:
    """A task call: which task, with which arguments and labels."""

    task_id: str
    task_name: str
    labels: dict[str, Any] = field(default_factory=dict)
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    labels_types: Optional[dict[str, int]] = None  # noqa: UP045

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TaskiqMessage:
        return cls(
            task_id=str(data["task_id"]),
            task_name=str(data["task_name"]),
            labels=dict(data.get("labels") or {}),
            args=list(data.get("args") or []),
            kwargs=dict(data.get("kwargs") or {}),
            labels_types=data.get("labels_types"),
        )


@dataclass
class BrokerMessage:
    """A formatted message: the bytes a broker moves, plus routing facts."""

    task_id: str
    task_name: str
    message: bytes
    labels: dict[str, Any] = field(default_factory=dict)


@dataclass
class AckableMessage:
    """Message bytes with the callback that acknowledges them once the result is saved."""

    data: bytes
    ack: AckCallback
    reject: Optional[AckCallback] = None  # noqa: UP045


RawMessage = Union[bytes, AckableMessage]  # noqa: UP007
