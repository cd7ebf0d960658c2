"""The seed page's examples (events and state) run as written, importing from taskiq or pool.

Each example is the page's code, kept verbatim below (trailing blanks aside) with its
``from taskiq import ...`` line; the ``pool`` style runs it with ``from pool import ...`` instead.
Examples the page writes as one program (later ones use the ``broker`` and handlers of earlier
ones) run after the code they use. The database, cache and ``asyncpg`` clients are stand-ins.

The page's handlers call ``state.set_value`` and friends: that API is pool's ``TaskiqState``
(SPEC 2), which is what ``broker.state`` is under ``pool run`` whatever the broker. taskiq's
own ``TaskiqState`` lacks it, so with taskiq's ``InMemoryBroker`` the example runs on a local
pool ``TaskiqState``, as a pool worker would give it.
"""

from __future__ import annotations

import logging
import sys
import time
import types
from collections.abc import Iterator
from typing import Any

import pytest
import taskiq

import pool
from pool import TaskiqState

pytestmark = pytest.mark.timeout(30)

# --------------------------------------------------------------------- the page's code
BASIC = '''\
from taskiq import InMemoryBroker, TaskiqEvents

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
'''

MULTIPLE = '''\
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
        level=logging.INFO,
        format='%(asctime)s - %(name)s - %(levelname)s - %(message)s'
    )

    logger = logging.getLogger('taskiq')
    state.set_value("logger", logger)

    logger.info("Logging initialized")

@broker.on_event(TaskiqEvents.WORKER_STARTUP)
async def setup_metrics(state):
    """Initialize metrics collection."""
    from prometheus_client import Counter, Histogram

    # Create metrics
    task_counter = Counter('taskiq_tasks_total', 'Total tasks executed')
    task_duration = Histogram('taskiq_task_duration_seconds', 'Task duration')

    state.set_value("task_counter", task_counter)
    state.set_value("task_duration", task_duration)

    logger = state.get_value("logger")
    logger.info("Metrics initialized")
'''

PROGRAMMATIC = '''\
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
broker.add_event_handler(
    TaskiqEvents.WORKER_STARTUP,
    database_startup_handler
)
broker.add_event_handler(
    TaskiqEvents.WORKER_SHUTDOWN,
    database_shutdown_handler
)
'''

BUILDER = """\
# Or using builder pattern
broker = (InMemoryBroker()
    .with_event_handlers(
        TaskiqEvents.WORKER_STARTUP,
        database_startup_handler,
        setup_metrics,
    )
    .with_event_handlers(
        TaskiqEvents.WORKER_SHUTDOWN,
        database_shutdown_handler,
    ))
"""

STATE_MANAGEMENT = '''\
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
'''

ERROR_HANDLING = '''\
@broker.on_event(TaskiqEvents.WORKER_STARTUP)
async def robust_startup_handler(state):
    """Startup handler with error handling."""
    logger = logging.getLogger('taskiq.startup')

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
    logger = logging.getLogger('taskiq.shutdown')

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
'''

# the first lines of the page's first example: the import line and the broker
HEADER = BASIC[: BASIC.index("@broker")]


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
    """Stands in for a cache client (get, set with a ttl, close)."""

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
    """What the stand-ins created, and which of them fail."""

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

    def stand_ins(self) -> dict[str, Any]:
        """The names the page's examples use without defining them."""

        async def create_db_connection() -> FakeConnection:
            return self.make("db", FakeConnection())

        async def create_cache_client() -> FakeCache:
            return self.make("cache", FakeCache())

        async def create_database_pool() -> FakePool:
            return self.make("db", FakePool("stand-in"))

        async def load_configuration() -> dict[str, Any]:
            return {"region": "test", "debug": True}

        async def expensive_computation(input_data: str) -> dict[str, Any]:
            return {"input": input_data, "length": len(input_data)}

        return {
            "create_db_connection": create_db_connection,
            "create_cache_client": create_cache_client,
            "create_database_pool": create_database_pool,
            "load_configuration": load_configuration,
            "expensive_computation": expensive_computation,
            "logging": logging,
            "time": time,
        }


