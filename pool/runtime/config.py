"""The options of ``pool run``, written once: the CLI, the supervisor and workers read them."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass
class PoolConfig:
    """Options of ``pool run`` (see ``python -m pool run --help``); the one place of defaults."""

    app: str
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    task_modules: list[str] = field(default_factory=list)
    # taskiq's receiver, as ``taskiq worker`` sets it up
    max_async_tasks: int = 100
    max_prefetch: int = 0
    ack_type: str = "when_saved"
    sync_threads: int | None = None
    validate_params: bool = True
    propagate_errors: bool = True
    # pool's runtime
    shutdown_timeout: float = 30.0
    max_tasks_per_child: int | None = None
    max_memory_per_child: float | None = None
    autoscale: tuple[int, int] | None = None
    run_dir: str | None = None
    log_level: str = "INFO"
    log_format: str | None = None
    configure_logging: bool = True
    state_url: str | None = None
    state_prefix: str = "pool:state"
    start_method: str = "fork"
    queue_size: int = 10_000
    max_stored_results: int = 10_000
    max_task_failures: int = 3
    startup_attempts: int = 3
    kill_grace: float = 5.0
    heartbeat_interval: float = 1.0
    worker_timeout: float = 60.0
    autoscale_idle: float = 10.0
    autoscale_cooldown: float = 2.0
    metrics_port: int | None = None
    metrics_addr: str = "127.0.0.1"
    monitor_interval: float = 1.0
