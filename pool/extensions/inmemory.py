"""taskiq's ``InMemoryBroker`` with pool's ``TaskiqState``: for tests and small scripts.

Everything else is taskiq's; tasks run through pool's receiver subclass so that a task
asking for ``pool.TaskiqState`` gets this broker's state, as with ``taskiq.TaskiqState``.
"""

from __future__ import annotations

from typing import Any

from taskiq.brokers.inmemory_broker import InMemoryBroker as TaskiqInMemoryBroker

from pool.runtime.receiver import PoolReceiver
from shared_state import TaskiqState


class InMemoryBroker(TaskiqInMemoryBroker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.state = TaskiqState()
        old = self.receiver
        self.receiver = PoolReceiver(
            broker=self,
            executor=self.executor,
            validate_params=old.validate_params,
            max_async_tasks=old.sem._value if old.sem is not None else None,
            propagate_exceptions=old.propagate_exceptions,
        )
