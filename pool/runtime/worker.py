"""A worker process: fires WORKER_STARTUP with the shared state, then runs tasks from its pipe.

Tasks run through taskiq's receiver (``receiver.PoolReceiver``), from whichever broker the
app uses. The pipe to the supervisor carries the rest: drain orders down, readiness,
heartbeats and finished-task reports up, and for a ``PoolBroker`` the tasks and results
too. When the pipe closes, the supervisor is gone and the worker exits at once (a
parent-death signal is the backstop if the event loop is blocked).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

from pool.runtime.config import PoolConfig
from pool.runtime.eager import eager
from pool.runtime.events import WorkerEvents
from pool.runtime.inline import run_inline
from pool.runtime.protocol import (
    Bye,
    Cancel,
    Done,
    Drain,
    Finished,
    Frame,
    FrameProtocol,
    Heartbeat,
    LateResult,
    Ready,
    Request,
    SaveProgress,
    StartupFailed,
    Task,
)
from pool.runtime.receiver import task_error
from shared_state import TaskiqState

logger = logging.getLogger("pool.runtime.worker")

EXIT_OK = 0
EXIT_STARTUP_FAILED = 3
EXIT_ORPHANED = 70

_NOT_FINISHED = (0, 0)


@dataclass
class WorkerConfig:
    """Everything a worker needs; picklable for the spawn start method."""

    pool: PoolConfig
    worker_id: int
    run_dir: str
    authkey: bytes
    supervisor_pid: int
    close_fds: list[int] = field(default_factory=list)


def worker_main(config: WorkerConfig, conn: Any) -> None:
    """Process entry point (the ``target`` of the worker's ``multiprocess.Process``)."""
    _leave_parent_context(config)
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    conn.close()
    _worker_logging(config.pool, config.worker_id)
    from pool.runtime.output import label_output

    label_output(f"[worker {config.worker_id} {os.getpid()}] ")
    worker = Worker(config, sock)
    code = _run(worker.run())
    logging.shutdown()
    os._exit(code)


def _worker_logging(options: PoolConfig, worker_id: int) -> None:
    """The supervisor's log format, naming this worker; the app's own handlers untouched.

    A forked worker inherits the supervisor's handler (``runner.POOL_HANDLER``): only its
    format changes. With ``--no-configure-logging`` nothing changes at all.
    """
    import multiprocessing

    from pool.runtime.runner import POOL_HANDLER, log_format

    # what %(processName)s shows (logging asks the standard library's multiprocessing)
    multiprocessing.current_process().name = f"pool-worker-{worker_id}"
    if not options.configure_logging:
        return
    formatter = logging.Formatter(log_format(options, f"worker {worker_id}"))
    ours = [h for h in logging.getLogger().handlers if h.get_name() == POOL_HANDLER]
    for handler in ours:
        handler.setFormatter(formatter)
    if not ours and not logging.getLogger().handlers:  # spawned: a fresh interpreter
        from pool.runtime.runner import configure_logging

        configure_logging(options, f"worker {worker_id}")


def _run(coro: Any) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return int(asyncio.run(coro))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return int(runner.run(coro))


def _leave_parent_context(config: WorkerConfig) -> None:
    """Forget what a fork copied from the supervisor: its loop, signal handlers and sockets."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C goes to the supervisor, which drains us
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    from pool.runtime.signals import unblock

    unblock()  # the supervisor takes them in one thread of its own (signals.py)
    if config.pool.start_method == "fork":
        try:
            signal.set_wakeup_fd(-1)
        except ValueError:
            pass
        asyncio.events._set_running_loop(None)
        asyncio.set_event_loop(None)
        for fd in config.close_fds:
            try:
                os.close(fd)
            except OSError:
                pass
    _die_with_parent(config.supervisor_pid)


def _die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL us if the supervisor dies, even when our event loop is blocked."""
    from pool.runtime.signals import parent_death_signal

    parent_death_signal(signal.SIGKILL)()
    if os.getppid() != parent_pid:  # it died before prctl took effect
        os._exit(EXIT_ORPHANED)


class WorkerPipe(FrameProtocol):
    """The worker's end of the supervisor pipe."""

    coalesce_writes = True

    def __init__(self, worker: Worker) -> None:
        super().__init__()
        self.worker = worker

    @property
    def peer(self) -> str:
        return f"worker {self.worker.config.worker_id} pipe"

    def frame_received(self, frame: Frame) -> None:
        if isinstance(frame, Task):
            self.worker.deliver(frame)
        elif isinstance(frame, Drain):
            self.worker.begin_drain(frame.timeout)
        elif isinstance(frame, Cancel):
            self.worker.cancel(frame)
        elif isinstance(frame, Request):  # {"events": bool}: somebody subscribes, or not
            self.worker.events.enabled = bool(frame.body.get("events"))
        else:
            logger.warning("ignoring an unexpected %s frame", type(frame).__name__)

    def connection_closed(self, exc: Exception | None) -> None:
        self.worker.supervisor_lost()


class Worker:
    """Runs the broker's tasks through taskiq's receiver until drained or orphaned.

    For a ``PoolBroker`` it is also the broker's :class:`WorkerLink`: tasks arrive on the
    pipe, and a result leaves together with its message's acknowledgement.
    """

    def __init__(self, config: WorkerConfig, sock: socket.socket) -> None:
        self.config = config
        self.sock = sock
        self.pipe: WorkerPipe | None = None
        self.stop = asyncio.Event()
        self.receiver: Any = None
        self.broker: Any = None
        # WorkerLink, for a PoolBroker
        self.inbox: asyncio.Queue[tuple[int, str, bytes]] = asyncio.Queue()
        self._unacked: dict[str, int] = {}
        self._stashed: dict[str, bytes] = {}
        self._outcomes: dict[str, tuple[int, int]] = {}
        self.events = WorkerEvents(self._send_events)

    def _send_events(self, body: dict[str, Any]) -> None:
        if self.pipe is not None:
            self.pipe.send(Request(body))

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        _, self.pipe = await loop.connect_accepted_socket(lambda: WorkerPipe(self), self.sock)
        loop.add_signal_handler(signal.SIGTERM, self.begin_drain, None)
        try:
            await self._start()
        except Exception as exc:
            logger.error("worker startup failed:\n%s", traceback.format_exc())
            self.pipe.send(StartupFailed(f"{type(exc).__name__}: {exc}", traceback.format_exc()))
            await self._flush()
            return EXIT_STARTUP_FAILED
        self.pipe.send(Ready(os.getpid()))
        heartbeat = asyncio.create_task(self._heartbeat())
        if getattr(self.broker, "worker_link", None) is self:
            await self._consume_pool_broker()
        else:
            await self.receiver.listen(self.stop)
        await self._cancel_leftovers()
        heartbeat.cancel()
        try:
            await self.broker.shutdown()
        except Exception:
            logger.exception("worker shutdown failed")
        self.pipe.send(Bye(self._interrupted()))
        await self._flush()
        return EXIT_OK

    async def _start(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        from taskiq.acks import parse_acknowledge_type

        from pool.extensions.pool_broker import PoolBroker
        from pool.runtime.app import load_app, load_receiver
        from pool.runtime.rundir import RunDir
        from pool.runtime.state import open_state

        options = self.config.pool
        broker = load_app(options)
        if options.start_method == "fork":
            _renew_fork_copies(broker)
        broker.is_worker_process = True
        broker.state = open_state(
            options.state_url,
            RunDir.at(self.config.run_dir),
            self.config.authkey,
            options.state_prefix,
        )
        if isinstance(broker, PoolBroker):
            broker.run_dir = self.config.run_dir
            broker.worker_link = self
        else:
            _cancel_safe_listen(broker)
        self.events.serve(broker, supervisor_sees=isinstance(broker, PoolBroker))
        _plugins_write_locally(broker, options)
        _bound_shutdown(broker, options.shutdown_timeout)
        self.broker = broker
        receiver_class = load_receiver(options)
        self.receiver = receiver_class(
            broker,
            executor=ThreadPoolExecutor(options.sync_threads, thread_name_prefix="pool-sync"),
            validate_params=options.validate_params,
            max_async_tasks=options.max_async_tasks,
            max_async_tasks_jitter=options.max_async_tasks_jitter,
            max_prefetch=options.max_prefetch,
            propagate_exceptions=options.propagate_errors,
            run_startup=False,
            ack_type=parse_acknowledge_type(options.ack_type),
            wait_tasks_timeout=options.wait_tasks_timeout,
            # taskiq's --max-tasks-per-child: the receiver takes no more; the supervisor
            # (which counts them too) starts the replacement
            max_tasks_to_execute=options.max_tasks_per_child,
            on_finished=self._finished,
            on_started=self.events.started,
            **options.receiver_args,
        )
        await broker.startup()

    # ----------------------------------------------------------------- WorkerLink
    def deliver(self, frame: Task) -> None:
        self._unacked[frame.task_id] = frame.delivery
        self.inbox.put_nowait((frame.delivery, frame.task_id, frame.message))

    def acknowledge(self, delivery: int, task_id: str) -> None:
        if self._unacked.get(task_id) == delivery:
            del self._unacked[task_id]
        outcome, duration_us = self._outcomes.pop(task_id, _NOT_FINISHED)
        assert self.pipe is not None
        self.pipe.send(
            Done(delivery, task_id, self._stashed.pop(task_id, b""), outcome, duration_us)
        )

    def cancel(self, frame: Cancel) -> None:
        """The supervisor cancelled a running delivery: once stopped, it is acknowledged."""
        task = self.receiver.cancel(frame.delivery) if self.receiver is not None else None
        if task is not None:
            task.add_done_callback(lambda _: self.acknowledge(frame.delivery, frame.task_id))

    def save_result(self, task_id: str, payload: bytes) -> None:
        """Kept until the acknowledgement, which carries it; sent at once after it."""
        if task_id in self._unacked:
            self._stashed[task_id] = payload
        else:
            assert self.pipe is not None
            self.pipe.send(LateResult(task_id, payload))

    def save_progress(self, task_id: str, payload: bytes) -> None:
        assert self.pipe is not None
        self.pipe.send(SaveProgress(task_id, payload))

    # ----------------------------------------------------------------- the rest
    def _finished(self, message: Any, result: Any, duration: float) -> None:
        """A task ran to its end: tell the supervisor, for stats and metrics (its duration
        in whole microseconds, as every event and figure shows it)."""
        told_with_ack = message.task_id in self._unacked
        duration_us = int(duration * 1e6)
        if self.events.enabled:
            error = task_error(result) if result.is_err else None
            self.events.finished(message, error, duration_us / 1e6, acknowledged=not told_with_ack)
        if told_with_ack:  # told with the acknowledgement, in one frame
            self._outcomes[message.task_id] = (2 if result.is_err else 1, duration_us)
        else:
            assert self.pipe is not None
            self.pipe.send(Finished(message.task_name, bool(result.is_err), duration_us))
        forget = getattr(self.broker.result_backend, "forget_local", None)
        if forget is not None:
            forget(message.task_id)

    async def _consume_pool_broker(self) -> None:
        """Run what ``PoolBroker.listen()`` yields until drained, each through the
        receiver's ``callback``: inline while it does not wait, in a task of its own from
        its first wait on (see ``inline``).

        The supervisor hands a worker at most ``--max-async-tasks`` (plus ``--max-prefetch``)
        tasks at a time, so the admission control of taskiq's ``Receiver.listen`` (two
        semaphores and three asyncio tasks per message) is not needed here.
        """
        messages = self.broker.listen()
        hosts: set[asyncio.Task[None]] = set()  # each runs one callback that waits
        consumer: list[asyncio.Task[None]] = []  # the one task reading messages now

        def take_over() -> None:
            task = asyncio.create_task(consume())
            consumer[:] = [task]

        async def consume() -> None:
            callback = self.receiver.callback
            async for message in messages:
                try:
                    waiting = run_inline(callback(message))
                except Exception:
                    logger.exception("the receiver failed on a message")
                    continue
                except asyncio.CancelledError:
                    continue  # cancelled before it ever waited: nothing more to do
                if waiting is not None:
                    # this task hosts that callback from now on; a new one reads on
                    host = asyncio.current_task()
                    assert host is not None
                    hosts.add(host)
                    host.add_done_callback(hosts.discard)
                    take_over()
                    await waiting
                    return

        take_over()
        await self.stop.wait()
        # tasks not taken yet stay unacknowledged: the supervisor has them
        consumer[0].cancel()
        await asyncio.gather(consumer[0], return_exceptions=True)
        if hosts:
            await asyncio.wait(list(hosts), timeout=self.receiver.wait_tasks_timeout)

    def begin_drain(self, timeout: float | None) -> None:
        if timeout is not None and self.receiver is not None:
            self.receiver.wait_tasks_timeout = float(timeout)
        self.stop.set()

    async def _cancel_leftovers(self) -> None:
        """Tasks still running after the shutdown timeout are cancelled (delivered again)."""
        pending = [task for task in self.receiver.running if not task.done()]
        if not pending:
            return
        logger.warning(
            "shutdown timeout (%.1f s) passed: cancelling %d task(s); they are delivered again",
            self.receiver.wait_tasks_timeout or 0.0,
            len(pending),
        )
        self.receiver.abandon()
        await asyncio.gather(*pending, return_exceptions=True)

    def _interrupted(self) -> list[int]:
        """Deliveries that started and were cancelled by the drain timeout: the ones not
        acknowledged and no longer waiting in the inbox (PoolBroker only)."""
        waiting = set()
        while not self.inbox.empty():
            waiting.add(self.inbox.get_nowait()[0])
        return [d for d in self._unacked.values() if d not in waiting]

    def supervisor_lost(self) -> None:
        if self.stop.is_set() and not (self.receiver and self.receiver.running):
            return
        logger.error("the supervisor is gone; exiting now")
        os._exit(EXIT_ORPHANED)

    async def _heartbeat(self) -> None:
        assert self.pipe is not None
        while True:
            await asyncio.sleep(self.config.pool.heartbeat_interval)
            self.pipe.send(Heartbeat(self.receiver.unreported))

    async def _flush(self) -> None:
        """Give the transport a moment to hand the last frames to the kernel."""
        assert self.pipe is not None
        self.pipe.flush()
        transport = self.pipe.transport
        deadline = time.monotonic() + 5
        while (
            transport is not None
            and transport.get_write_buffer_size()
            and time.monotonic() < deadline
        ):
            await asyncio.sleep(0.01)


# ----------------------------------------------------------------- set-up of _start
def _renew_fork_copies(broker: Any) -> None:
    """Renew what a forked worker must not share with its siblings.

    The supervisor imported the app, so objects the app made at import are copies in every
    worker. A NATS client draws its reply inboxes from a random generator made with it:
    copied, every worker would subscribe to the same inboxes and receive its siblings'
    replies (each JetStream message would run in every worker).
    """
    client_module = sys.modules.get("nats.aio.client")
    if client_module is None:
        return
    from nats.nuid import NUID

    owners = [broker, broker.result_backend, *broker.middlewares]
    for owner in owners:
        for value in list(vars(owner).values()):
            if isinstance(value, client_module.Client):
                value._nuid = NUID()


class _PluginView(TaskiqState):
    """``broker.state`` as an event handler of a plugin sees it: the same state (the very
    same tiers), except that what the handler stores stays in this worker's local tier."""

    def set_value(self, key: str, value: Any) -> None:
        self.set_local(key, value)

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key in self:
            return self[key]
        self.set_local(key, default)
        return default


def _plugin_view(state: TaskiqState) -> TaskiqState:
    view = _PluginView.__new__(_PluginView)
    object.__setattr__(view, "__dict__", state.__dict__)  # one state, two write policies
    return view


def _from_plugin(handler: Any, app_packages: set[str]) -> bool:
    """True for a handler defined by an installed package (a plugin): not pool, taskiq or the
    app itself (whose packages count as the app's wherever they are installed)."""
    from pool.runtime.reload import is_user_module

    name = getattr(handler, "__module__", None) or type(handler).__module__
    module = sys.modules.get(name or "")
    if module is None or name.split(".")[0] in ("pool", "shared_state", "taskiq"):
        return False
    if getattr(module, "__file__", None) is None:
        return False
    return not is_user_module(name, module, app_packages)


def _plugins_write_locally(broker: Any, options: PoolConfig) -> None:
    """WORKER_* handlers of plugins (taskiq-fastapi, ...) keep what they store in the worker.

    Plugins are written for taskiq, whose state is one per process: taskiq-fastapi stores its
    FastAPI app and the app's lifespan there. Shared, each worker would overwrite the other
    workers' copies, and read back a copy of a sibling's lifespan at shutdown.
    """
    from taskiq import TaskiqEvents

    from pool.runtime.reload import app_packages

    ours = app_packages(options.app, options.task_modules)

    def local(handler: Any) -> Any:
        def run(state: Any) -> Any:
            shared = isinstance(state, TaskiqState) and state.shared
            return handler(_plugin_view(state) if shared else state)

        return run

    for event in (TaskiqEvents.WORKER_STARTUP, TaskiqEvents.WORKER_SHUTDOWN):
        handlers = broker.event_handlers[event]
        handlers[:] = [local(h) if _from_plugin(h, ours) else h for h in handlers]


LISTEN_CANCEL_GRACE = 2.0


def _cancel_safe_listen(broker: Any) -> None:
    """``broker.listen()`` that stops when taskiq's receiver cancels it, even if the broker's
    client loses the cancellation.

    The receiver stops reading by cancelling the pending ``anext()`` of ``listen()``. A
    cancellation that arrives just as a blocking read returns can be lost in redis-py
    (redis/redis-py#2028): the broker's loop goes on reading and the worker never stops. Here
    a read that has to wait runs in a task of its own (a message the broker has ready is
    taken at once: ``eager``); once cancelled, it is cancelled again until it ends (a message
    it got meanwhile is handed over, as taskiq does with a late delivery), and after
    ``LISTEN_CANCEL_GRACE`` seconds it is left behind.
    """
    listen = broker.listen

    async def cancel_safe() -> Any:
        inner = listen()
        step: asyncio.Future[Any] | None = None
        try:
            while True:
                step = eager(inner.__anext__())  # a message ready: no task, no shield
                try:
                    message = step.result() if step.done() else await asyncio.shield(step)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if not await _stop_reading(step):
                        raise
                    message = step.result()
                step = None
                yield message
        finally:
            if step is None or step.done():
                await inner.aclose()

    broker.listen = cancel_safe


async def _stop_reading(step: asyncio.Future[Any]) -> bool:
    """Cancel ``step`` until it ends; True if it ended with a message."""
    deadline = time.monotonic() + LISTEN_CANCEL_GRACE
    while not step.done() and time.monotonic() < deadline:
        step.cancel()
        await asyncio.wait([step], timeout=0.05)
    if not step.done():
        logger.warning(
            "the broker's listen() ignored its cancellation for %.0f s; leaving it behind",
            LISTEN_CANCEL_GRACE,
        )
        return False
    return not step.cancelled() and step.exception() is None


def _bound_shutdown(broker: Any, timeout: float) -> None:
    """``broker.shutdown()`` (WORKER_SHUTDOWN handlers included) takes at most ``timeout``
    seconds, and its errors are logged, as in taskiq's worker (``--shutdown-timeout``)."""
    shutdown = broker.shutdown

    async def bounded() -> None:
        try:
            await asyncio.wait_for(shutdown(), timeout)
        except asyncio.TimeoutError:
            logger.warning("broker shutdown did not finish in %s s (--shutdown-timeout)", timeout)
        except Exception:
            logger.exception("broker shutdown failed")

    broker.shutdown = bounded
