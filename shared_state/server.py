"""The state server: a ``multiprocess`` manager process that owns the shared state.

It listens on a Unix socket (inside the pool's private run directory) with the pool's
authkey, and dies with the process that started it, even when that process is SIGKILLed.
"""

from __future__ import annotations

import os
import pickle
import signal
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocess.managers import BaseManager

_STORE: Any = None
STORE_METHODS = ("update", "reap_lock", "length", "once_done", "mark_once", "info")


def _get_store() -> Any:
    return _STORE


def manager_class() -> type[BaseManager]:
    """The manager type, built on first use so that ``import shared_state`` stays light."""
    global _MANAGER_CLASS
    if _MANAGER_CLASS is None:
        from multiprocess.managers import BaseManager, Server

        class StateServerProcess(Server):
            """The manager's server, answering with the C pickler (see ``FastConnection``)."""

            def handle_request(self, conn: Any) -> None:
                super().handle_request(FastConnection(conn))

        class StateManager(BaseManager):
            _Server = StateServerProcess

        StateManager.register("get_store", callable=_get_store, exposed=STORE_METHODS)
        _MANAGER_CLASS = StateManager
    return _MANAGER_CLASS


_MANAGER_CLASS: type[BaseManager] | None = None


class FastConnection:
    """A ``multiprocess`` connection that pickles with the C pickler when it can.

    ``multiprocess`` pickles every message with dill's pure-Python pickler (about 20 µs for a
    tiny tuple); the state's messages are plain tuples of str, bytes and numbers, which the
    C pickler handles in under 1 µs. Anything else still goes through dill. Both ends read
    either kind, since dill loads standard pickles.
    """

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def send(self, obj: Any) -> None:
        self._conn.send_bytes(fast_dumps(obj))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def fast_dumps(obj: Any) -> bytes:
    try:
        return pickle.dumps(obj, protocol=5)
    except Exception:
        from multiprocess.reduction import ForkingPickler

        return bytes(ForkingPickler.dumps(obj))


def _exit_with_parent(parent_pid: int, version_file: str) -> None:
    """Make sure the server never outlives the process that started it, and takes its
    store's files (in memory) with it: the supervisor may have died without a word."""
    from shared_state.shm import remove_files

    def leave(*_: object) -> None:
        remove_files(version_file)
        os._exit(0)

    signal.signal(signal.SIGTERM, leave)  # also how a shutdown that hangs is ended
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass

    def watch() -> None:
        while os.getppid() == parent_pid:
            threading.Event().wait(0.5)
        leave()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _serve_init(version_file: str, parent_pid: int) -> None:
    global _STORE
    from shared_state.shm import ShmStore
    from shared_state.store import StateStore

    # Ctrl+C reaches the whole process group; the supervisor decides when the state goes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent(parent_pid, version_file)
    _STORE = StateStore(ShmStore(version_file, create=True))
    _STORE.start_reaper()


class StateServer:
    """Handle on a running state server."""

    def __init__(self, manager: BaseManager, address: str, version_file: str = "") -> None:
        self._manager = manager
        self.address = address
        self.version_file = version_file

    @property
    def pid(self) -> int:
        return int(self._manager._process.pid)

    def is_alive(self) -> bool:
        return bool(self._manager._process.is_alive())

    @property
    def sentinel(self) -> int:
        """A file descriptor that becomes readable when the server process ends."""
        return int(self._manager._process.sentinel)

    def exit_status(self, timeout: float = 1.0) -> int | None:
        """The ended server's exit code (negative: the signal), reaping it."""
        self._manager._process.join(timeout)
        return self._manager._process.exitcode

    def shutdown(self) -> None:
        """Stop the server (idempotent; it is killed if it does not stop in time) and remove
        the shared-memory store it created."""
        self._manager.shutdown()
        if self.version_file:
            from shared_state.shm import remove_files

            remove_files(self.version_file)


def start_state_server(address: str, authkey: bytes, version_file: str) -> StateServer:
    """Start a state server on the Unix socket ``address``; return once it accepts clients."""
    import multiprocess

    if os.path.exists(address):
        os.unlink(address)
    # Fork: the server starts with the app already imported, so ``update`` functions that
    # refer to the app's code can be unpickled there.
    ctx = multiprocess.get_context("fork")
    manager = manager_class()(address=address, authkey=authkey, ctx=ctx)
    manager.start(initializer=_serve_init, initargs=(version_file, os.getpid()))
    os.chmod(address, 0o600)
    return StateServer(manager, address, version_file)
