"""How messages and results become bytes.

JSON is the default everywhere: data read from another process or machine is never unpickled
unless the user chooses :class:`PickleSerializer` on purpose.
"""

from __future__ import annotations

import json
import pickle
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from pool.message import BrokerMessage, TaskiqMessage

if TYPE_CHECKING:
    from pool.broker import AsyncBroker


class TaskiqSerializer(ABC):
    """Turns Python values into bytes and back."""

    @abstractmethod
    def dumpb(self, value: Any) -> bytes: ...

    @abstractmethod
    def loadb(self, value: bytes) -> Any: ...


class JSONSerializer(TaskiqSerializer):
    """Safe default. Values must be JSON types (dict, list, str, int, float, bool, None)."""

    def __init__(self) -> None:
        self._encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
        self._decoder = json.JSONDecoder()

    def dumpb(self, value: Any) -> bytes:
        return self._encoder.encode(value).encode()

    def loadb(self, value: bytes) -> Any:
        return self._decoder.decode(value.decode())


class PickleSerializer(TaskiqSerializer):
    """Any picklable value. Only for peers you trust: unpickling runs code."""

    def dumpb(self, value: Any) -> bytes:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)

    def loadb(self, value: bytes) -> Any:
        return pickle.loads(value)


class TaskiqFormatter(ABC):
    """Turns a :class:`TaskiqMessage` into a :class:`BrokerMessage` and back."""

    @abstractmethod
    def dumps(self, message: TaskiqMessage) -> BrokerMessage: ...

    @abstractmethod
    def loads(self, message: bytes) -> TaskiqMessage: ...


class ProxyFormatter(TaskiqFormatter):
    """The default formatter: the message as a dict through the broker's serializer."""

    def __init__(self, broker: AsyncBroker) -> None:
        self.broker = broker

    def dumps(self, message: TaskiqMessage) -> BrokerMessage:
        return BrokerMessage(
            task_id=message.task_id,
            task_name=message.task_name,
            message=self.broker.serializer.dumpb(message.to_dict()),
            labels=message.labels,
        )

    def loads(self, message: bytes) -> TaskiqMessage:
        data = self.broker.serializer.loadb(message)
        if not isinstance(data, dict):
            raise ValueError(f"expected a mapping, got {type(data).__name__}")
        return TaskiqMessage.from_dict(data)
