"""``pool run``: check the app and the services, prepare the run directory and the shared
state, then run the supervisor (and the ``--reload`` watcher).

Nothing here opens a connection to the broker in the supervisor process: workers are
forked from it, and a connection opened before the fork would be shared by all of them.
Whether the broker answers is checked in a short-lived child process instead (``probe``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections import defaultdict
from typing import Any

from pool.runtime.app import AppImportError, load_app, load_receiver
from pool.runtime.config import PoolConfig
from pool.runtime.rundir import RunDir
from pool.runtime.supervisor import Supervisor

logger = logging.getLogger("pool.run")

EXIT_USAGE = 2
EXIT_UNREACHABLE = 4

# The name of the log handler pool installs: workers change its format, and nothing else.
POOL_HANDLER = "pool"


def run_event_loop(coro: Any) -> Any:
    """Run ``coro`` on uvloop (plain asyncio where uvloop is missing)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def log_format(config: PoolConfig, who: str) -> str:
    """``--log-format`` as given, else pool's, which names the process (``who``)."""
    if config.log_format:
        return config.log_format
    return f"%(asctime)s [{who} %(process)d] %(levelname)s %(name)s: %(message)s"


def configure_logging(config: PoolConfig, who: str) -> None:
    """One stderr handler on the root logger, unless ``--no-configure-logging``.

    As in taskiq's worker, the levels of pool's and taskiq's loggers follow ``--log-level``
    either way; with ``--no-configure-logging`` the app's handlers are all there is.
    """
    level = logging.getLevelName(config.log_level.upper())
    for name in ("pool", "taskiq"):
        logging.getLogger(name).setLevel(level)
    if not config.configure_logging:
        return
    root = logging.getLogger()
    if any(h.get_name() == POOL_HANDLER for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(POOL_HANDLER)
    handler.setFormatter(logging.Formatter(log_format(config, who)))
    root.addHandler(handler)
    root.setLevel(level)


def run_pool(config: PoolConfig) -> int:
    """Run a pool until it is stopped; returns the process exit status."""
    configure_logging(config, "supervisor")
    problem = metrics_problem(config)
    if problem is not None:
        return _fail(problem, EXIT_USAGE)
    run_dir = RunDir.at(config.run_dir)
    try:
        run_dir.create()
    except (OSError, ValueError) as exc:
        return _fail(f"cannot use run directory {run_dir.path}: {exc}", EXIT_USAGE)
    other = run_dir.running_pid()
    if other is not None and other != os.getpid():
        return _fail(f"a pool is already running in {run_dir.path} (pid {other})", EXIT_USAGE)
    try:
        broker = load_app(config)
        load_receiver(config)
    except AppImportError as exc:
        return _fail_import(exc, config)
    if config.reload:
        problem = reload_problem()
        if problem is not None:
            return _fail(problem, EXIT_USAGE)
    problem = probe(config, broker)
    if problem is not None:
        return _fail(problem, EXIT_UNREACHABLE)
    return _supervise(config, broker, run_dir)


def _supervise(config: PoolConfig, broker: Any, run_dir: RunDir) -> int:
    import multiprocess

    from pool.runtime.state import open_state
    from shared_state import StateServer, start_state_server

    authkey = run_dir.new_authkey()
    run_dir.write_pid()
    context = multiprocess.get_context(config.start_method)
    server: StateServer | None = None
    if not config.state_url:
        server = start_state_server(str(run_dir.state_socket), authkey, str(run_dir.state_versions))
    try:
        broker.state = open_state(config.state_url, run_dir, authkey, config.state_prefix)
        supervisor = Supervisor(config, broker, run_dir, authkey, context)
        supervisor.state_server = server
        code = int(run_event_loop(_run_supervisor(supervisor, config, run_dir)))
        if supervisor.state_lost:
            print(f"pool: {supervisor.state_lost}", file=sys.stderr)
        elif supervisor.fatal_error:
            print(f"pool: no worker could start: {supervisor.fatal_error}", file=sys.stderr)
        logger.info("pool stopped (exit status %d)", code)
        return code
    finally:
        if server is not None:
            server.shutdown()
        run_dir.cleanup()


async def _run_supervisor(supervisor: Supervisor, config: PoolConfig, run_dir: RunDir) -> int:
    """The supervisor's run, with the ``--reload`` watcher beside it."""
    if not config.reload:
        return await supervisor.run()
    from pool.runtime.watch import watch_for_changes

    dirs = config.reload_dirs or [os.getcwd()]
    watcher = asyncio.create_task(
        watch_for_changes(dirs, supervisor.rolling_restart, config.use_gitignore, [run_dir.path])
    )
    try:
        return await supervisor.run()
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


def _fail(message: str, code: int) -> int:
    print(f"pool run: {message}", file=sys.stderr)
    return code


def _fail_import(exc: AppImportError, config: PoolConfig) -> int:
    if config.log_level.upper() == "DEBUG" and exc.detail:
        print(exc.detail, file=sys.stderr, end="")
        return _fail(str(exc), EXIT_USAGE)
    hint = " (--log-level DEBUG shows the traceback)" if exc.detail else ""
    return _fail(f"{exc}{hint}", EXIT_USAGE)


def reload_problem() -> str | None:
    try:
        import watchfiles  # noqa: F401
    except ImportError:
        return "--reload needs watchfiles: pip install 'taskiq-pool[reload]'"
    return None


def metrics_problem(config: PoolConfig) -> str | None:
    """Why ``--metrics-port`` cannot be served, or ``None`` (0 asks for any free port)."""
    port = config.metrics_port
    if port is None or port == 0:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            sock.bind((config.metrics_addr, port))
        except OSError as exc:
            reason = exc.strerror or str(exc)
            return (
                f"--metrics-port {port}: cannot listen on {config.metrics_addr}:{port} "
                f"({reason}); choose another port, or 0 for any free one"
            )
    return None


# ----------------------------------------------------------------- is the broker there?
def probe(config: PoolConfig, broker: Any) -> str | None:
    """Why the broker (or the ``--state`` store) cannot be reached, or ``None``.

    Runs in a child process that starts the broker as a client (no event handler and no
    middleware of the app runs) and pings the Redis pools it holds, so that no connection
    exists in the supervisor when it forks its workers. The embedded brokers need no check.
    """
    import multiprocess
    from taskiq import InMemoryBroker

    from pool.extensions.pool_broker import PoolBroker

    embedded = isinstance(broker, (PoolBroker, InMemoryBroker))
    if embedded and not config.state_url:
        return None
    context = multiprocess.get_context(config.start_method)
    parent, child = context.Pipe(duplex=False)
    process = context.Process(target=_probe_main, args=(config, child), name="pool-probe")
    process.start()
    child.close()
    try:
        if not parent.poll(config.probe_timeout + 5):
            return f"the broker check got no answer in {config.probe_timeout:g} s"
        answer: str | None = parent.recv()
        return answer
    except EOFError:
        return "the broker check died before it answered"
    finally:
        parent.close()
        if process.is_alive():
            process.kill()
        process.join(5)


def _probe_main(config: PoolConfig, conn: Any) -> None:
    """Child process: answer ``None`` or the reason the services cannot be reached."""
    errors = _ErrorRecords()
    root = logging.getLogger()
    root.handlers[:] = [errors]  # the check's logs would only repeat what it answers
    try:
        answer = run_event_loop(_check_services(config, errors))
    except BaseException as exc:
        answer = f"the broker check failed: {type(exc).__name__}: {exc}"
    conn.send(answer)
    conn.close()
    os._exit(0)


class _ErrorRecords(logging.Handler):
    """Keeps the first error a library logs while it retries a connection."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.first: logging.LogRecord | None = None
        self.seen = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.first is None:
            self.first = record
            self.seen.set()

    def describe(self) -> str:
        record = self.first
        if record is None:
            return ""
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            return f"{type(exc).__name__}: {exc} (logged by {record.name})"
        return f"{record.getMessage()} (logged by {record.name})"


# How long a broker whose client logged an error may still take to connect after all.
RETRY_GRACE = 3.0


async def _check_services(config: PoolConfig, errors: _ErrorRecords) -> str | None:
    from taskiq import InMemoryBroker

    from pool.extensions.pool_broker import PoolBroker

    broker = load_app(config)  # forked: the supervisor's, already imported
    if not isinstance(broker, (PoolBroker, InMemoryBroker)):
        problem = await _reach_broker(broker, config.probe_timeout, errors)
        if problem is not None:
            return f"cannot reach the broker ({type(broker).__name__}{_address(broker)}): {problem}"
    if config.state_url:
        from pool.runtime.state import open_state

        try:
            open_state(config.state_url, RunDir.at(None), b"", config.state_prefix).get_value(
                "pool:reachable"
            )
        except Exception as exc:
            return f"cannot reach the shared state at {config.state_url}: {exc}"
    return None


async def _reach_broker(broker: Any, timeout: float, errors: _ErrorRecords) -> str | None:
    """None once the broker started, else why not: its error, or the first error its client
    logged while it kept retrying (NATS retries for minutes, aio-pika for ever)."""
    opening = asyncio.ensure_future(_open_broker(broker))
    logged = asyncio.ensure_future(errors.seen.wait())
    try:
        done, _ = await asyncio.wait(
            [opening, logged], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        if logged in done and opening not in done:
            done, _ = await asyncio.wait([opening], timeout=RETRY_GRACE)
        if opening in done:
            exc = opening.exception()
            return None if exc is None else f"{type(exc).__name__}: {exc}"
        if errors.first is not None:
            return errors.describe()
        return f"no answer in {timeout:g} s"
    finally:
        logged.cancel()
        opening.cancel()


def _address(broker: Any) -> str:
    """`` at URL`` of the broker, its password masked, when it keeps one where taskiq's
    brokers do (``url``, ``servers``)."""
    from urllib.parse import urlsplit

    for name in ("url", "servers"):
        value = getattr(broker, name, None)
        urls = [value] if isinstance(value, str) else value
        if isinstance(urls, (list, tuple)) and urls and all(isinstance(u, str) for u in urls):
            shown = []
            for url in urls:
                parts = urlsplit(url)
                if parts.password:
                    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
                    url = parts._replace(netloc=netloc).geturl()
                shown.append(url)
            return f" at {', '.join(shown)}"
    return ""


async def _open_broker(broker: Any) -> None:
    """Start ``broker`` as a producer would, minus the app's handlers; ping its Redis pools."""
    broker.event_handlers = defaultdict(list)
    broker.middlewares = []
    broker.is_worker_process = False
    check = getattr(broker, "check_connection", None)
    if check is not None:
        await check()
    await broker.startup()
    try:
        await _ping_redis(broker, broker.result_backend)
    finally:
        await broker.shutdown()


async def _ping_redis(*owners: Any) -> None:
    """taskiq-redis opens no connection at startup: ping each of its connection pools."""
    if "redis" not in sys.modules:
        return
    from redis.asyncio import ConnectionPool, Redis

    for owner in owners:
        for value in list(vars(owner).values()):
            if isinstance(value, ConnectionPool):
                async with Redis(connection_pool=value) as client:
                    await client.ping()
