"""Named locks usable with ``with`` and ``async with``, for local and shared states alike."""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
import time
from types import TracebackType
from typing import Protocol


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Lock tokens: unique per process (a random prefix, new in a forked child) and per lock.
_token_prefix = os.urandom(8).hex()
_token_count = itertools.count()
_pid = os.getpid()


def _new_token() -> str:
    return f"{_token_prefix}{next(_token_count)}"


def _after_fork_in_child() -> None:
    global _token_prefix, _pid
    _token_prefix = os.urandom(8).hex()
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork_in_child)


class LockBackend(Protocol):
    def acquire(self, name: str, token: str, pid: int, timeout: float) -> bool: ...

    def release(self, name: str, token: str) -> bool: ...


class LockTable:
    """Named locks owned by (token, pid); a lock whose owner process died is taken over."""

    def __init__(self) -> None:
        self._owners: dict[str, tuple[str, int]] = {}
        self._changed = threading.Condition()

    def acquire(self, name: str, token: str, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + max(timeout, 0.0)
        with self._changed:
            while True:
                owner = self._owners.get(name)
                if owner is None or not _pid_alive(owner[1]):
                    self._owners[name] = (token, pid)
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                # Wake up now and then to notice an owner that died without releasing.
                self._changed.wait(min(remaining, 0.2))

    def release(self, name: str, token: str) -> bool:
        with self._changed:
            owner = self._owners.get(name)
            if owner is None or owner[0] != token:
                return False
            del self._owners[name]
            self._changed.notify_all()
            return True


# One server call waits at most this long, so a sync caller stays interruptible.
_WAIT_SLICE = 0.5


class StateLock:
    """A lock named ``name`` in a state: cross-process when the state is shared."""

    def __init__(self, backend: LockBackend, name: str) -> None:
        if not isinstance(name, str):
            raise TypeError(f"lock names are str, not {type(name).__name__}")
        self._backend = backend
        self.name = name
        self._token = _new_token()
        self._held = False

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._held:
            raise RuntimeError(f"lock {self.name!r} is already held by this holder")
        unbounded = blocking and (timeout is None or timeout < 0)
        if unbounded and self._backend.acquire(self.name, self._token, _pid, _WAIT_SLICE):
            self._held = True  # the common case, at the first try
            return True
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        while True:
            if not blocking:
                wait = 0.0
            elif deadline is None:
                wait = _WAIT_SLICE
            else:
                wait = max(0.0, min(_WAIT_SLICE, deadline - time.monotonic()))
            if self._backend.acquire(self.name, self._token, _pid, wait):
                self._held = True
                return True
            if not blocking or (deadline is not None and time.monotonic() >= deadline):
                return False

    def release(self) -> None:
        if not self._held:
            raise RuntimeError(f"lock {self.name!r} is not held")
        self._held = False
        self._backend.release(self.name, self._token)

    def locked_by_me(self) -> bool:
        return self._held

    def __enter__(self) -> StateLock:
        if not self._held and self._backend.acquire(self.name, self._token, _pid, _WAIT_SLICE):
            self._held = True  # the common case, at the first try
            return self
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    async def __aenter__(self) -> StateLock:
        if self._held:
            raise RuntimeError(f"lock {self.name!r} is already held by this holder")
        pid = _pid
        if not self._backend.acquire(self.name, self._token, pid, 0.0):
            await self._wait_in_thread(pid)
        self._held = True
        return self

    async def _wait_in_thread(self, pid: int) -> None:
        """Wait for the lock in a thread of its own, so the event loop keeps running.

        Not in the loop's default executor: many waiters would fill it and stall everything
        else that runs there (``to_thread``, DNS look-ups of the loop). The thread is a daemon
        and waits in slices, so it notices a cancelled waiter and never holds up an exit.
        """
        loop = asyncio.get_running_loop()
        got: asyncio.Future[None] = loop.create_future()
        stop = threading.Event()
        waiter = threading.Thread(
            target=self._wait, args=(loop, got, stop, pid), name="state-lock", daemon=True
        )
        waiter.start()
        try:
            await got
        except asyncio.CancelledError:
            stop.set()
            if got.done() and not got.cancelled() and got.exception() is None:
                self._backend.release(self.name, self._token)  # taken just as we gave up
            raise

    def _wait(
        self,
        loop: asyncio.AbstractEventLoop,
        got: asyncio.Future[None],
        stop: threading.Event,
        pid: int,
    ) -> None:
        error: BaseException | None = None
        try:
            while not self._backend.acquire(self.name, self._token, pid, _WAIT_SLICE):
                if stop.is_set():
                    return
        except BaseException as exc:  # handed to the waiter, raised there
            error = exc
        try:
            loop.call_soon_threadsafe(self._hand_over, got, error)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            if error is None:
                self._backend.release(self.name, self._token)

    def _hand_over(self, got: asyncio.Future[None], error: BaseException | None) -> None:
        """On the loop: give the waiter the lock (or the error); release it if it gave up."""
        if got.cancelled():
            if error is None:
                self._backend.release(self.name, self._token)
        elif error is not None:
            got.set_exception(error)
        else:
            got.set_result(None)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
