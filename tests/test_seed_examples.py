"""The examples of the seed page (events and state), with ``pool`` in place of ``taskiq``.

Each example's code is the page's, changed only in its import line; the database, cache and
``asyncpg`` clients it creates are the stand-ins below.
"""

from __future__ import annotations

import logging
import sys
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest

from pool import EventHandler, InMemoryBroker, TaskiqEvents, TaskiqState
from pool.exceptions import EventHandlerError

# --------------------------------------------------------------------- stand-in clients


class FakeConnection:
    """Stands in for a database connection."""

    def __init__(self) -> None:
        self.queries: list[str] = []
        self.closed = False

    async def execute(self, query: str) -> dict[str, Any]:
        self.queries.append(query)
        return {"query": query, "rows": [[1]]}

    async def close(self) -> None:
        self.closed = True


class FakeCache:
    """Stands in for a cache client (get/set with a ttl/close)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}
        self.ttls: dict[str, Any] = {}
        self.closed = False

    async def get(self, key: str) -> Any:
        return self.data.get(key)

    async def set(self, key: str, value: Any, ttl: int | None = None) -> None:
        self.data[key] = value
        self.ttls[key] = ttl

    async def close(self) -> None:
        self.closed = True


class FakePool(FakeConnection):
    """Stands in for an asyncpg pool."""

    def __init__(self, dsn: str = "", **options: Any) -> None:
        super().__init__()
        self.dsn = dsn
        self.options = options


class Clients:
    """What the stand-ins created, and which of them should fail."""

    def __init__(self) -> None:
        self.created: list[Any] = []
        self.fail_create: set[str] = set()
        self.fail_close: set[str] = set()

    def make(self, kind: str, obj: Any) -> Any:
        if kind in self.fail_create:
            raise ConnectionError(f"{kind} unreachable")
        if kind in self.fail_close:

            async def broken_close() -> None:
                raise OSError(f"{kind} close failed")

            obj.close = broken_close
        self.created.append(obj)
        return obj

    def of(self, cls: type) -> list[Any]:
        return [obj for obj in self.created if type(obj) is cls]


CLIENTS = Clients()


async def create_db_connection() -> FakeConnection:
    return CLIENTS.make("db", FakeConnection())


async def create_cache_client() -> FakeCache:
    return CLIENTS.make("cache", FakeCache())


async def create_database_pool() -> FakePool:
    return CLIENTS.make("db", FakePool("stand-in"))


async def load_configuration() -> dict[str, Any]:
    return {"region": "test", "debug": True}


async def expensive_computation(input_data: str) -> dict[str, Any]:
    return {"input": input_data, "length": len(input_data)}


@pytest.fixture(autouse=True)
def clients(monkeypatch: pytest.MonkeyPatch) -> Iterator[Clients]:
    global CLIENTS
    CLIENTS = Clients()
    asyncpg = types.ModuleType("asyncpg")

    async def create_pool(dsn: str, **options: Any) -> FakePool:
        return CLIENTS.make("db", FakePool(dsn, **options))

    asyncpg.create_pool = create_pool  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "asyncpg", asyncpg)
    yield CLIENTS


@pytest.fixture
def prometheus_cleanup() -> Iterator[None]:
    """The page's ``setup_metrics`` registers in prometheus' default registry."""
    from prometheus_client import REGISTRY

    before = set(REGISTRY._collector_to_names)
    yield
    for collector in set(REGISTRY._collector_to_names) - before:
        REGISTRY.unregister(collector)


# --------------------------------------------------------------------- the TaskiqEvents class
def test_taskiq_events_values() -> None:
    assert TaskiqEvents.CLIENT_STARTUP == "CLIENT_STARTUP"
    assert TaskiqEvents.CLIENT_SHUTDOWN == "CLIENT_SHUTDOWN"
    assert TaskiqEvents.WORKER_STARTUP == "WORKER_STARTUP"
    assert TaskiqEvents.WORKER_SHUTDOWN == "WORKER_SHUTDOWN"


# --------------------------------------------------------------------- the TaskiqState class
def test_taskiq_state_documented_methods() -> None:
    state = TaskiqState()
    state.set_value("key", "value")
    assert state.get_value("key") == "value"
    assert state.get_value("missing", "default") == "default"
    assert state.keys() == ["key"]
    assert state.values() == ["value"]
    assert state.items() == [("key", "value")]
    state.delete_value("key")
    assert state.keys() == []
    state.set_value("a", 1)
    state.clear()
    assert state.items() == []


# --------------------------------------------------------------------- Basic Event Handlers
async def test_basic_event_handlers(clients: Clients, capsys: pytest.CaptureFixture[str]) -> None:
    from pool import InMemoryBroker, TaskiqEvents

    broker = InMemoryBroker()

    @broker.on_event(TaskiqEvents.WORKER_STARTUP)
    async def on_worker_startup(state):
        """Initialize worker resources."""
        print("Worker starting up...")

        # Initialize database connections
        state.set_value("db_connection", await create_db_connection())

        # Initialize cache
        state.set_value("cache", await create_cache_client())

        # Log startup
        print("Worker initialized successfully")

    @broker.on_event(TaskiqEvents.WORKER_SHUTDOWN)
    async def on_worker_shutdown(state):
        """Cleanup worker resources."""
        print("Worker shutting down...")

        # Close database connections
        db_conn = state.get_value("db_connection")
        if db_conn:
            await db_conn.close()

        # Close cache connections
        cache = state.get_value("cache")
        if cache:
            await cache.close()

        print("Worker shutdown complete")

    @broker.task
    async def database_task(query: str) -> dict:
        """Task that uses shared database connection."""
        # Access shared resources from state
        db_conn = broker.state.get_value("db_connection")
        cache = broker.state.get_value("cache")

        # Check cache first
        cached_result = await cache.get(query)
        if cached_result:
            return cached_result

        # Execute database query
        result = await db_conn.execute(query)

        # Cache result
        await cache.set(query, result, ttl=300)

        return result

    # ---- running it
    await broker.startup()
    assert capsys.readouterr().out == "Worker starting up...\nWorker initialized successfully\n"
    (db,) = clients.of(FakeConnection)
    (cache,) = clients.of(FakeCache)
    assert broker.state.get_value("db_connection") is db

    first = await (await database_task.kiq("SELECT 1")).wait_result(timeout=5)
    second = await (await database_task.kiq("SELECT 1")).wait_result(timeout=5)
    assert first.raise_for_error().return_value == {"query": "SELECT 1", "rows": [[1]]}
    assert second.return_value == first.return_value
    assert db.queries == ["SELECT 1"]  # the second answer came from the cache
    assert cache.ttls == {"SELECT 1": 300}

    await broker.shutdown()
    assert capsys.readouterr().out == "Worker shutting down...\nWorker shutdown complete\n"
    assert db.closed and cache.closed


# --------------------------------------------------------------------- Multiple Event Handlers
async def test_multiple_event_handlers(prometheus_cleanup: None) -> None:
    from pool import InMemoryBroker, TaskiqEvents

    broker = InMemoryBroker()

    # Register handler for multiple events
    @broker.on_event(
        TaskiqEvents.CLIENT_STARTUP,
        TaskiqEvents.WORKER_STARTUP,
    )
    async def initialize_logging(state):
        """Initialize logging for both client and worker modes."""
        import logging

        # Configure logging
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s - %(name)s - %(levelname)s - %(message)s"
        )

        logger = logging.getLogger("taskiq")
        state.set_value("logger", logger)

        logger.info("Logging initialized")

    @broker.on_event(TaskiqEvents.WORKER_STARTUP)
    async def setup_metrics(state):
        """Initialize metrics collection."""
        from prometheus_client import Counter, Histogram

        # Create metrics
        task_counter = Counter("taskiq_tasks_total", "Total tasks executed")
        task_duration = Histogram("taskiq_task_duration_seconds", "Task duration")

        state.set_value("task_counter", task_counter)
        state.set_value("task_duration", task_duration)

        logger = state.get_value("logger")
        logger.info("Metrics initialized")

    # ---- running it
    from prometheus_client import Counter, Histogram

    assert broker.event_handlers[TaskiqEvents.CLIENT_STARTUP] == [initialize_logging]
    assert broker.event_handlers[TaskiqEvents.WORKER_STARTUP] == [
        initialize_logging,
        setup_metrics,
    ]
    await broker.startup()
    assert broker.state.get_value("logger") is logging.getLogger("taskiq")
    assert isinstance(broker.state.get_value("task_counter"), Counter)
    assert isinstance(broker.state.get_value("task_duration"), Histogram)
    broker.state.get_value("task_counter").inc()
    await broker.shutdown()


# --------------------------------------------------------------------- Programmatic registration
async def test_programmatic_event_handler_registration(
    clients: Clients, prometheus_cleanup: None
) -> None:
    from pool import InMemoryBroker, TaskiqEvents

    broker = InMemoryBroker()

    async def setup_metrics(state):  # from the "Multiple Event Handlers" example
        """Initialize metrics collection."""
        from prometheus_client import Counter, Histogram

        # Create metrics
        task_counter = Counter("taskiq_tasks_total", "Total tasks executed")
        task_duration = Histogram("taskiq_task_duration_seconds", "Task duration")

        state.set_value("task_counter", task_counter)
        state.set_value("task_duration", task_duration)

        logger = state.get_value("logger")
        logger.info("Metrics initialized")

    async def database_startup_handler(state):
        """Startup handler for database initialization."""
        import asyncpg

        # Create connection pool
        pool = await asyncpg.create_pool(
            "postgresql://user:password@localhost/mydb",
            min_size=5,
            max_size=20,
        )
        state.set_value("db_pool", pool)

    async def database_shutdown_handler(state):
        """Shutdown handler for database cleanup."""
        pool = state.get_value("db_pool")
        if pool:
            await pool.close()

    # Register handlers programmatically
    broker.add_event_handler(TaskiqEvents.WORKER_STARTUP, database_startup_handler)
    broker.add_event_handler(TaskiqEvents.WORKER_SHUTDOWN, database_shutdown_handler)

    # ---- running the programmatically registered broker
    await broker.startup()
    (pool,) = clients.of(FakePool)
    assert pool.dsn == "postgresql://user:password@localhost/mydb"
    assert pool.options == {"min_size": 5, "max_size": 20}
    assert broker.state.get_value("db_pool") is pool
    await broker.shutdown()
    assert pool.closed

    # Or using builder pattern
    broker = (
        InMemoryBroker()
        .with_event_handlers(
            TaskiqEvents.WORKER_STARTUP,
            database_startup_handler,
            setup_metrics,
        )
        .with_event_handlers(
            TaskiqEvents.WORKER_SHUTDOWN,
            database_shutdown_handler,
        )
    )

    # ---- running the built broker
    assert isinstance(broker, InMemoryBroker)
    assert broker.event_handlers[TaskiqEvents.WORKER_STARTUP] == [
        database_startup_handler,
        setup_metrics,
    ]
    assert broker.event_handlers[TaskiqEvents.WORKER_SHUTDOWN] == [database_shutdown_handler]
    # the page's setup_metrics logs through the logger that its initialize_logging stores
    broker.state.set_value("logger", logging.getLogger("taskiq"))
    await broker.startup()
    built_pool = clients.of(FakePool)[-1]
    assert built_pool is not pool and broker.state.get_value("db_pool") is built_pool
    assert broker.state.get_value("task_counter") is not None
    await broker.shutdown()
    assert built_pool.closed


# --------------------------------------------------------------------- State Management
async def test_state_management_examples() -> None:
    from pool import InMemoryBroker, TaskiqEvents

    broker = InMemoryBroker()

    @broker.on_event(TaskiqEvents.WORKER_STARTUP)
    async def initialize_shared_data(state):
        """Initialize shared configuration and resources."""
        # Load configuration
        config = await load_configuration()
        state.set_value("config", config)

        # Initialize shared cache
        cache_data = {}
        state.set_value("shared_cache", cache_data)

        # Track worker statistics
        stats = {
            "tasks_executed": 0,
            "start_time": time.time(),
            "errors": 0,
        }
        state.set_value("worker_stats", stats)

    @broker.task
    async def cached_computation(input_data: str) -> dict:
        """Task that uses shared cache."""
        # Access shared cache
        cache = broker.state.get_value("shared_cache", {})

        # Check cache
        if input_data in cache:
            return cache[input_data]

        # Perform computation
        result = await expensive_computation(input_data)

        # Update cache
        cache[input_data] = result
        broker.state.set_value("shared_cache", cache)

        # Update statistics
        stats = broker.state.get_value("worker_stats", {})
        stats["tasks_executed"] = stats.get("tasks_executed", 0) + 1
        broker.state.set_value("worker_stats", stats)

        return result

    @broker.task
    async def get_worker_statistics() -> dict:
        """Task to retrieve worker statistics."""
        stats = broker.state.get_value("worker_stats", {})
        config = broker.state.get_value("config", {})

        return {
            "statistics": stats,
            "configuration": config,
            "state_keys": broker.state.keys(),
        }

    # ---- running it
    before = time.time()
    await broker.startup()
    results = []
    for word in ("alpha", "beta", "alpha"):
        task = await cached_computation.kiq(word)
        results.append((await task.wait_result(timeout=5)).raise_for_error().return_value)
    assert results == [
        {"input": "alpha", "length": 5},
        {"input": "beta", "length": 4},
        {"input": "alpha", "length": 5},
    ]
    stats_result = await (await get_worker_statistics.kiq()).wait_result(timeout=5)
    stats = stats_result.raise_for_error().return_value
    assert stats["statistics"]["tasks_executed"] == 2  # the second "alpha" came from the cache
    assert stats["statistics"]["errors"] == 0
    assert before <= stats["statistics"]["start_time"] <= time.time()
    assert stats["configuration"] == {"region": "test", "debug": True}
    assert sorted(stats["state_keys"]) == ["config", "shared_cache", "worker_stats"]
    assert isinstance(stats["state_keys"], list)
    await broker.shutdown()


# --------------------------------------------------------------------- Error Handling
def _error_handling_broker() -> InMemoryBroker:
    from pool import InMemoryBroker, TaskiqEvents

    broker = InMemoryBroker()

    @broker.on_event(TaskiqEvents.WORKER_STARTUP)
    async def robust_startup_handler(state):
        """Startup handler with error handling."""
        logger = logging.getLogger("taskiq.startup")

        try:
            # Initialize critical resources
            db_pool = await create_database_pool()
            state.set_value("db_pool", db_pool)
            logger.info("Database pool initialized")

        except Exception as e:
            logger.error(f"Failed to initialize database: {e}")
            # Set fallback or raise to prevent worker start
            raise

        try:
            # Initialize optional resources
            cache = await create_cache_client()
            state.set_value("cache", cache)
            logger.info("Cache initialized")

        except Exception as e:
            logger.warning(f"Cache initialization failed: {e}")
            # Continue without cache
            state.set_value("cache", None)

    @broker.on_event(TaskiqEvents.WORKER_SHUTDOWN)
    async def safe_shutdown_handler(state):
        """Shutdown handler with safe resource cleanup."""
        logger = logging.getLogger("taskiq.shutdown")

        # Safe cleanup of database pool
        try:
            db_pool = state.get_value("db_pool")
            if db_pool:
                await db_pool.close()
                logger.info("Database pool closed")
        except Exception as e:
            logger.error(f"Error closing database pool: {e}")

        # Safe cleanup of cache
        try:
            cache = state.get_value("cache")
            if cache:
                await cache.close()
                logger.info("Cache closed")
        except Exception as e:
            logger.error(f"Error closing cache: {e}")

    return broker


async def test_error_handling_when_everything_works(
    clients: Clients, caplog: pytest.LogCaptureFixture
) -> None:
    broker = _error_handling_broker()
    with caplog.at_level(logging.INFO):
        await broker.startup()
        (pool,) = clients.of(FakePool)
        (cache,) = clients.of(FakeCache)
        assert broker.state.get_value("db_pool") is pool
        assert broker.state.get_value("cache") is cache
        await broker.shutdown()
    assert pool.closed and cache.closed
    messages = [r.getMessage() for r in caplog.records]
    for expected in ("Database pool initialized", "Cache initialized", "Database pool closed"):
        assert expected in messages


async def test_error_handling_continues_without_the_optional_cache(
    clients: Clients, caplog: pytest.LogCaptureFixture
) -> None:
    clients.fail_create.add("cache")
    broker = _error_handling_broker()
    with caplog.at_level(logging.INFO):
        await broker.startup()
        assert "cache" in broker.state
        assert broker.state.get_value("cache") is None
        assert broker.state.get_value("db_pool") is clients.of(FakePool)[0]
        await broker.shutdown()
    assert "Cache initialization failed: cache unreachable" in [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
    ]
    assert clients.of(FakePool)[0].closed


async def test_error_handling_critical_failure_prevents_the_worker_start(
    clients: Clients, caplog: pytest.LogCaptureFixture
) -> None:
    clients.fail_create.add("db")
    broker = _error_handling_broker()
    with pytest.raises(EventHandlerError) as info:
        await broker.startup()
    assert isinstance(info.value.__cause__, ConnectionError)
    assert "db unreachable" in str(info.value)
    assert "Failed to initialize database: db unreachable" in [
        r.getMessage() for r in caplog.records if r.levelno == logging.ERROR
    ]
    assert clients.of(FakeCache) == []  # nothing after the failure ran


async def test_error_handling_shutdown_survives_failing_closes(
    clients: Clients, caplog: pytest.LogCaptureFixture
) -> None:
    clients.fail_close.update({"db", "cache"})
    broker = _error_handling_broker()
    await broker.startup()
    await broker.shutdown()  # the handler catches and logs
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "Error closing database pool: db close failed" in errors
    assert "Error closing cache: cache close failed" in errors


# --------------------------------------------------------------------- Types
async def test_event_handler_type_accepts_sync_and_async_handlers() -> None:
    calls: list[str] = []

    def sync_handler(state: TaskiqState) -> None:
        calls.append("sync")

    async def async_handler(state: TaskiqState) -> None:
        calls.append("async")

    handlers: list[EventHandler] = [sync_handler, async_handler]
    broker = InMemoryBroker().with_event_handlers(TaskiqEvents.WORKER_STARTUP, *handlers)
    await broker.startup()
    await broker.shutdown()
    assert calls == ["sync", "async"]
