"""Is the pool healthy? For container probes: ``python -m pool health`` and the metrics
port's ``/healthz`` and ``/readyz``.

- live (``/healthz``): the supervisor's event loop answers (within ``LOOP_TIMEOUT``).
- ready (``/readyz``, ``pool health``): live, not stopping, as many ready workers as its
  target (replaced ones excluded), and, for a PoolBroker, its queue not full (it accepts
  tasks). Otherwise the reason, e.g. "1 of 3 worker(s) ready; workers fail to start: ...".
"""

from __future__ import annotations

from typing import Any

LOOP_TIMEOUT = 2.0

EXIT_READY = 0
EXIT_NOT_READY = 1
EXIT_NO_POOL = 3


def readiness(stats: dict[str, Any]) -> tuple[bool, str]:
    """(ready, why) from the supervisor's stats (``stats --json``)."""
    target = stats["target_workers"]
    counted = [w for w in stats["workers"] if not w.get("recycling") and w["state"] != "draining"]
    ready = sum(1 for w in counted if w["state"] == "ready")
    summary = f"{ready} of {target} worker(s) ready"
    if stats.get("stopping"):
        return False, f"the pool is stopping ({summary})"
    if ready < target:
        errors = stats.get("startup_errors") or []
        if stats.get("failed_starts") and errors:
            summary += f"; workers fail to start: {errors[-1]}"
        return False, summary
    if stats.get("queue_full"):
        return False, f"{summary}; the queue is full ({stats['totals']['queued']} tasks wait)"
    return True, summary


def check(run_dir: str | None, timeout: float = 5.0) -> tuple[int, str]:
    """``python -m pool health``: (exit status, what to print)."""
    import asyncio

    from taskiq.exceptions import SendTaskError

    from pool.runtime.client import request

    try:
        reply = asyncio.run(request({"cmd": "stats"}, run_dir, timeout, connect_timeout=timeout))
    except SendTaskError as exc:
        return EXIT_NO_POOL, f"not ready: {exc}"
    except (OSError, ConnectionError, asyncio.TimeoutError) as exc:
        return EXIT_NO_POOL, f"not ready: the pool did not answer ({type(exc).__name__})"
    ok, why = readiness(reply["stats"])
    return (EXIT_READY, f"ready: {why}") if ok else (EXIT_NOT_READY, f"not ready: {why}")
