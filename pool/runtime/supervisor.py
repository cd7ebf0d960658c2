"""The supervisor: spawns and watches the worker processes, scales and recycles them.

The path of a ``PoolBroker`` task::

    producer  kiq ──Kick──▶  control socket (control.py, HMAC handshake)
                               │
                               ▼
                           TaskRouter (routing.py): queue, in-flight, redelivery
                               │ Task, over the worker's pipe
                               ▼
    worker (worker.py)   PoolBroker.listen() ──▶ taskiq Receiver.callback ──▶ the task
                               │ Done: the acknowledgement, the result, the outcome
                               ▼
                           ResultStore (results.py) ──Result──▶ the producer's wait_result

With any other broker, each worker consumes from it directly and tells the supervisor only
what finished (``Finished``), for stats and metrics. The supervisor's own job is the
workers: start them, watch their heartbeats, scale, recycle, drain and reap them. It never
blocks on one worker: every wait has a deadline and ends in SIGKILL.
"""

from __future__ import annotations

import asyncio
import enum
import gc
import logging
import os
import signal
import socket
import time
from collections import deque
from typing import TYPE_CHECKING, Any, cast

import psutil

from pool.runtime.config import PoolConfig
from pool.runtime.control import ControlConnection
from pool.runtime.events import EventHub, log_exit
from pool.runtime.health import HealthMonitor
from pool.runtime.journal import Journal, NullJournal
from pool.runtime.protocol import (
    Bye,
    Done,
    Drain,
    Finished,
    Frame,
    FrameError,
    FrameProtocol,
    Heartbeat,
    LateResult,
    Ready,
    Request,
    SaveProgress,
    StartupFailed,
)
from pool.runtime.results import ResultStore
from pool.runtime.routing import TaskRouter
from pool.runtime.rundir import RunDir
from pool.runtime.steering import Steering
from pool.runtime.taskqueue import Entry
from pool.runtime.worker import WorkerConfig, worker_main

if TYPE_CHECKING:
    from pool.ops.metrics import PoolMetrics
    from shared_state import StateServer

logger = logging.getLogger("pool.runtime.supervisor")

EXIT_OK = 0
EXIT_FORCED = 1
EXIT_STARTUP_FAILED = 3
EXIT_STATE_LOST = 5


