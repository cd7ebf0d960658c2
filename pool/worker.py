"""A worker process: fires WORKER_STARTUP with the shared state, then runs tasks from its pipe.

The pipe to the supervisor carries everything: tasks down, results up, drain orders down,
readiness and heartbeats up. When the pipe closes, the supervisor is gone and the worker
exits at once (a parent-death signal is the backstop if the event loop is blocked).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import signal
import socket
import sys
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from pool.protocol import FrameProtocol, Op, decode_json, encode_json

logger = logging.getLogger("pool.worker")

EXIT_OK = 0
EXIT_STARTUP_FAILED = 3
EXIT_ORPHANED = 70


@dataclass
class WorkerConfig:
    """Everything a worker needs; picklable for the spawn start method."""

    app: str
    worker_id: int
    run_dir: str
    authkey: bytes
    supervisor_pid: int
    start_method: str
    max_async_tasks: int = 100
    sync_threads: int = 8
    shutdown_timeout: float = 30.0
    heartbeat_interval: float = 1.0
    log_level: str = "INFO"
    state_url: str | None = None
    state_prefix: str = "pool:state"
    close_fds: list[int] = field(default_factory=list)


def worker_main(config: WorkerConfig, conn: Any) -> None:
    """Process entry point (the ``target`` of the worker's ``multiprocess.Process``)."""
    _leave_parent_context(config)
    sock = socket.socket(fileno=os.dup(conn.fileno()))
    conn.close()
    logging.basicConfig(
        level=config.log_level.upper(),
        format=f"%(asctime)s [worker {config.worker_id} %(process)d] %(levelname)s %(name)s: "
        "%(message)s",
        force=True,  # a forked worker inherits the supervisor's logging setup
    )
    worker = Worker(config, sock)
    code = _run(worker.run())
    logging.shutdown()
    os._exit(code)


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
    if config.start_method == "fork":
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
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            pr_set_pdeathsig = 1
            libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
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

    def frame_received(self, op: int, fields: list[bytes]) -> None:
        if op == Op.TASK and len(fields) == 3:
            self.worker.start_task(fields[0], fields[1].decode(), fields[2])
        elif op == Op.DRAIN:
            payload = decode_json(fields) if fields else {}
            self.worker.begin_drain(payload.get("timeout"))
        else:
            logger.warning("ignoring unexpected op %s from the supervisor", op)

    def connection_closed(self, exc: Exception | None) -> None:
        self.worker.supervisor_lost()


class Worker:
    """Runs the broker's tasks in this process until drained or orphaned."""

    def __init__(self, config: WorkerConfig, sock: socket.socket) -> None:
        self.config = config
        self.sock = sock
        self.pipe: WorkerPipe | None = None
        self.running: dict[bytes, asyncio.Task[None]] = {}
        self.stop = asyncio.Event()
        self.drain_timeout = config.shutdown_timeout
        self.started = False
        self.receiver: Any = None
        self.broker: Any = None
        self.results: Any = None
        self.consumer: Any = None
        self.idle = asyncio.Event()
        self.idle.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        _, self.pipe = await loop.connect_accepted_socket(lambda: WorkerPipe(self), self.sock)
        loop.add_signal_handler(signal.SIGTERM, self.begin_drain, None)
        try:
            await self._start()
        except Exception as exc:
            logger.error("worker startup failed:\n%s", traceback.format_exc())
            self.pipe.send_raw(
                encode_json(
                    Op.STARTUP_FAILED,
                    {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()},
                )
            )
            await self._flush()
            return EXIT_STARTUP_FAILED
        self.started = True
        self.pipe.send_raw(encode_json(Op.READY, {"pid": os.getpid()}))
        heartbeat = asyncio.create_task(self._heartbeat())
        if self.consumer is not None:
            await self.consumer.run(self.stop)
        await self.stop.wait()
        await self._drain()
        heartbeat.cancel()
        try:
            await self.broker.shutdown()
        except Exception:
            logger.exception("worker shutdown failed")
        self.pipe.send(Op.BYE)
        await self._flush()
        return EXIT_OK

    async def _start(self) -> None:
        from pool.app import load_broker
        from pool.consumer import Consumer
        from pool.pool_broker import PoolBroker
        from pool.pool_state import open_state
        from pool.receiver import Receiver
        from pool.rundir import RunDir
        from pool.worker_results import WorkerResultBackend

        broker = load_broker(self.config.app)
        broker.state = open_state(
            self.config.state_url,
            RunDir.at(self.config.run_dir),
            self.config.authkey,
            self.config.state_prefix,
        )
        broker.is_worker_process = True
        if isinstance(broker, PoolBroker) and broker.result_backend is broker.pool_results:
            self.results = WorkerResultBackend(broker)
            broker.pool_results = self.results
            broker.result_backend = self.results
        if isinstance(broker, PoolBroker):
            broker.run_dir = self.config.run_dir
        executor = ThreadPoolExecutor(self.config.sync_threads, thread_name_prefix="pool-sync")
        self.receiver = Receiver(broker, executor=executor)
        self.broker = broker
        if not isinstance(broker, PoolBroker):
            self.consumer = Consumer(
                broker, self.receiver, self.config.max_async_tasks, self._report
            )
        await broker.startup()

    def _report(self, task_name: str, failed: bool, duration: float) -> None:
        """A task from an external broker finished: tell the supervisor, for stats."""
        assert self.pipe is not None
        self.pipe.send(
            Op.COUNTED, task_name.encode(), bytes((int(failed),)), repr(duration).encode()
        )

    def start_task(self, delivery: bytes, task_id: str, data: bytes) -> None:
        """Run one delivery; ``delivery`` is the supervisor's id of this attempt."""
        if self.receiver is None:
            logger.error("task %s arrived before the worker was ready; dropped", task_id)
            return
        task = asyncio.create_task(self._execute(delivery, task_id, data))
        self.running[delivery] = task
        self.idle.clear()

    async def _execute(self, delivery: bytes, task_id: str, data: bytes) -> None:
        from pool.message import AckableMessage

        acked = False

        def ack() -> None:
            nonlocal acked
            acked = True

        started = time.perf_counter()
        failed = True
        try:
            result = await self.receiver.callback(AckableMessage(data=data, ack=ack))
            failed = result is not None and result.is_err
        except Exception:
            logger.exception("task %s crashed the receiver", task_id)
        finally:
            self.running.pop(delivery, None)
            if not self.running:
                self.idle.set()
        payload = self.results.pop(task_id) if self.results is not None else b""
        flags = (1 if failed else 0) | (0 if acked else 2)
        duration = time.perf_counter() - started
        assert self.pipe is not None
        self.pipe.send(
            Op.DONE, delivery, task_id.encode(), bytes((flags,)), payload, repr(duration).encode()
        )

    def begin_drain(self, timeout: float | None) -> None:
        if timeout is not None:
            self.drain_timeout = float(timeout)
        self.stop.set()

    async def _drain(self) -> None:
        """Let running tasks finish, up to the shutdown timeout; cancel the rest."""
        if self.consumer is not None:
            tasks, idle = list(self.consumer.running), self.consumer.idle
        else:
            tasks, idle = list(self.running.values()), self.idle
        if not tasks:
            return
        try:
            await asyncio.wait_for(idle.wait(), self.drain_timeout)
        except asyncio.TimeoutError:
            pending = [task for task in tasks if not task.done()]
            logger.warning(
                "shutdown timeout (%.1f s) passed: cancelling %d task(s); they are delivered again",
                self.drain_timeout,
                len(pending),
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def supervisor_lost(self) -> None:
        if self.stop.is_set() and not self.running:
            return
        logger.error("the supervisor is gone; exiting now")
        os._exit(EXIT_ORPHANED)

    async def _heartbeat(self) -> None:
        assert self.pipe is not None
        while True:
            await asyncio.sleep(self.config.heartbeat_interval)
            in_flight = len(self.consumer.running) if self.consumer else len(self.running)
            self.pipe.send(Op.HEARTBEAT, json.dumps({"in_flight": in_flight}).encode())

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
