"""The supervisor: owns the queue, spawns and watches workers, routes results, answers stats.

It never blocks on one worker: every wait has a deadline and ends in SIGKILL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import psutil

from pool import spool
from pool.control import ControlConnection
from pool.exceptions import WorkerCrashedError
from pool.health import HealthMonitor
from pool.pool_stats import collect_stats
from pool.protocol import FrameError, FrameProtocol, Op, decode_json, encode, encode_json
from pool.result import TaskiqResult
from pool.rundir import RunDir
from pool.spool import Entry, TaskQueue
from pool.worker import WorkerConfig, worker_main

if TYPE_CHECKING:
    from pool.metrics import PoolMetrics

logger = logging.getLogger("pool.supervisor")

EXIT_OK = 0
EXIT_FORCED = 1
EXIT_STARTUP_FAILED = 3


@dataclass
class PoolConfig:
    """Options of ``pool run`` (see ``python -m pool run --help``)."""

    app: str
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_async_tasks: int = 100
    sync_threads: int = 8
    shutdown_timeout: float = 30.0
    max_tasks_per_child: int | None = None
    max_memory_per_child: float | None = None
    autoscale: tuple[int, int] | None = None
    run_dir: str | None = None
    log_level: str = "INFO"
    state_url: str | None = None
    state_prefix: str = "pool:state"
    start_method: str = "fork"
    queue_size: int = 10_000
    max_stored_results: int = 10_000
    max_task_failures: int = 3
    startup_attempts: int = 3
    kill_grace: float = 5.0
    worker_timeout: float = 60.0
    autoscale_idle: float = 10.0
    autoscale_cooldown: float = 2.0
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    monitor_interval: float = 1.0


def _is_loopback(addr: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return addr == "localhost"


class WorkerHandle:
    """What the supervisor knows about one worker process."""

    def __init__(self, slot: int, process: Any) -> None:
        self.slot = slot
        self.process = process
        self.pid: int = process.pid
        self.pipe: SupervisorPipe | None = None
        self.state = "starting"
        self.started_at = time.monotonic()
        self.in_flight: dict[int, Entry] = {}
        self.tasks_done = 0
        self.tasks_failed = 0
        self.last_heartbeat = time.monotonic()
        self.retiring = False
        # Why this worker is being replaced (replacement first, then it drains), if it is.
        self.recycling: str | None = None
        self.said_bye = False
        self.gone = False
        self.startup_error: str | None = None
        self.exited = asyncio.Event()
        self.ps: psutil.Process | None = None
        self.rss = 0
        self.cpu = 0.0
        self.idle_since = time.monotonic()
        # What the worker itself says it runs (tasks it took from an external broker).
        self.reported_in_flight = 0

    def sample_usage(self) -> None:
        """Refresh RSS and CPU percent (since the previous sample) with psutil."""
        try:
            if self.ps is None:
                self.ps = psutil.Process(self.pid)
                self.ps.cpu_percent(None)
            self.rss = self.ps.memory_info().rss
            self.cpu = self.ps.cpu_percent(None)
        except (psutil.Error, OSError):
            pass

    @property
    def busy(self) -> int:
        """Tasks this worker runs now, whoever handed them out."""
        return max(len(self.in_flight), self.reported_in_flight)

    @property
    def counts_toward_target(self) -> bool:
        return not (self.retiring or self.recycling or self.gone)


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

    def frame_received(self, op: int, fields: list[bytes]) -> None:
        handle, sup = self.handle, self.supervisor
        if op == Op.DONE and len(fields) == 5:
            sup.on_done(
                handle,
                int(fields[0]),
                fields[1].decode(),
                fields[2][0],
                fields[3],
                float(fields[4]),
            )
        elif op == Op.HEARTBEAT:
            handle.last_heartbeat = time.monotonic()
            report = decode_json(fields) if fields else {}
            if isinstance(report, dict):
                handle.reported_in_flight = int(report.get("in_flight") or 0)
        elif op == Op.COUNTED and len(fields) == 3:
            sup.on_counted(handle, fields[0].decode(), bool(fields[1][0]), float(fields[2]))
        elif op == Op.READY:
            sup.on_ready(handle)
        elif op == Op.STARTUP_FAILED:
            handle.startup_error = str(decode_json(fields).get("error"))
        elif op == Op.BYE:
            handle.said_bye = True
        else:
            raise FrameError(f"unexpected op {op}")

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
        self.queue = TaskQueue(config.queue_size)
        self.results: OrderedDict[str, bytes] = OrderedDict()
        self.subscribers: dict[str, set[ControlConnection]] = {}
        self.connections: set[ControlConnection] = set()
        self.held_back: set[ControlConnection] = set()
        self.next_delivery = 0
        self.rotation = 0
        self.slot_restarts: dict[int, int] = {}
        self.retired = {"tasks_done": 0, "tasks_failed": 0}
        self.ever_ready = False
        self.failed_starts = 0
        self.recent_startup_errors: deque[str] = deque(maxlen=3)
        self.backoff_until = 0.0
        self.reconcile_timer: asyncio.TimerHandle | None = None
        self.fatal_error: str | None = None
        self.stopping = False
        self.forced = False
        self.stop_requested = asyncio.Event()
        self.changed = asyncio.Event()
        self.background: set[asyncio.Task[Any]] = set()
        self.server: asyncio.AbstractServer | None = None
        self.health = HealthMonitor(self)
        if config.autoscale is not None:
            low, high = config.autoscale
            self.target = min(max(self.target, low), high)
        self.metrics: PoolMetrics | None = None
        self.metrics_url: str | None = None

    # ----------------------------------------------------------------- main
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_unix_server(
            lambda: ControlConnection(self), path=str(self.run_dir.control_socket)
        )
        os.chmod(self.run_dir.control_socket, 0o600)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop, sig)
        loop.add_signal_handler(signal.SIGTTIN, self.scale_by, 1)
        loop.add_signal_handler(signal.SIGTTOU, self.scale_by, -1)
        loop.add_signal_handler(signal.SIGHUP, self.rolling_restart)
        if self.config.metrics_port is not None:
            from pool.metrics import PoolMetrics

            self.metrics = PoolMetrics(self.stats)
            addr = self.config.metrics_addr
            token = None if _is_loopback(addr) else self.run_dir.new_metrics_token()
            port = self.metrics.serve(self.config.metrics_port, addr, token)
            self.metrics_url = f"http://{self.config.metrics_addr}:{port}/metrics"
            logger.info("metrics on %s", self.metrics_url)
        spooled = spool.load(self.run_dir.spool_file)
        if spooled:
            logger.info("resuming %d task(s) left by the previous run", len(spooled))
            for entry in spooled:
                self.queue.put(entry)
            spool.save(self.run_dir.spool_file, [])
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
            (h for h in self.workers.values() if h.recycling and not h.retiring and not h.gone),
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
            app=self.config.app,
            worker_id=slot,
            run_dir=str(self.run_dir.path),
            authkey=self.authkey,
            supervisor_pid=os.getpid(),
            start_method=self.config.start_method,
            max_async_tasks=self.config.max_async_tasks,
            sync_threads=self.config.sync_threads,
            shutdown_timeout=self.config.shutdown_timeout,
            log_level=self.config.log_level,
            state_url=self.config.state_url,
            state_prefix=self.config.state_prefix,
            close_fds=[*self._inherited_fds(), parent_conn.fileno()],
        )
        process = self.context.Process(
            target=worker_main, args=(config, child_conn), name=f"pool-worker-{slot}"
        )
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
        return [fd for fd in fds if fd >= 0]

    def on_ready(self, handle: WorkerHandle) -> None:
        handle.state = "draining" if handle.retiring else "ready"
        handle.last_heartbeat = handle.idle_since = time.monotonic()
        self.ever_ready = True
        self.failed_starts = 0
        logger.info("worker %d ready (pid %d)", handle.slot, handle.pid)
        if self.stopping or handle.retiring:
            self._send_drain(handle)
        self.changed.set()
        self.reconcile()
        self.dispatch()

    def retire(self, handle: WorkerHandle, reason: str) -> None:
        """Drain a worker: no new tasks, in-flight ones finish, WORKER_SHUTDOWN, exit."""
        if handle.retiring or handle.gone:
            return
        handle.retiring = True
        logger.info("worker %d (pid %d) drains: %s", handle.slot, handle.pid, reason)
        if handle.state == "ready":
            handle.state = "draining"
            self._send_drain(handle)
        self.changed.set()

    def recycle(self, handle: WorkerHandle, reason: str) -> None:
        """Replace a worker gracefully: the replacement starts first, then this one drains."""
        if handle.recycling or handle.retiring or handle.gone:
            return
        logger.info("worker %d (pid %d) is replaced: %s", handle.slot, handle.pid, reason)
        handle.recycling = reason
        self.reconcile()

    def rolling_restart(self) -> None:
        """SIGHUP: load the code again, then replace every worker, replacement first."""
        if self.stopping:
            return
        from pool.reload import reload_app

        try:
            broker = reload_app(self.config.app)
        except Exception:
            logger.exception("SIGHUP: the app failed to import; keeping the running workers")
            return
        broker.state = self.broker.state
        self.broker = broker
        old = [h for h in self.workers.values() if h.counts_toward_target]
        logger.info("SIGHUP: code reloaded; replacing %d worker(s)", len(old))
        for handle in old:
            handle.recycling = "rolling restart"
        self.reconcile()

    def on_worker_gone(self, handle: WorkerHandle) -> None:
        """The pipe closed: the worker exited or is about to. Requeue what it held."""
        if handle.gone:
            return
        handle.gone = True
        lost = list(handle.in_flight.values())
        handle.in_flight.clear()
        crashed = not handle.said_bye
        if lost and crashed:
            logger.warning(
                "worker %d (pid %d) died with %d task(s) in flight; delivering them again: %s",
                handle.slot,
                handle.pid,
                len(lost),
                ", ".join(f"{e.task_name} ({e.task_id})" for e in lost[:5])
                + (", ..." if len(lost) > 5 else ""),
            )
        for entry in lost:
            if crashed:
                self.redeliver(entry, f"worker {handle.slot} (pid {handle.pid}) died", log=False)
            else:
                self.queue.put_front(entry)  # cancelled by the shutdown timeout
        self.retired["tasks_done"] += handle.tasks_done
        self.retired["tasks_failed"] += handle.tasks_failed
        handle.tasks_done = handle.tasks_failed = 0
        never_ready = handle.state == "starting"
        if never_ready and not self.stopping:
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
        elif crashed and not self.stopping and not handle.retiring:
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
            handle.process.kill()
            await asyncio.get_running_loop().run_in_executor(None, handle.process.join, 5)
        handle.process.join(0)
        handle.exited.set()
        if self.workers.get(handle.slot) is handle:
            del self.workers[handle.slot]
        self.changed.set()
        self.reconcile()

    def _send_drain(self, handle: WorkerHandle) -> None:
        if handle.pipe is not None:
            handle.pipe.send_raw(encode_json(Op.DRAIN, {"timeout": self.config.shutdown_timeout}))

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
        self.queue.put(entry)
        self.dispatch()

    def hold_back(self, conn: ControlConnection) -> None:
        """Stop reading from a producer while the queue is full: its ``kiq`` waits."""
        if conn not in self.held_back:
            self.held_back.add(conn)
            conn.pause()

    def redeliver(self, entry: Entry, reason: str, log: bool = True) -> None:
        entry.failures += 1
        if entry.failures >= self.config.max_task_failures:
            logger.error(
                "task %s (%s) failed %d deliveries (%s); giving up with an error result",
                entry.task_id,
                entry.task_name,
                entry.failures,
                reason,
            )
            error = WorkerCrashedError(
                f"task {entry.task_name!r} ({entry.task_id}) was delivered {entry.failures} "
                f"times and each time its worker died or did not acknowledge it ({reason})"
            )
            result: TaskiqResult[Any] = TaskiqResult(is_err=True, error=error)
            self.store_result(
                entry.task_id, self.broker.serializer.dumpb(result.to_dict()), entry.producer
            )
            return
        if log:
            logger.warning("redelivering task %s (%s): %s", entry.task_id, entry.task_name, reason)
        self.queue.put_front(entry)

    def dispatch(self) -> None:
        """Hand queued tasks to ready workers, least busy first, up to their capacity."""
        if self.stopping or not self.queue:
            return
        ready = [h for h in self.workers.values() if h.state == "ready" and h.counts_toward_target]
        if not ready:
            return
        self.rotation = (self.rotation + 1) % len(ready)  # ties go round-robin
        ready = ready[self.rotation :] + ready[: self.rotation]
        capacity = self.config.max_async_tasks
        frames: dict[WorkerHandle, list[bytes]] = {}
        queue = self.queue
        while queue:
            handle = min(ready, key=lambda h: len(h.in_flight))
            if len(handle.in_flight) >= capacity:
                break
            entry = queue.pop()
            self.next_delivery += 1
            handle.in_flight[self.next_delivery] = entry
            frames.setdefault(handle, []).append(
                encode(
                    Op.TASK, str(self.next_delivery).encode(), entry.task_id.encode(), entry.payload
                )
            )
        for handle, batch in frames.items():
            if handle.pipe is not None:
                handle.pipe.send_raw(b"".join(batch))
        if self.held_back and len(queue) < self.queue.limit * 0.9:
            for conn in self.held_back:
                conn.resume()
            self.held_back.clear()

    def on_done(
        self,
        handle: WorkerHandle,
        delivery: int,
        task_id: str,
        flags: int,
        payload: bytes,
        duration: float,
    ) -> None:
        entry = handle.in_flight.pop(delivery, None)
        if not handle.in_flight:
            handle.idle_since = time.monotonic()
        if flags & 2:
            if entry is not None:
                self.redeliver(entry, "its result could not be saved")
            self.dispatch()
            return
        self.count_finished(
            handle, entry.task_name if entry else "unknown", bool(flags & 1), duration
        )
        if payload:
            self.store_result(task_id, payload, entry.producer if entry is not None else None)
        self.dispatch()

    def on_counted(
        self, handle: WorkerHandle, task_name: str, failed: bool, duration: float
    ) -> None:
        """A task the worker took from an external broker (Redis) finished."""
        if handle.reported_in_flight > 0:
            handle.reported_in_flight -= 1
        if not handle.busy:
            handle.idle_since = time.monotonic()
        self.count_finished(handle, task_name, failed, duration)

    def count_finished(
        self, handle: WorkerHandle, task_name: str, failed: bool, duration: float
    ) -> None:
        handle.tasks_done += 1
        if failed:
            handle.tasks_failed += 1
        if self.metrics is not None:
            self.metrics.observe(task_name, failed, duration)
        limit = self.config.max_tasks_per_child
        if limit and handle.tasks_done >= limit and not handle.recycling:
            self.recycle(handle, f"it ran {handle.tasks_done} task(s) (--max-tasks-per-child)")

    def store_result(self, task_id: str, payload: bytes, producer: Any) -> None:
        results = self.results
        results[task_id] = payload
        results.move_to_end(task_id)
        while len(results) > self.config.max_stored_results:
            results.popitem(last=False)
        targets = self.subscribers.pop(task_id, set())
        if producer is not None:
            targets.add(producer)
        if targets:
            frame = encode(Op.RESULT, task_id.encode(), payload)
            for conn in targets:
                conn.subscriptions.discard(task_id)
                conn.send_raw(frame)

    def subscribe(self, task_id: str, conn: ControlConnection) -> None:
        payload = self.results.get(task_id)
        if payload is not None:
            conn.send(Op.RESULT, task_id.encode(), payload)
            return
        self.subscribers.setdefault(task_id, set()).add(conn)
        conn.subscriptions.add(task_id)

    def forget(self, conn: ControlConnection) -> None:
        self.connections.discard(conn)
        self.held_back.discard(conn)
        for task_id in conn.subscriptions:
            waiting = self.subscribers.get(task_id)
            if waiting is not None:
                waiting.discard(conn)
                if not waiting:
                    del self.subscribers[task_id]
        conn.subscriptions.clear()

    # ----------------------------------------------------------------- control
    def stats(self) -> dict[str, Any]:
        """SPEC section 6, plus throughput and the metrics address."""
        return collect_stats(self)

    # ----------------------------------------------------------------- shutdown
    async def shutdown(self) -> int:
        self.stopping = True
        for handle in list(self.workers.values()):
            handle.state = "draining"
            self._send_drain(handle)
        deadline = time.monotonic() + self.config.shutdown_timeout + self.config.kill_grace
        while self.workers and not self.forced and time.monotonic() < deadline:
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), 0.25)
            except asyncio.TimeoutError:
                pass
        if self.workers:
            self.kill_all()
        pending = [h.exited.wait() for h in list(self.workers.values())]
        if pending:
            await asyncio.wait_for(asyncio.gather(*pending), self.config.kill_grace + 10)
        leftovers: list[Entry] = []
        while self.queue:
            leftovers.append(self.queue.pop())
        spool.save(self.run_dir.spool_file, leftovers)
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
        if self.fatal_error is not None:
            return EXIT_STARTUP_FAILED
        return EXIT_FORCED if self.forced else EXIT_OK
