"""The options of ``pool run``, written once: the CLI, the supervisor and workers read them.

The CLI takes every default from here (``default_of``), so a default is never written twice.
Options named like ``taskiq worker``'s have taskiq's meaning; where pool maps one onto its own
runtime the comment says how.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

TASKIQ_RECEIVER = "taskiq.receiver:Receiver"
TASKIQ_TASKS_PATTERN = "**/tasks.py"


@dataclass
class PoolConfig:
    """Options of ``pool run`` (see ``python -m pool run --help``); the one place of defaults."""

    app: str
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    # finding the app and its tasks, as ``taskiq worker`` does
    task_modules: list[str] = field(default_factory=list)
    app_dir: str | None = None
    fs_discover: bool = False
    tasks_patterns: list[str] = field(default_factory=lambda: [TASKIQ_TASKS_PATTERN])
    # taskiq's receiver, as ``taskiq worker`` sets it up
    receiver: str = TASKIQ_RECEIVER
    receiver_args: dict[str, str] = field(default_factory=dict)
    max_async_tasks: int = 100
    max_async_tasks_jitter: int = 0
    max_prefetch: int = 0
    ack_type: str = "when_saved"
    sync_threads: int | None = None  # --max-threadpool-threads
    validate_params: bool = True  # --no-parse sets it False
    propagate_errors: bool = True  # --no-propagate-errors sets it False
    # How long a stopping worker lets its running tasks finish (taskiq's
    # --wait-tasks-timeout); what is still running then is cancelled and delivered again.
    # taskiq waits forever by default; a pool never waits forever on a worker.
    wait_tasks_timeout: float = 30.0
    # How long a stopping worker's ``broker.shutdown()`` (WORKER_SHUTDOWN handlers included)
    # may take (taskiq's --shutdown-timeout, same default).
    shutdown_timeout: float = 5.0
    # --reload: a changed file in these directories (default: the current one) triggers the
    # rolling restart SIGHUP does; files ignored by .gitignore do not, unless use_gitignore
    # is False (--do-not-use-gitignore)
    reload: bool = False
    reload_dirs: list[str] = field(default_factory=list)
    use_gitignore: bool = True
    # logging (--no-configure-logging: pool leaves the app's logging alone)
    log_level: str = "INFO"
    log_format: str | None = None  # None: pool's own, which names the process
    configure_logging: bool = True
    # pool's runtime
    max_tasks_per_child: int | None = None
    max_memory_per_child: float | None = None
    autoscale: tuple[int, int] | None = None
    run_dir: str | None = None
    state_url: str | None = None
    state_prefix: str = "pool:state"
    start_method: str = "fork"
    queue_size: int = 10_000
    # PoolBroker: accepted tasks are journaled in the run directory before kiq returns
    journal: bool = True
    max_stored_results: int = 10_000
    max_task_failures: int = 3
    startup_attempts: int = 3
    # a worker whose WORKER_STARTUP handlers did not finish in this time is a failed start
    startup_timeout: float = 60.0
    kill_grace: float = 5.0
    # how long the check that the broker answers, before any worker starts, may take
    probe_timeout: float = 20.0
    heartbeat_interval: float = 1.0
    worker_timeout: float = 60.0
    autoscale_idle: float = 10.0
    autoscale_cooldown: float = 2.0
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    # the dashboard (pool.ops.dashboard): loopback unless told; beyond it, the metrics token
    dashboard_port: int | None = None
    dashboard_addr: str = "127.0.0.1"
    monitor_interval: float = 1.0


_FIELDS = {f.name: f for f in dataclasses.fields(PoolConfig)}


def default_of(name: str) -> Any:
    """The default of option ``name`` (a fresh one for a list or a dict)."""
    spec = _FIELDS[name]
    if spec.default_factory is not dataclasses.MISSING:
        return spec.default_factory()
    if spec.default is dataclasses.MISSING:
        raise KeyError(f"{name} has no default")
    return spec.default
