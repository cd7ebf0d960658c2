"""``pool run``: prepare the run directory and the shared state, then run the supervisor."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any

from pool.runtime.app import AppImportError, load_broker
from pool.runtime.config import PoolConfig
from pool.runtime.rundir import RunDir
from pool.runtime.supervisor import Supervisor

logger = logging.getLogger("pool.run")

EXIT_USAGE = 2
EXIT_UNREACHABLE = 4


def run_event_loop(coro: Any) -> Any:
    """Run ``coro`` on uvloop (plain asyncio where uvloop is missing)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def configure_logging(level: str, who: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s [{who} %(process)d] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def run_pool(config: PoolConfig) -> int:
    """Run a pool until it is stopped; returns the process exit status."""
    import multiprocess

    from pool.runtime.state import open_state
    from shared_state import StateServer, start_state_server

    configure_logging(config.log_level, "supervisor")
    run_dir = RunDir.at(config.run_dir)
    try:
        run_dir.create()
    except (OSError, ValueError) as exc:
        logger.error("cannot use run directory %s: %s", run_dir.path, exc)
        return EXIT_USAGE
    other = run_dir.running_pid()
    if other is not None and other != os.getpid():
        logger.error("a pool is already running in %s (pid %d)", run_dir.path, other)
        return EXIT_USAGE
    try:
        broker = load_broker(config.app, config.task_modules)
    except AppImportError as exc:
        logger.error("%s", exc)
        return EXIT_USAGE
    problem = _unreachable(broker, config.state_url, config.state_prefix)
    if problem is not None:
        print(f"pool: {problem}", file=sys.stderr)
        logger.error("%s", problem)
        return EXIT_UNREACHABLE
    authkey = run_dir.new_authkey()
    run_dir.write_pid()
    context = multiprocess.get_context(config.start_method)
    server: StateServer | None = None
    if not config.state_url:
        server = start_state_server(str(run_dir.state_socket), authkey, str(run_dir.state_versions))
    try:
        broker.state = open_state(config.state_url, run_dir, authkey, config.state_prefix)
        supervisor = Supervisor(config, broker, run_dir, authkey, context)
        code = int(run_event_loop(supervisor.run()))
        if supervisor.fatal_error:
            print(
                f"pool: no worker could start: {supervisor.fatal_error}",
                file=sys.stderr,
            )
        logger.info("pool stopped (exit status %d)", code)
        return code
    finally:
        if server is not None:
            server.shutdown()
        run_dir.cleanup()


def _unreachable(broker: Any, state_url: str | None, prefix: str) -> str | None:
    """Why the broker or the state cannot be reached, or ``None`` when both answer."""
    check = getattr(broker, "check_connection", None)
    if check is not None:
        try:
            run_event_loop(check())
        except Exception as exc:
            return f"cannot reach the broker: {exc}"
    if state_url:
        from pool.runtime.state import open_state

        try:
            open_state(state_url, RunDir.at(None), b"", prefix).get_value("pool:reachable")
        except Exception as exc:
            return f"cannot reach the shared state at {state_url}: {exc}"
    return None
