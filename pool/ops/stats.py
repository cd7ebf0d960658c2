"""What ``python -m pool stats`` reports: the supervisor's view of its workers and totals."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pool.runtime.supervisor import Supervisor


def collect_stats(sup: Supervisor) -> dict[str, Any]:
    """SPEC section 6 (``stats --json``), plus throughput and the metrics address."""
    now = time.monotonic()
    rows: list[dict[str, Any]] = []
    for slot, handle in sorted(sup.workers.items()):
        if handle.gone:
            continue
        rows.append(
            {
                "id": slot,
                "pid": handle.pid,
                "state": handle.state,
                "uptime_s": round(now - handle.started_at, 3),
                "tasks_done": handle.tasks_done,
                "tasks_failed": handle.tasks_failed,
                "in_flight": handle.busy,
                "rss_bytes": handle.rss,
                "cpu_percent": handle.cpu,
                "restarts": sup.slot_restarts.get(slot, 0),
                "heartbeat_age_s": round(now - handle.last_heartbeat, 3),
                "recycling": handle.recycling,
            }
        )
    return {
        "pid": os.getpid(),
        "uptime_s": round(now - sup.started_at, 3),
        "target_workers": sup.target,
        "run_dir": str(sup.run_dir.path),
        "workers": rows,
        "totals": {
            "tasks_done": sup.retired["tasks_done"] + sum(r["tasks_done"] for r in rows),
            "tasks_failed": sup.retired["tasks_failed"] + sum(r["tasks_failed"] for r in rows),
            "in_flight": sum(r["in_flight"] for r in rows),
            "queued": len(sup.queue),
            "restarts": sum(sup.slot_restarts.values()),
        },
        "state": {"keys": sup.health.state_keys},
        "throughput": {
            "last_10s": sup.health.throughput(10),
            "last_1m": sup.health.throughput(60),
        },
        "autoscale": list(sup.config.autoscale) if sup.config.autoscale else None,
        # for ``pool health`` and /readyz (pool.ops.health)
        "stopping": sup.stopping,
        "queue_full": bool(sup.queue.full),
        "failed_starts": sup.failed_starts,
        "startup_errors": list(sup.recent_startup_errors),
        "event_subscribers": len(sup.events.subscribers),
        # tasks whose result a producer asked for and that have none yet
        "results_awaited": len(sup.results.subscribers),
        "dashboard_url": sup.dashboard_url,
        "metrics_url": sup.metrics_url,
    }