@pytest.fixture
def clients(monkeypatch: pytest.MonkeyPatch) -> Clients:
    clients = Clients()
    asyncpg = types.ModuleType("asyncpg")

    async def create_pool(dsn: str, **options: Any) -> FakePool:
        return clients.make("db", FakePool(dsn, **options))

    asyncpg.create_pool = create_pool  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "asyncpg", asyncpg)
    return clients


def forget_new_metrics(before: set[Any]) -> None:
    """Unregister what the page's ``setup_metrics`` put in prometheus' default registry."""
    from prometheus_client import REGISTRY

    for collector in set(REGISTRY._collector_to_names) - before:
        REGISTRY.unregister(collector)


@pytest.fixture
def metrics() -> Iterator[set[Any]]:
    from prometheus_client import REGISTRY

    before = set(REGISTRY._collector_to_names)
    yield before
    forget_new_metrics(before)


@pytest.fixture(params=["taskiq", "pool"])
def style(request: pytest.FixtureRequest) -> str:
    """Which package the example's import line names."""
    return str(request.param)


class Example:
    """The page's code run in a namespace of its own, in one import style."""

    def __init__(self, style: str, clients: Clients, monkeypatch: pytest.MonkeyPatch) -> None:
        self.style = style
        # a module of its own: taskiq puts each task's original function back in its module
        module = types.ModuleType(f"seed_example_{style}")
        module.__dict__.update(clients.stand_ins())
        monkeypatch.setitem(sys.modules, module.__name__, module)
        self.namespace: dict[str, Any] = module.__dict__

    def run(self, *sources: str) -> Example:
        source = "".join(sources)
        if self.style == "pool":
            source = source.replace("from taskiq import", "from pool import")
        exec(compile(source, f"<seed page, {self.style} style>", "exec"), self.namespace)
        return self

    def __getitem__(self, name: str) -> Any:
        return self.namespace[name]

    @property
    def broker(self) -> Any:
        """The example's ``broker``, with the state a pool worker gives every broker."""
        broker = self.namespace["broker"]
        expected = pool.InMemoryBroker if self.style == "pool" else taskiq.InMemoryBroker
        assert type(broker) is expected
        if self.style == "taskiq" and not isinstance(broker.state, TaskiqState):
            broker.state = TaskiqState()
        return broker


@pytest.fixture
def example(style: str, clients: Clients, monkeypatch: pytest.MonkeyPatch) -> Example:
    return Example(style, clients, monkeypatch)


async def result_of(task: Any) -> Any:
    return (await task.wait_result(timeout=5, check_interval=0.01)).raise_for_error()


# --------------------------------------------------------------------- the classes
def test_taskiq_events_have_the_pages_values(style: str) -> None:
    events = pool.TaskiqEvents if style == "pool" else taskiq.TaskiqEvents
    assert events.CLIENT_STARTUP.value == "CLIENT_STARTUP"
    assert events.CLIENT_SHUTDOWN.value == "CLIENT_SHUTDOWN"
    assert events.WORKER_STARTUP.value == "WORKER_STARTUP"
    assert events.WORKER_SHUTDOWN.value == "WORKER_SHUTDOWN"


def test_the_pages_state_methods_are_pools_not_taskiqs() -> None:
    """Why the taskiq style runs on a pool state: taskiq's has none of the page's methods."""
    assert not hasattr(taskiq.TaskiqState(), "set_value")
    state = TaskiqState()
    assert isinstance(state, taskiq.TaskiqState)
    state.set_value("key", "value")
    assert state.get_value("key") == "value"
    assert state.get_value("missing", "default") == "default"
    assert state.keys() == ["key"]
    assert state.values() == ["value"]
    assert state.items() == [("key", "value")]
    state.delete_value("key")
    state.delete_value("key")  # a missing key is not an error
    assert state.keys() == []
    state.set_value("a", 1)
    state.clear()
    assert state.items() == []


