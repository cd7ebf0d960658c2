"""The state every worker of a pool shares: ``TaskiqState`` and its state server."""

from shared_state.client import SharedBackend, connect_state
from shared_state.locks import StateLock
from shared_state.server import StateServer, start_state_server
from shared_state.state import TaskiqState

__all__ = [
    "SharedBackend",
    "StateLock",
    "StateServer",
    "TaskiqState",
    "connect_state",
    "start_state_server",
]
