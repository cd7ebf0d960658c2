"""Signals that count: each SIGTTIN/SIGTTOU the supervisor is sent is one worker more/less.

Linux keeps one pending instance of a standard signal: a second SIGTTIN that arrives before
the first was taken is lost. A signal handled by the event loop is taken by the main thread,
which is often busy in a system call for a while (``fork()`` of the next worker), so
SIGTTINs sent a millisecond apart merged. Here the counted signals are blocked in every
thread but a few, which do nothing but wait for them (``sigwaitinfo``) and hand each to the
loop. A waiter needs the GIL again after it took a signal (held for a while by a ``fork()``),
so ``WAITERS`` of them wait at once: while one waits for the GIL, the next takes the next
signal (in the kernel, without the GIL).

Processes started afterwards inherit the blocked mask: ``unblock()`` in a child undoes it.

Also here: ``parent_death_signal``, the signal Linux sends a child when its parent dies.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import signal
import sys
import threading
from collections.abc import Callable

COUNTED = (signal.SIGTTIN, signal.SIGTTOU)
WAITERS = 4


def count_signals(
    loop: asyncio.AbstractEventLoop, handlers: dict[signal.Signals, Callable[[], None]]
) -> list[threading.Thread]:
    """Call ``handlers[sig]`` on ``loop`` once for each such signal the process receives."""
    signals = set(handlers)
    signal.pthread_sigmask(signal.SIG_BLOCK, signals)

    def wait() -> None:
        while True:
            info = signal.sigwaitinfo(signals)
            handler = handlers[signal.Signals(info.si_signo)]
            try:
                loop.call_soon_threadsafe(handler)
            except RuntimeError:  # the loop is closed: the supervisor has stopped
                return

    threads = [
        threading.Thread(target=wait, name=f"pool-signals-{n}", daemon=True) for n in range(WAITERS)
    ]
    for thread in threads:
        thread.start()
    return threads


def unblock() -> None:
    """In a child process: the counted signals back to normal delivery."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, COUNTED)


PR_SET_PDEATHSIG = 1


def parent_death_signal(sig: int) -> Callable[[], object]:
    """A call that asks Linux to send ``sig`` to the calling process once its parent dies
    (elsewhere it does nothing). libc is looked up now, so the call can run between fork
    and exec (``preexec_fn``), where loading a library is not safe."""
    if sys.platform.startswith("linux"):
        try:
            prctl = ctypes.CDLL(None, use_errno=True).prctl
        except (OSError, AttributeError):
            pass
        else:
            return functools.partial(prctl, PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    return lambda: None