# --------------------------------------------------------------------- Basic Event Handlers
async def test_basic_event_handlers(
    example: Example, clients: Clients, capsys: pytest.CaptureFixture[str]
) -> None:
    broker = example.run(BASIC).broker
    await broker.startup()
    assert capsys.readouterr().out == "Worker starting up...\nWorker initialized successfully\n"
    (db,) = clients.of(FakeConnection)
    (cache,) = clients.of(FakeCache)
    assert broker.state.get_value("db_connection") is db

    database_task = example["database_task"]
    first = await result_of(await database_task.kiq("SELECT 1"))
    second = await result_of(await database_task.kiq("SELECT 1"))
    assert first.return_value == {"query": "SELECT 1", "rows": [[1]]}
    assert second.return_value == first.return_value
    assert db.queries == ["SELECT 1"]  # the second answer came from the cache
    assert cache.ttls == {"SELECT 1": 300}

    await broker.shutdown()
    assert capsys.readouterr().out == "Worker shutting down...\nWorker shutdown complete\n"
    assert db.closed and cache.closed


# --------------------------------------------------------------------- Multiple Event Handlers
async def test_multiple_event_handlers(example: Example, metrics: set[Any]) -> None:
    from prometheus_client import Counter, Histogram

    broker = example.run(HEADER, MULTIPLE).broker
    events = broker.event_handlers
    initialize_logging, setup_metrics = example["initialize_logging"], example["setup_metrics"]
    assert events[example["TaskiqEvents"].CLIENT_STARTUP] == [initialize_logging]
    assert events[example["TaskiqEvents"].WORKER_STARTUP] == [initialize_logging, setup_metrics]

    await broker.startup()
    assert broker.state.get_value("logger") is logging.getLogger("taskiq")
    assert isinstance(broker.state.get_value("task_counter"), Counter)
    assert isinstance(broker.state.get_value("task_duration"), Histogram)
    broker.state.get_value("task_counter").inc()
    await broker.shutdown()


# --------------------------------------------------------------------- Programmatic registration
async def test_programmatic_event_handler_registration(
    example: Example, clients: Clients, metrics: set[Any]
) -> None:
    # the page registers these on the broker of its first examples, whose handlers run too
    broker = example.run(HEADER, MULTIPLE, PROGRAMMATIC).broker
    await broker.startup()
    (pool_client,) = clients.of(FakePool)
    assert pool_client.dsn == "postgresql://user:password@localhost/mydb"
    assert pool_client.options == {"min_size": 5, "max_size": 20}
    assert broker.state.get_value("db_pool") is pool_client
    await broker.shutdown()
    assert pool_client.closed
    forget_new_metrics(metrics)  # each broker stands for a worker process of its own

    # Or using builder pattern
    built = example.run(BUILDER).broker
    assert built is not broker
    events = example["TaskiqEvents"]
    assert built.event_handlers[events.WORKER_STARTUP] == [
        example["database_startup_handler"],
        example["setup_metrics"],
    ]
    assert built.event_handlers[events.WORKER_SHUTDOWN] == [example["database_shutdown_handler"]]
    # the page's setup_metrics logs through the logger its initialize_logging stores
    built.state.set_value("logger", logging.getLogger("taskiq"))
    await built.startup()
    built_pool = clients.of(FakePool)[-1]
    assert built_pool is not pool_client
    assert built.state.get_value("db_pool") is built_pool
    assert built.state.get_value("task_counter") is not None
    await built.shutdown()
    assert built_pool.closed


