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


class HealthMonitor:
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        config = supervisor.config
        self.done_history: deque[tuple[float, int]] = deque(maxlen=130)
        self.autoscaler: Autoscaler | None = None
        if config.autoscale is not None:
            low, high = config.autoscale
            self.autoscaler = Autoscaler(
                low, high, config.autoscale_idle, config.autoscale_cooldown
            )

    async def run(self) -> None:
        sup = self.supervisor
        while not sup.stopping:
            now = time.monotonic()
            for handle in list(sup.workers.values()):
                if handle.gone:
                    continue
                handle.sample_usage()
                self.check(handle, now)
            self.done_history.append((now, self.total_done()))
            if self.autoscaler is not None:
                self.autoscale(now)
            await asyncio.sleep(sup.config.monitor_interval)

    def check(self, handle: WorkerHandle, now: float) -> None:
        """Recycle a worker grown past its memory limit; kill one whose loop is stuck or
        whose start-up never ends."""
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
        limit_mb = sup.config.max_memory_per_child
        if limit_mb and handle.state == "ready" and handle.rss > limit_mb * 1024 * 1024:
            sup.recycle(handle, f"RSS {handle.rss / 2**20:.0f} MiB > {limit_mb:g} MiB")
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