def _is_loopback(addr: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return addr == "localhost"


class Phase(enum.Enum):
    """Where a worker is in its life; ``stats`` shows the first three names."""

    STARTING = "starting"  # spawned, WORKER_STARTUP not finished yet
    READY = "ready"  # takes tasks
    DRAINING = "draining"  # takes no new task; finishes its own, then exits
    EXITED = "exited"  # said goodbye: what it still held was never started
    GONE = "gone"  # its pipe closed (exited or died); being reaped


class WorkerHandle:
    """What the supervisor knows about one worker process."""

    def __init__(self, slot: int, process: Any) -> None:
        self.slot = slot
        self.process = process
        self.pid: int = process.pid
        self.pipe: SupervisorPipe | None = None
        self.phase = Phase.STARTING
        self.was_ready = False
        # Why this worker is being replaced (the replacement starts first), if it is.
        self.recycling: str | None = None
        self.started_at = time.monotonic()
        self.in_flight: dict[int, Entry] = {}
        # Running a suspect task alone (see routing): it takes no other task meanwhile.
        self.exclusive = False
        # deliveries the worker said it cancelled at its drain timeout (see ``Bye``)
        self.interrupted: set[int] = set()
        self.tasks_done = 0
        self.tasks_failed = 0
        self.last_heartbeat = time.monotonic()
        self.startup_error: str | None = None
        self.exited = asyncio.Event()
        self.ps: psutil.Process | None = None
        self.rss = 0
        self.cpu = 0.0
        self.idle_since = time.monotonic()
        # What the worker itself says it runs (it counts tasks from every broker).
        self.reported_in_flight = 0
        # ... as of its last heartbeat (not lowered as tasks finish: autoscale's view)
        self.heartbeat_in_flight = 0
        # Why the pool killed it to stop a task (steering): not a crash, nobody blamed.
        self.stopped_by: str | None = None
        # why it is draining, or why the supervisor killed it (for the log and the events)
        self.drain_reason: str | None = None
        self.killed: str | None = None

    @property
    def state(self) -> str:
        """The name ``stats`` shows: starting, ready or draining."""
        if self.phase in (Phase.EXITED, Phase.GONE):
            return Phase.DRAINING.value
        return self.phase.value

    @property
    def gone(self) -> bool:
        return self.phase is Phase.GONE

    @property
    def takes_tasks(self) -> bool:
        return self.phase is Phase.READY

    def read_rss(self) -> int:
        """The worker's resident memory now (0 when it cannot be read)."""
        try:
            if self.ps is None:
                self.ps = psutil.Process(self.pid)
                self.ps.cpu_percent(None)
            self.rss = self.ps.memory_info().rss
        except (psutil.Error, OSError):
            pass
        return self.rss

    def sample_usage(self) -> None:
        """Refresh RSS and CPU percent (since the previous sample) with psutil."""
        self.read_rss()
        try:
            if self.ps is not None:
                self.cpu = self.ps.cpu_percent(None)
        except (psutil.Error, OSError):
            pass

    @property
    def busy(self) -> int:
        """Tasks this worker runs now, whoever handed them out."""
        return max(len(self.in_flight), self.reported_in_flight)

    @property
    def counts_toward_target(self) -> bool:
        return self.phase in (Phase.STARTING, Phase.READY) and not self.recycling


class SupervisorPipe(FrameProtocol):
    """The supervisor's end of one worker's pipe."""

    coalesce_writes = True

    def __init__(self, supervisor: Supervisor, handle: WorkerHandle) -> None:
        super().__init__()
        self.supervisor = supervisor
        self.handle = handle

    @property
    def peer(self) -> str:
        return f"worker {self.handle.slot} (pid {self.handle.pid})"

    def frame_received(self, frame: Frame) -> None:
        handle, sup = self.handle, self.supervisor
        if isinstance(frame, Done):
            sup.on_done(handle, frame)
        elif isinstance(frame, Finished):
            sup.on_finished(handle, frame)
        elif isinstance(frame, Heartbeat):
            handle.last_heartbeat = time.monotonic()
            handle.reported_in_flight = handle.heartbeat_in_flight = frame.in_flight
        elif isinstance(frame, LateResult):
            sup.on_late_result(frame)
        elif isinstance(frame, SaveProgress):
            sup.results.save_progress(frame.task_id, frame.progress)
        elif isinstance(frame, Ready):
            sup.on_ready(handle)
        elif isinstance(frame, StartupFailed):
            handle.startup_error = frame.error
        elif isinstance(frame, Bye):
            handle.phase = Phase.EXITED
            handle.interrupted = set(frame.interrupted)
        elif isinstance(frame, Request):
            sup.events.from_worker(handle, frame.body)
        else:
            raise FrameError(f"unexpected {type(frame).__name__} frame")

    def connection_closed(self, exc: Exception | None) -> None:
        self.supervisor.on_worker_gone(self.handle)


class Supervisor:
    """Runs the pool until a signal (or a fatal startup failure) stops it."""

    def __init__(
        self,
        config: PoolConfig,
        broker: Any,
        run_dir: RunDir,
        authkey: bytes,
        context: Any,
    ) -> None:
        self.config = config
        self.broker = broker
        self.run_dir = run_dir
        self.authkey = authkey
        self.context = context
        self.started_at = time.monotonic()
        self.target = config.workers
        self.workers: dict[int, WorkerHandle] = {}
        self.results = ResultStore(config.max_stored_results)
        self.router = TaskRouter(
            config.queue_size, config.max_async_tasks, config.max_task_failures, self._give_up
        )
        self.router.wake = self.dispatch
        self.steering = Steering(self)
        self.router.dispatched = self.steering.dispatched
        self.router.queue.aging = getattr(broker, "priority_aging", self.router.queue.aging)
        self.connections: set[ControlConnection] = set()
        self.journal = (Journal if config.journal else NullJournal)(run_dir.spool_file)
        # Kick frames taken from each producer connection, and those not yet confirmed
        self.accepted: dict[ControlConnection, int] = {}
        self.unconfirmed: set[ControlConnection] = set()
        self._commit_scheduled = False
        self._journal_retry = False
        self._dispatch_scheduled = False
        self.slot_restarts: dict[int, int] = {}
        self.retired = {"tasks_done": 0, "tasks_failed": 0}
        self.ever_ready = False
        self.failed_starts = 0
        self.recent_startup_errors: deque[str] = deque(maxlen=3)
        self.backoff_until = 0.0
        self.reconcile_timer: asyncio.TimerHandle | None = None
        self.fatal_error: str | None = None
        # the embedded state server (None with --state): its death stops the pool
        self.state_server: StateServer | None = None
        self.state_lost: str | None = None
        self.stopping = False
        self.forced = False
        self.stop_requested = asyncio.Event()
        self.changed = asyncio.Event()
        self.background: set[asyncio.Task[Any]] = set()
        self.server: asyncio.AbstractServer | None = None
        self.health = HealthMonitor(self)
        self.events = EventHub(self)
        from pool.extensions.pool_broker import PoolBroker

        # the embedded broker: tasks queue here, so the queue's length is known
        self.embedded = isinstance(broker, PoolBroker)
        if config.autoscale is not None:
            low, high = config.autoscale
            self.target = min(max(self.target, low), high)
        self.metrics: PoolMetrics | None = None
        self.metrics_url: str | None = None
        self.dashboard: Any = None  # pool.ops.dashboard.Dashboard, with --dashboard-port
        self.dashboard_url: str | None = None

    @property
    def queue(self) -> Any:
        return self.router.queue

    # ----------------------------------------------------------------- main
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_unix_server(
            lambda: ControlConnection(self), path=str(self.run_dir.control_socket)
        )
        os.chmod(self.run_dir.control_socket, 0o600)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop, sig)
        from pool.runtime.signals import count_signals

        count_signals(
            loop,
            {signal.SIGTTIN: lambda: self.scale_by(1), signal.SIGTTOU: lambda: self.scale_by(-1)},
        )
        loop.add_signal_handler(signal.SIGHUP, self.rolling_restart)
        if self.state_server is not None:
            loop.add_reader(self.state_server.sentinel, self._state_server_ended)
        if self.config.metrics_port is not None:
            from pool.ops.metrics import PoolMetrics

            self.metrics = PoolMetrics(self.stats)
            addr = self.config.metrics_addr
            token = None if _is_loopback(addr) else self.run_dir.new_metrics_token()
            port = self.metrics.serve(self.config.metrics_port, addr, token, loop)
            self.metrics_url = f"http://{self.config.metrics_addr}:{port}/metrics"
            logger.info("metrics on %s", self.metrics_url)
        if self.config.dashboard_port is not None:
            from pool.ops.dashboard import serve

            self.dashboard = await serve(
                self, self.config.dashboard_addr, self.config.dashboard_port
            )
        owed, results = self.journal.replay()
        for task_id, payload in results.items():
            self.results.store(task_id, payload, None)
        if owed:
            logger.info("resuming %d task(s) the previous run accepted", len(owed))
            for entry in owed:
                self.router.enqueue(entry)
        self.journal.open(owed, self.results.results)
        logger.info(
            "pool started: %d worker(s), app %s, run dir %s (pid %d)",
            self.target,
            self.config.app,
            self.run_dir.path,
            os.getpid(),
        )
        self.reconcile()
        self.spawn_task(self.health.run())
        await self.stop_requested.wait()
        return await self.shutdown()

    def _state_server_ended(self) -> None:
        """The shared state is gone with its server: no worker can start or share state
        any more, so the pool stops loudly (a supervisor above it restarts it whole)."""
        assert self.state_server is not None
        asyncio.get_running_loop().remove_reader(self.state_server.sentinel)
        if self.stopping:
            return
        code = self.state_server.exit_status()
        killed = code is not None and code < 0
        how = f"was killed by signal {-code}" if killed else f"exited ({code})"  # type: ignore[operator]
        self.state_lost = (
            f"the shared state server (pid {self.state_server.pid}) {how}: the shared state "
            f"is lost; stopping the pool (exit status {EXIT_STATE_LOST}); tasks not yet run "
            "stay in the journal for the next run"
        )
        logger.critical("%s", self.state_lost)
        self.request_stop()

    def request_stop(self, sig: int | None = None) -> None:
        if self.stopping:
            if not self.forced:
                logger.warning("second stop signal: stopping now")
                self.forced = True
                self.kill_all()
            return
        name = signal.Signals(sig).name if sig else "request"
        logger.info("%s: graceful shutdown (send it again to stop at once)", name)
        self.stopping = True
        self.stop_requested.set()

    def spawn_task(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self.background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self.background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("background task failed", exc_info=task.exception())

    # ----------------------------------------------------------------- workers
    def reconcile(self) -> None:
        """Bring the number of workers that count toward the target to the target.

        Missing workers are started (after the crash backoff, if one is running); extra
        ones are drained, those still starting first, then the least busy. Workers being
        recycled drain once enough replacements are ready.
        """
        if self.stopping:
            return
        counted = [h for h in self.workers.values() if h.counts_toward_target]
        missing = self.target - len(counted)
        if missing > 0:
            now = time.monotonic()
            if now < self.backoff_until:
                self._reconcile_at(self.backoff_until)
            else:
                for _ in range(missing):
                    self.spawn()
        elif missing < 0:
            extras = sorted(
                counted, key=lambda h: (h.state == "ready", len(h.in_flight), -h.started_at)
            )
            for handle in extras[:-missing]:
                self.retire(handle, "scaling down")
        self._drain_recycled(counted)

    def _reconcile_at(self, when: float) -> None:
        if self.reconcile_timer is not None:
            self.reconcile_timer.cancel()
        loop = asyncio.get_running_loop()
        delay = max(0.0, when - time.monotonic())
        self.reconcile_timer = loop.call_later(delay, self._timer_reconcile)

    def _timer_reconcile(self) -> None:
        self.reconcile_timer = None
        self.reconcile()

    def _drain_recycled(self, counted: list[WorkerHandle]) -> None:
        """Drain recycled workers as their replacements become ready, oldest first."""
        recycled = sorted(
            (h for h in self.workers.values() if h.recycling and h.takes_tasks),
            key=lambda h: h.started_at,
        )
        ready = sum(1 for h in counted if h.state == "ready")
        for left, handle in zip(range(len(recycled), 0, -1), recycled, strict=True):
            if ready + left - 1 < self.target:
                break
            self.retire(handle, handle.recycling or "recycled")

    def spawn(self) -> WorkerHandle | None:
        """Start a worker in the lowest free slot; its pipe is then watched from the loop."""
        if self.stopping:
            return None
        slot = 0
        while slot in self.workers:
            slot += 1
        parent_conn, child_conn = self.context.Pipe(duplex=True)
        config = WorkerConfig(
            pool=self.config,
            worker_id=slot,
            run_dir=str(self.run_dir.path),
            authkey=self.authkey,
            supervisor_pid=os.getpid(),
            close_fds=[*self._inherited_fds(), parent_conn.fileno()],
        )
        process = self.context.Process(
            target=worker_main, args=(config, child_conn), name=f"pool-worker-{slot}"
        )
        # A forked worker shares the supervisor's memory until it writes to it; the
        # collector writes to every object it tracks, so what exists now is kept out of
        # its sight (gc.freeze), in both processes.
        gc.freeze()
        process.start()
        child_conn.close()
        sock = socket.socket(fileno=os.dup(parent_conn.fileno()))
        parent_conn.close()
        handle = WorkerHandle(slot, process)
        self.workers[slot] = handle
        self.spawn_task(self._attach(handle, sock))
        logger.info("worker %d starting (pid %d)", slot, handle.pid)
        self.changed.set()
        return handle

    async def _attach(self, handle: WorkerHandle, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        _, handle.pipe = await loop.connect_accepted_socket(
            lambda: SupervisorPipe(self, handle), sock
        )
        if handle.phase is Phase.DRAINING:  # retired before its pipe was watched
            self._send_drain(handle)

    def _inherited_fds(self) -> list[int]:
        """Our sockets a forked child must close, so that EOFs still reach the right peers."""
        fds: list[int] = []
        if self.server is not None:
            fds.extend(s.fileno() for s in cast(asyncio.Server, self.server).sockets)
        protocols: list[FrameProtocol] = [*self.connections]
        protocols.extend(h.pipe for h in self.workers.values() if h.pipe is not None)
        for proto in protocols:
            sock = proto.transport.get_extra_info("socket") if proto.transport else None
            if sock is not None:
                fds.append(sock.fileno())
        if self.metrics is not None and self.metrics._server is not None:
            fds.append(self.metrics._server.fileno())
        if self.dashboard is not None:
            fds.extend(self.dashboard.fds())
        return [fd for fd in fds if fd >= 0]

    def on_ready(self, handle: WorkerHandle) -> None:
        handle.was_ready = True
        handle.last_heartbeat = handle.idle_since = time.monotonic()
        self.ever_ready = True
        self.failed_starts = 0
        logger.info("worker %d ready (pid %d)", handle.slot, handle.pid)
        self.events.worker_up(handle)
        if handle.phase is Phase.STARTING:
            handle.phase = Phase.READY
            if self.stopping:
                self.retire(handle, "the pool is stopping")
        self.changed.set()
        self.reconcile()
        self.dispatch()

    def retire(self, handle: WorkerHandle, reason: str) -> None:
        """Drain a worker: no new tasks, in-flight ones finish, WORKER_SHUTDOWN, exit."""
        if handle.phase not in (Phase.STARTING, Phase.READY):
            return
        handle.phase = Phase.DRAINING
        handle.drain_reason = reason
        logger.debug("worker %d (pid %d) drains: %s", handle.slot, handle.pid, reason)
        self._send_drain(handle)
        self.changed.set()

    def recycle(self, handle: WorkerHandle, reason: str) -> None:
        """Replace a worker gracefully: the replacement starts first, then this one drains."""
        if handle.recycling or not handle.takes_tasks:
            return
        logger.info("worker %d (pid %d) is replaced: %s", handle.slot, handle.pid, reason)
        handle.recycling = reason
        self.reconcile()

    def rolling_restart(self) -> None:
        """SIGHUP: load the code again, then replace every worker, replacement first."""
        if self.stopping:
            return
        from pool.runtime.reload import reload_app

        try:
            broker = reload_app(self.config.app, self.config.task_modules)
        except Exception:
            logger.exception("SIGHUP: the app failed to import; keeping the running workers")
            return
        broker.state = self.broker.state
        self.broker = broker
        old = [h for h in self.workers.values() if h.counts_toward_target]
        logger.info("SIGHUP: code reloaded; replacing %d worker(s)", len(old))
        for handle in old:
            if handle.phase is Phase.STARTING:
                self.retire(handle, "rolling restart")
            else:
                handle.recycling = "rolling restart"
        self.reconcile()

    def on_worker_gone(self, handle: WorkerHandle) -> None:
        """The pipe closed: the worker exited or is about to. Requeue what it held."""
        if handle.gone:
            return
        crashed = handle.phase is not Phase.EXITED and handle.stopped_by is None
        retiring = handle.phase in (Phase.DRAINING, Phase.EXITED)
        handle.phase = Phase.GONE
        self.router.take_back(handle, crashed)
        self.retired["tasks_done"] += handle.tasks_done
        self.retired["tasks_failed"] += handle.tasks_failed
        handle.tasks_done = handle.tasks_failed = 0
        if not handle.was_ready and not self.stopping:
            self.failed_starts += 1
            reason = handle.startup_error or "it exited before it was ready"
            self.recent_startup_errors.append(reason)
            logger.error("worker %d failed to start: %s", handle.slot, reason)
            self.backoff_until = time.monotonic() + min(
                0.5 * 2 ** max(self.failed_starts - 1, 0), 30.0
            )
            if not self.ever_ready and self.failed_starts >= self.config.startup_attempts:
                self.fatal_error = reason
                logger.critical(
                    "%d worker start(s) failed and none was ever ready: %s",
                    self.failed_starts,
                    reason,
                )
                self.stop_requested.set()
                self.stopping = True
        elif crashed and not self.stopping and not retiring:
            if handle.killed is None:  # else the supervisor said why it killed it
                logger.error("worker %d (pid %d) died unexpectedly", handle.slot, handle.pid)
            self.slot_restarts[handle.slot] = self.slot_restarts.get(handle.slot, 0) + 1
            self.backoff_until = max(self.backoff_until, time.monotonic() + 0.05)
        self.spawn_task(self._reap(handle))
        self.dispatch()

    async def _reap(self, handle: WorkerHandle) -> None:
        """Wait for the process to end (SIGKILL after a grace period), then rebalance."""
        deadline = time.monotonic() + self.config.kill_grace
        while handle.process.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if handle.process.is_alive():
            logger.warning("worker %d (pid %d) did not exit; killing it", handle.slot, handle.pid)
            handle.killed = "it did not exit"
            handle.process.kill()
            await asyncio.get_running_loop().run_in_executor(None, handle.process.join, 5)
        handle.process.join(0)
        self.events.worker_gone(handle, log_exit(handle))
        handle.exited.set()
        if self.workers.get(handle.slot) is handle:
            del self.workers[handle.slot]
        self.changed.set()
        self.reconcile()

    def _send_drain(self, handle: WorkerHandle) -> None:
        if handle.pipe is not None:
            handle.pipe.send(Drain(self.config.wait_tasks_timeout))

    def kill_all(self) -> None:
        for handle in list(self.workers.values()):
            if handle.process.is_alive():
                handle.process.kill()

    # ----------------------------------------------------------------- scaling
    def scale_by(self, delta: int) -> None:
        self.set_target(max(0, self.target + delta))

    def set_target(self, count: int, log: bool = True) -> None:
        if self.stopping:
            return
        if log:
            logger.info("scaling from %d to %d worker(s)", self.target, count)
            if count == 0:
                logger.warning(
                    "0 workers: no task runs until the pool is scaled up again "
                    "(`python -m pool scale N` or SIGTTIN); tasks sent meanwhile wait"
                )
        self.target = count
        self.reconcile()
        self.changed.set()

    async def wait_for_target(self, timeout: float) -> tuple[bool, str]:
        deadline = time.monotonic() + timeout
        while True:
            counted = [h for h in self.workers.values() if h.counts_toward_target]
            ready = sum(1 for h in counted if h.state == "ready")
            if ready == self.target and len(counted) == self.target:
                return True, ""
            if self.stopping:
                return False, self.fatal_error or "the pool is stopping"
            failing = self.failed_starts >= self.config.startup_attempts
            remaining = deadline - time.monotonic()
            if remaining <= 0 or failing:
                errors = {h.startup_error for h in self.workers.values() if h.startup_error}
                errors.update(self.recent_startup_errors)
                why = f"{ready} of {self.target} worker(s) ready"
                why += f" after {timeout:g} s" if remaining <= 0 else ""
                if errors:
                    why += f"; workers fail to start: {'; '.join(sorted(errors))}"
                return False, why
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), min(remaining, 0.5))
            except asyncio.TimeoutError:
                pass

    # ----------------------------------------------------------------- tasks
    def enqueue(self, entry: Entry) -> None:
        """A producer's task: into the journal and the queue (once: a task a producer sends
        again after a reconnection is already here, or already done)."""
        conn = entry.producer
        if conn is not None:
            self.accepted[conn] = self.accepted.get(conn, 0) + 1
            self.unconfirmed.add(conn)
        try:
            self._accept(entry)
        finally:
            # scheduled after the dispatch, so a lone task's frame leaves before the journal
            # is written: a crash in between runs it again, as any crash before the journal
            # does (its producer is told only after the journal, and sends it again)
            if conn is not None:
                self._schedule_commit()

    def _accept(self, entry: Entry) -> None:
        if self.steering.joined(entry):  # already here, done, or a duplicate
            return
        self.events.task_received(entry.task_id, entry.task_name)
        if self.broker.find_task(entry.task_name) is None:
            from pool.extensions.errors import TaskNotFoundError

            logger.warning("task %r (%s) is not registered", entry.task_name, entry.task_id)
            reason = f"task {entry.task_name!r} is not registered in {self.config.app}"
            self._store_error(entry, TaskNotFoundError(reason=reason, task_name=entry.task_name))
            return
        self.steering.declare(entry)  # the limits the app declares for it
        self.journal.accept(entry)
        was_empty = not self.router.queue
        self.router.enqueue(entry)
        if was_empty and not self._dispatch_scheduled:
            self._dispatch_now()  # a lone task leaves at once; a burst waits for the turn's end
        else:
            self.dispatch()

    def _schedule_commit(self) -> None:
        if not self._commit_scheduled:
            self._commit_scheduled = True
            asyncio.get_running_loop().call_soon(self.commit)

    def commit(self) -> None:
        """End of a turn: write the journal, then tell producers what is now safe with us.

        While the journal cannot be written, no producer is read and none is told: each
        keeps its tasks and sends them again once it reconnects."""
        self._commit_scheduled = False
        live, results = self.router.live.values(), self.results.results
        if not self.journal.flush() and not self.journal.rewrite(live, results, True):
            self.router.frozen = True
            for conn in list(self.connections):
                self.router.hold_back(conn)
            if not self._journal_retry:  # try again while nothing else happens
                self._journal_retry = True
                asyncio.get_running_loop().call_later(0.25, self._retry_journal)
            return
        if self.router.frozen:
            self.router.frozen = False
            self.dispatch()
        for conn in self.unconfirmed:
            conn.confirm(self.accepted.get(conn, 0))
        self.unconfirmed.clear()
        if self.journal.wants_rewrite:
            self.journal.rewrite(live, results, True)

    def _retry_journal(self) -> None:
        self._journal_retry = False
        self._schedule_commit()

    def hold_back(self, conn: ControlConnection) -> None:
        self.router.hold_back(conn)

    def dispatch(self) -> None:
        """Hand out queued tasks once this turn of the event loop is over (frames that
        arrive together are answered together)."""
        if not self._dispatch_scheduled:
            self._dispatch_scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch_now)

    def _dispatch_now(self) -> None:
        self._dispatch_scheduled = False
        if self.stopping:
            return
        self.router.dispatch(h for h in self.workers.values() if h.takes_tasks and not h.recycling)

    def _give_up(self, entry: Entry, reason: str) -> None:
        """A task that killed (or outlived the stop of) too many workers gets an error
        result instead of another delivery."""
        from pool.extensions.errors import WorkerCrashedError

        self._store_error(
            entry,
            WorkerCrashedError(
                reason=f"task {entry.task_name!r} ({entry.task_id}) was delivered {entry.failures} "
                f"times and each time its worker died or did not acknowledge it ({reason})"
            ),
        )

    def _store_error(self, entry: Entry, error: BaseException) -> None:
        from taskiq import TaskiqResult

        from pool.extensions import model_json

        result: TaskiqResult[Any] = TaskiqResult(
            is_err=True, return_value=None, execution_time=0.0, error=error
        )
        payload = model_json.dump(result, self.broker.serializer)
        self.results.store(entry.task_id, payload, entry.producer)
        self.journal.settle(entry.task_id, payload)
        self._schedule_commit()

    def on_done(self, handle: WorkerHandle, frame: Done) -> None:
        """A worker acknowledged a delivery, with the task's result when it had one."""
        entry = self.router.acknowledge(handle, frame.delivery)
        if self.steering.done(entry, frame):  # cancelled: its producer was answered
            self.dispatch()
            return
        # the result leaves before the journal is written (both at the end of this turn):
        # a crash in between runs the task again, as any crash before the journal does
        if frame.result:
            self.results.store(frame.task_id, frame.result, entry.producer if entry else None)
        elif entry is not None and entry.producer is not None:
            # acknowledged before its result (--ack-type when_received): it follows later
            self.results.subscribe(frame.task_id, entry.producer)
        if entry is not None:
            self.journal.settle(entry.task_id, frame.result)
            self._schedule_commit()
        if not handle.in_flight:
            handle.idle_since = time.monotonic()
        if frame.outcome:
            name = entry.task_name if entry is not None else "unknown"
            duration = frame.duration_us / 1e6
            self.count_finished(handle, name, frame.outcome == 2, duration)
            if frame.outcome == 1:  # a failure's event comes from the worker, with its traceback
                task_id = entry.task_id if entry is not None else frame.task_id
                self.events.task_succeeded(handle, task_id, name, duration)
        if entry is not None and entry.retry is not None:
            self.steering.followed(entry)
        self.dispatch()

    def on_late_result(self, frame: LateResult) -> None:
        """A result saved after its message was acknowledged (``--ack-type when_received``)."""
        self.results.store(frame.task_id, frame.result, None)
        self.journal.settle(frame.task_id, frame.result)
        self._schedule_commit()

    def on_finished(self, handle: WorkerHandle, frame: Finished) -> None:
        """A task ran to its end in a worker (one from an external broker, or acknowledged
        before it ended)."""
        self.count_finished(handle, frame.task_name, frame.failed, frame.duration_us / 1e6)

    def count_finished(
        self, handle: WorkerHandle, task_name: str, failed: bool, duration: float
    ) -> None:
        if handle.reported_in_flight > 0:
            handle.reported_in_flight -= 1
        if not handle.busy:
            handle.idle_since = time.monotonic()
        handle.tasks_done += 1
        if failed:
            handle.tasks_failed += 1
        if self.metrics is not None:
            self.metrics.observe(task_name, failed, duration)
        limit = self.config.max_tasks_per_child
        if limit and handle.tasks_done >= limit and not handle.recycling:
            self.recycle(handle, f"it ran {handle.tasks_done} task(s) (--max-tasks-per-child)")

    def forget(self, conn: ControlConnection) -> None:
        self.connections.discard(conn)
        self.events.forget(conn)
        self.router.forget(conn)
        self.accepted.pop(conn, None)
        self.unconfirmed.discard(conn)

    # ----------------------------------------------------------------- control
    def stats(self) -> dict[str, Any]:
        """SPEC section 6, plus throughput and the metrics address."""
        from pool.ops.stats import collect_stats

        return collect_stats(self)

    # ----------------------------------------------------------------- shutdown
    async def shutdown(self) -> int:
        self.stopping = True
        for handle in list(self.workers.values()):
            self.retire(handle, "the pool is stopping")
        config = self.config
        deadline = (
            time.monotonic()
            + config.wait_tasks_timeout
            + config.shutdown_timeout
            + config.kill_grace
        )
        while self.workers and not self.forced and time.monotonic() < deadline:
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), 0.25)
            except asyncio.TimeoutError:
                pass
        if self.workers:
            logger.error(
                "%d worker(s) did not stop in time; killing them (exit status 1)",
                len(self.workers),
            )
            self.forced = True
            self.kill_all()
        pending = [h.exited.wait() for h in list(self.workers.values())]
        if pending:
            await asyncio.wait_for(asyncio.gather(*pending), self.config.kill_grace + 10)
        self.journal.flush()
        leftovers = self.router.drain_queue()
        if not self.journal.rewrite(leftovers, self.results.results):
            self.forced = True  # exit non-zero: the log says which tasks stay where
        self.journal.close()
        if leftovers:
            logger.info(
                "%d unstarted task(s) kept in %s for the next run",
                len(leftovers),
                self.run_dir.spool_file,
            )
        if self.server is not None:
            self.server.close()
        for conn in list(self.connections):
            conn.close()
        for task in list(self.background):
            task.cancel()
        if self.state_lost is not None:
            return EXIT_STATE_LOST
        if self.fatal_error is not None:
            return EXIT_STARTUP_FAILED
        return EXIT_FORCED if self.forced else EXIT_OK