# --------------------------------------------------------------------- State Management
async def test_state_management_examples(example: Example) -> None:
    broker = example.run(HEADER, STATE_MANAGEMENT).broker
    before = time.time()
    await broker.startup()
    results = []
    for word in ("alpha", "beta", "alpha"):
        task = await example["cached_computation"].kiq(word)
        results.append((await result_of(task)).return_value)
    assert results == [
        {"input": "alpha", "length": 5},
        {"input": "beta", "length": 4},
        {"input": "alpha", "length": 5},
    ]
    stats = (await result_of(await example["get_worker_statistics"].kiq())).return_value
    assert stats["statistics"]["tasks_executed"] == 2  # the second "alpha" came from the cache
    assert stats["statistics"]["errors"] == 0
    assert before <= stats["statistics"]["start_time"] <= time.time()
    assert stats["configuration"] == {"region": "test", "debug": True}
    assert sorted(stats["state_keys"]) == ["config", "shared_cache", "worker_stats"]
    assert isinstance(stats["state_keys"], list)
    await broker.shutdown()


# --------------------------------------------------------------------- Error Handling
async def test_error_handling_when_everything_works(
    example: Example, clients: Clients, caplog: pytest.LogCaptureFixture
) -> None:
    broker = example.run(HEADER, ERROR_HANDLING).broker
    with caplog.at_level(logging.INFO):
        await broker.startup()
        (pool_client,) = clients.of(FakePool)
        (cache,) = clients.of(FakeCache)
        assert broker.state.get_value("db_pool") is pool_client
        assert broker.state.get_value("cache") is cache
        await broker.shutdown()
    assert pool_client.closed and cache.closed
    messages = [r.getMessage() for r in caplog.records]
    for expected in ("Database pool initialized", "Cache initialized", "Database pool closed"):
        assert expected in messages


async def test_error_handling_continues_without_the_optional_cache(
    example: Example, clients: Clients, caplog: pytest.LogCaptureFixture
) -> None:
    clients.fail_create.add("cache")
    broker = example.run(HEADER, ERROR_HANDLING).broker
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
    example: Example, clients: Clients, caplog: pytest.LogCaptureFixture
) -> None:
    """taskiq's startup raises the handler's own error (pool run then retries the worker)."""
    clients.fail_create.add("db")
    broker = example.run(HEADER, ERROR_HANDLING).broker
    with pytest.raises(ConnectionError, match="db unreachable"):
        await broker.startup()
    assert "Failed to initialize database: db unreachable" in [
        r.getMessage() for r in caplog.records if r.levelno == logging.ERROR
    ]
    assert clients.of(FakeCache) == []  # nothing after the failure ran


async def test_error_handling_shutdown_survives_failing_closes(
    example: Example, clients: Clients, caplog: pytest.LogCaptureFixture
) -> None:
    clients.fail_close.update({"db", "cache"})
    broker = example.run(HEADER, ERROR_HANDLING).broker
    await broker.startup()
    await broker.shutdown()  # the page's handler catches and logs
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "Error closing database pool: db close failed" in errors
    assert "Error closing cache: cache close failed" in errors


# --------------------------------------------------------------------- Types
@pytest.mark.parametrize("module", ["pool", "taskiq.abc.broker"])
async def test_event_handler_type_takes_sync_and_async_handlers(module: str) -> None:
    namespace: dict[str, Any] = {}
    exec(f"from {module} import EventHandler", namespace)
    assert namespace["EventHandler"] is taskiq.abc.broker.EventHandler
    calls: list[str] = []

    def sync_handler(state: TaskiqState) -> None:
        calls.append("sync")

    async def async_handler(state: TaskiqState) -> None:
        calls.append("async")

    handlers: list[taskiq.abc.broker.EventHandler] = [sync_handler, async_handler]
    broker = pool.InMemoryBroker().with_event_handlers(pool.TaskiqEvents.WORKER_STARTUP, *handlers)
    async with broker:
        assert calls == ["sync", "async"]
