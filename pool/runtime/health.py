"""The supervisor's once-a-second round: worker usage, recycling limits, hung workers,
throughput and autoscaling. Kept apart from the supervisor, which owns the workers and
acts on what this finds."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING

from pool.runtime.autoscale import Autoscaler, Observation

if TYPE_CHECKING:
    from pool.runtime.supervisor import Supervisor, WorkerHandle

logger = logging.getLogger("pool.runtime.supervisor")

# --max-memory-per-child is checked this often (a reading costs a few µs per worker): a
# worker can allocate hundreds of MB in a second, so the once-a-second round is too slow.
MEMORY_CHECK_INTERVAL = 0.05
# a worker past this many times its limit is killed rather than let drain
MEMORY_KILL_FACTOR = 2.0


class HealthMonitor:
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        config = supervisor.config
        self.done_history: deque[tuple[float, int]] = deque(maxlen=130)
        self.autoscaler: Autoscaler | None = None
        # the shared state's key count for stats, read off the loop (-1: not known yet)
        self.state_keys = -1
        self._counting: asyncio.Future[int] | None = None
        if config.autoscale is not None:
            low, high = config.autoscale
            self.autoscaler = Autoscaler(
                low, high, config.autoscale_idle, config.autoscale_cooldown
            )

    async def run(self) -> None:
        sup = self.supervisor
        if sup.config.max_memory_per_child:
            sup.spawn_task(self.watch_memory(sup.config.max_memory_per_child * 2**20))
        while not sup.stopping:
            now = time.monotonic()
            for handle in list(sup.workers.values()):
                if handle.gone:
                    continue
                handle.sample_usage()
                self.check(handle, now)
            self.done_history.append((now, self.total_done()))
            self.count_state_keys()
            if self.autoscaler is not None:
                self.autoscale(now)
            await asyncio.sleep(sup.config.monitor_interval)

    def check(self, handle: WorkerHandle, now: float) -> None:
        """Kill a worker whose loop is stuck or whose start-up never ends."""
        sup = self.supervisor
        limit = sup.config.startup_timeout
        if handle.state == "starting" and now - handle.started_at > limit:
            handle.startup_error = f"WORKER_STARTUP did not finish in {limit:g} s"
            logger.error(
                "worker %d (pid %d): %s; killing it", handle.slot, handle.pid, handle.startup_error
            )
            handle.started_at = now  # once: the kill below ends it
            handle.killed = handle.startup_error
            handle.process.kill()
            return
        silent = now - handle.last_heartbeat
        if handle.state in ("ready", "draining") and silent > sup.config.worker_timeout:
            running = (
                ", ".join(f"{e.task_name} ({e.task_id})" for e in handle.in_flight.values())
                or "no task"
            )
            logger.error(
                "worker %d (pid %d) sent no heartbeat for %.1f s (running: %s); killing it",
                handle.slot,
                handle.pid,
                silent,
                running,
            )
            handle.last_heartbeat = now  # once: the kill below ends it
            handle.killed = f"no heartbeat for {silent:.1f} s"
            handle.process.kill()

    async def watch_memory(self, limit: float) -> None:
        """Past its limit a worker is replaced gracefully (its tasks finish); past twice
        the limit it is killed, as a task that grows without bound would never finish."""
        sup = self.supervisor
        while not sup.stopping:
            for handle in list(sup.workers.values()):
                if handle.gone or handle.state == "starting":
                    continue
                rss = handle.read_rss()
                why = f"RSS {rss / 2**20:.0f} MiB > {limit / 2**20:g} MiB"
                if rss > limit * MEMORY_KILL_FACTOR and not handle.killed:
                    logger.error(
                        "worker %d (pid %d): %s, %g times the limit; killing it",
                        handle.slot,
                        handle.pid,
                        why,
                        MEMORY_KILL_FACTOR,
                    )
                    handle.killed = f"{why}, {MEMORY_KILL_FACTOR:g} times the limit"
                    handle.process.kill()
                elif rss > limit and handle.state == "ready":
                    sup.recycle(handle, why)
            await asyncio.sleep(MEMORY_CHECK_INTERVAL)

    def count_state_keys(self) -> None:
        """Ask the state store for its size in a thread, so that a slow or dead state
        server never freezes the supervisor's loop (``pool stats`` shows the last count)."""
        if self._counting is not None and not self._counting.done():
            return
        state = self.supervisor.broker.state
        self._counting = asyncio.get_running_loop().run_in_executor(None, len, state)
        self._counting.add_done_callback(self._counted)

    async def fresh_state_keys(self, timeout: float = 0.5) -> None:
        """Count the keys now for a ``stats`` reply, waiting at most ``timeout`` (a frozen
        state server leaves the last count, and the reply is not held up longer)."""
        self.count_state_keys()
        assert self._counting is not None
        await asyncio.wait({self._counting}, timeout=timeout)

    def _counted(self, future: asyncio.Future[int]) -> None:
        if future.cancelled() or future.exception() is not None:
            self.state_keys = -1
        else:
            self.state_keys = future.result()

    def autoscale(self, now: float) -> None:
        assert self.autoscaler is not None
        sup = self.supervisor
        ready = [h for h in sup.workers.values() if h.counts_toward_target and h.state == "ready"]
        idle = [now - h.idle_since for h in ready if not h.busy]
        capacity = sup.config.max_async_tasks
        decision = self.autoscaler.decide(
            Observation(
                now=now,
                target=sup.target,
                queued=len(sup.queue) if sup.embedded else None,
                busy_workers=sum(1 for h in ready if h.busy),
                ready_workers=len(ready),
                longest_idle_s=max(idle, default=0.0),
                full_workers=sum(
                    1
                    for h in ready
                    if max(h.busy, h.heartbeat_in_flight) >= capacity or h.cpu >= 90.0
                ),
            )
        )
        if decision is not None:
            target, why = decision
            logger.info("autoscale: %d -> %d worker(s): %s", sup.target, target, why)
            sup.set_target(target, log=False)

    def total_done(self) -> int:
        sup = self.supervisor
        return sup.retired["tasks_done"] + sum(h.tasks_done for h in sup.workers.values())

    def throughput(self, window: float) -> float:
        """Tasks finished per second over the last ``window`` seconds (or since the start)."""
        if not self.done_history:
            return 0.0
        now, done = time.monotonic(), self.total_done()
        for when, then_done in self.done_history:
            if now - when <= window + 0.5:
                elapsed = now - when
                return (done - then_done) / elapsed if elapsed > 0 else 0.0
        return 0.0
