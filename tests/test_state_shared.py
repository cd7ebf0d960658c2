"""The shared state for real: a state server process and client processes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import multiprocess
import psutil
import pytest

from shared_state import StateServer, TaskiqState, connect_state, start_state_server
from tests.pool_support import wait_for, wait_for_gone

pytestmark = pytest.mark.timeout(60)
CTX = multiprocess.get_context("fork")


class Server:
    def __init__(self, tmp: Path) -> None:
        self.address = str(tmp / "state.sock")
        self.versions = str(tmp / "state.ver")
        self.authkey = os.urandom(32)
        self.handle: StateServer = start_state_server(self.address, self.authkey, self.versions)

    def connect(self) -> TaskiqState:
        return connect_state(self.address, self.authkey, self.versions)


@contextlib.contextmanager
def serving() -> Iterator[Server]:
    """A real state server in a private directory, stopped and removed afterwards."""
    short = Path(os.path.realpath("/tmp")) / f"ss-{os.getpid()}-{threading.get_ident() % 10000}"
    short.mkdir(mode=0o700)
    srv = Server(short)
    try:
        yield srv
    finally:
        srv.handle.shutdown()
        assert wait_for_gone({srv.handle.pid}, 10) == []
        for child in short.iterdir():
            child.unlink()
        short.rmdir()


@pytest.fixture
def server() -> Iterator[Server]:
    with serving() as srv:
        yield srv


def run_in_processes(
    connect: Callable[[], TaskiqState], count: int, body: Callable[[TaskiqState, int], Any]
) -> None:
    """Run ``body(connect(), index)`` in ``count`` processes at once, each its own client."""
    start = CTX.Event()

    def child(index: int) -> None:
        state = connect()
        start.wait(10)
        body(state, index)

    procs = [CTX.Process(target=child, args=(i,)) for i in range(count)]
    for proc in procs:
        proc.start()
    start.set()
    for proc in procs:
        proc.join(30)
    codes = [proc.exitcode for proc in procs]
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    assert codes == [0] * count


def test_a_value_set_in_one_process_is_seen_by_another_at_once(server: Server) -> None:
    reader = server.connect()
    assert reader.get_value("config") is None  # also caches "missing"
    run_in_processes(server.connect, 1, lambda state, _: state.set_value("config", {"debug": True}))
    assert reader.get_value("config") == {"debug": True}
    run_in_processes(server.connect, 1, lambda state, _: state.delete_value("config"))
    assert "config" not in reader
    assert reader.get_value("config", "gone") == "gone"


def test_an_unchanged_key_is_read_without_asking_the_server(server: Server) -> None:
    state = server.connect()
    state.set_value("answer", 42)
    state.set_value("table", {"a": [1, 2]})
    assert state.get_value("answer") == 42
    os.kill(server.handle.pid, signal.SIGSTOP)
    try:
        got: list[Any] = []
        reader = threading.Thread(
            target=lambda: got.extend([state.get_value("answer"), state["table"]]), daemon=True
        )
        reader.start()
        reader.join(5)
        assert got == [42, {"a": [1, 2]}], "a cached read must not wait for the stopped server"
    finally:
        os.kill(server.handle.pid, signal.SIGCONT)


def test_values_are_copies(server: Server) -> None:
    state = server.connect()
    state.set_value("items", [1, 2])
    got = state.get_value("items")
    got.append(3)
    assert state.get_value("items") == [1, 2]
    other = server.connect()
    assert other.items() == [("items", [1, 2])]


def test_incr_is_exact_under_contention_from_four_processes(server: Server) -> None:
    def body(state: TaskiqState, _: int) -> None:
        for _ in range(500):
            state.incr("hits")

    run_in_processes(server.connect, 4, body)
    assert server.connect().get_value("hits") == 2000


def test_update_is_atomic_and_runs_its_function_once_per_call(
    server: Server, tmp_path: Path
) -> None:
    calls = tmp_path / "calls"

    def body(state: TaskiqState, index: int) -> None:
        for n in range(50):

            def append(old: list[int], item: int = index * 1000 + n) -> list[int]:
                with open(calls, "a") as out:
                    out.write("x\n")
                return [*old, item]

            state.update("seen", append, default=[])

    run_in_processes(server.connect, 4, body)
    seen = server.connect().get_value("seen")
    assert sorted(seen) == sorted(i * 1000 + n for i in range(4) for n in range(50))
    assert len(calls.read_text().splitlines()) == 200


def test_setdefault_gives_every_process_the_same_winner(server: Server, tmp_path: Path) -> None:
    def body(state: TaskiqState, index: int) -> None:
        winner = state.setdefault("leader", index)
        (tmp_path / f"p{index}").write_text(str(winner))

    run_in_processes(server.connect, 4, body)
    winners = {(tmp_path / f"p{i}").read_text() for i in range(4)}
    assert len(winners) == 1
    assert server.connect().get_value("leader") == int(winners.pop())


def test_lock_makes_read_modify_write_exact_across_processes(server: Server) -> None:
    def body(state: TaskiqState, index: int) -> None:
        for _ in range(100):
            if index % 2:
                with state.lock("counter"):
                    state.set_value("n", state.get_value("n", 0) + 1)
            else:

                async def bump() -> None:
                    async with state.lock("counter"):
                        state.set_value("n", state.get_value("n", 0) + 1)

                asyncio.run(bump())

    run_in_processes(server.connect, 4, body)
    assert server.connect().get_value("n") == 400


def test_a_lock_held_by_a_dead_process_is_taken_over(server: Server) -> None:
    taken = CTX.Event()

    def holder() -> None:
        state = server.connect()
        state.lock("job").acquire()
        taken.set()
        threading.Event().wait(60)

    proc = CTX.Process(target=holder)
    proc.start()
    assert taken.wait(10)
    state = server.connect()
    assert state.lock("job").acquire(timeout=0.1) is False
    proc.kill()
    proc.join(5)
    lock = state.lock("job")
    assert lock.acquire(timeout=10) is True
    lock.release()


def test_unpicklable_values_stay_in_the_process_that_set_them(server: Server) -> None:
    state = server.connect()
    state.client = threading.Lock()
    state.set_value("plain", 1)
    assert state.is_shared("client") is False
    assert state.is_shared("plain") is True
    assert isinstance(state.client, type(threading.Lock()))
    assert set(state.keys()) == {"client", "plain"}
    other = server.connect()
    assert "client" not in other
    assert other.keys() == ["plain"]


def test_keys_must_be_strings(server: Server) -> None:
    state = server.connect()
    for call in (
        lambda: state.set_value(1, "x"),  # type: ignore[arg-type]
        lambda: state.get_value(b"k"),  # type: ignore[arg-type]
        lambda: state.incr(("a",)),  # type: ignore[arg-type]
        lambda: state[2],  # type: ignore[index]
    ):
        with pytest.raises(TypeError):
            call()


def test_wrong_authkey_is_refused(server: Server) -> None:
    from multiprocess import AuthenticationError

    with pytest.raises(AuthenticationError):
        connect_state(server.address, b"x" * 32, server.versions)
    assert stat.S_IMODE(os.stat(server.address).st_mode) == 0o600
    # the server keeps serving honest clients
    state = server.connect()
    state.set_value("still", "here")
    assert state.get_value("still") == "here"


def test_the_server_dies_with_the_process_that_started_it(tmp_path: Path) -> None:
    script = (
        "import os, sys, time\n"
        "from shared_state import start_state_server\n"
        "srv = start_state_server(sys.argv[1], os.urandom(32), sys.argv[2])\n"
        "print(srv.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    short = Path("/tmp") / f"ssd-{os.getpid()}"
    short.mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(short / "s.sock"), str(short / "v")],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    try:
        assert proc.stdout is not None
        server_pid = int(proc.stdout.readline())
        assert psutil.pid_exists(server_pid)
        proc.kill()
        proc.wait(10)
        assert wait_for_gone({server_pid}, 10) == [], "the state server outlived its parent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        for child in short.iterdir():
            child.unlink()
        short.rmdir()


def test_incr_of_a_non_number_is_a_type_error(server: Server) -> None:
    state = server.connect()
    state.set_value("name", "pool")
    with pytest.raises(TypeError, match="name"):
        state.incr("name")
    assert wait_for(lambda: state.get_value("name") == "pool", 1)


# --------------------------------------------------------------------- taskiq's UserDict
def test_userdict_methods_see_both_tiers(server: Server) -> None:
    import copy

    state, other = server.connect(), server.connect()
    client = threading.Lock()
    state.client = client  # local tier: cannot be pickled
    state["plain"] = 1  # shared tier
    assert state.get("client") is client and state.get("plain") == 1
    assert sorted(state) == ["client", "plain"] and "client" in state and "plain" in state
    assert len(state) == 2 and state == {"client": client, "plain": 1}
    assert "'plain': 1" in repr(state) and "'client'" in repr(state)
    twin = copy.copy(state)
    assert twin.get("client") is client
    twin["more"] = 2  # a copy is another handle on the same shared tier...
    assert other.get("more") == 2
    twin.set_local("mine", 3)  # ...with a local tier of its own
    assert "mine" not in state
    merged = state | {"x": 1}
    assert merged.shared is False and merged["plain"] == 1 and "x" not in other
    assert state.pop("plain") == 1 and "plain" not in other
    assert other.setdefault("plain", 5) == 5 and state["plain"] == 5


def test_a_shared_state_pickles_only_to_start_a_process(server: Server) -> None:
    import multiprocessing
    import pickle

    state = server.connect()
    state.set_value("greeting", "hi")
    with pytest.raises(TypeError, match="authkey"):
        pickle.dumps(state)
    child = multiprocessing.get_context("spawn").Process(target=_answer, args=(state,))
    child.start()
    try:
        child.join(30)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
            child.join(5)
    assert state.get_value("reply") == "hi back"


def _answer(state: TaskiqState) -> None:
    state.set_value("reply", state.get_value("greeting") + " back")


# --------------------------------------------------------------------- set_local
def test_set_local_keeps_a_picklable_value_in_this_process(server: Server) -> None:
    state, other = server.connect(), server.connect()
    state.set_local("worker_id", 7)
    state.worker_id = 8
    state.set_value("worker_id", 9)  # a key kept local stays local
    assert state.incr("worker_id") == 10
    assert state.worker_id == 10 and state.is_shared("worker_id") is False
    assert "worker_id" not in other and other.keys() == []
    state.delete_value("worker_id")
    state.set_value("worker_id", 1)  # deleted: the next value is shared again
    assert state.is_shared("worker_id") and other.get_value("worker_id") == 1


def test_a_local_value_hides_the_shared_one_in_its_process_only(server: Server) -> None:
    state, other = server.connect(), server.connect()
    other.mode = "everyone"
    state.set_local("mode", "mine")
    assert state.mode == "mine" and other.mode == "everyone"
    assert state.is_shared("mode") is False and other.is_shared("mode") is True
    assert state.keys() == ["mode"]


# --------------------------------------------------------------------- init_once
def test_init_once_runs_once_across_processes_and_the_others_wait(
    server: Server, tmp_path: Path
) -> None:
    started, go = CTX.Event(), CTX.Event()
    calling = [CTX.Event() for _ in range(4)]
    runs = tmp_path / "runs"

    def setup(state: TaskiqState) -> None:
        with open(runs, "a") as out:
            out.write("ran\n")
        started.set()
        assert go.wait(20)
        state.set_value("config", {"ready": True})

    async def asetup(state: TaskiqState) -> None:
        setup(state)

    def caller(index: int) -> None:
        state = server.connect()
        calling[index].set()
        if index % 2:
            ran = asyncio.run(state.ainit_once("setup", asetup))
        else:
            ran = state.init_once("setup", setup)
        seen = state.get_value("config")
        (tmp_path / f"result-{index}").write_text(repr((ran, seen)))

    procs = [CTX.Process(target=caller, args=(i,)) for i in range(4)]
    try:
        procs[0].start()
        assert started.wait(20), "the first caller never ran fn"
        for proc in procs[1:]:
            proc.start()
        assert all(event.wait(20) for event in calling)
        procs[1].join(0.3)
        assert not list(tmp_path.glob("result-*")), "a caller returned while fn was running"
        go.set()
        for proc in procs:
            proc.join(30)
        assert [proc.exitcode for proc in procs] == [0] * 4
    finally:
        go.set()
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    results = [(tmp_path / f"result-{i}").read_text() for i in range(4)]
    assert results == [repr((i == 0, {"ready": True})) for i in range(4)]
    assert runs.read_text() == "ran\n"


def test_workers_added_or_replaced_later_do_not_run_init_again(server: Server) -> None:
    def worker(state: TaskiqState, _: int) -> None:
        state.init_once("counter", lambda s: s.set_value("counter", 0))  # at WORKER_STARTUP
        state.incr("counter")

    run_in_processes(server.connect, 4, worker)
    run_in_processes(server.connect, 2, worker)  # replaced or added workers
    state = server.connect()
    assert state.get_value("counter") == 6
    state.clear()  # records are not values: clearing the data does not re-arm them
    assert state.init_once("counter", lambda s: s.set_value("counter", 0)) is False


def test_init_once_runs_again_when_its_runner_died(server: Server) -> None:
    started = CTX.Event()

    def dies_in_fn() -> None:
        state = server.connect()

        def setup(_: TaskiqState) -> None:
            started.set()
            os._exit(3)

        state.init_once("setup", setup)

    proc = CTX.Process(target=dies_in_fn)
    proc.start()
    assert started.wait(20)
    proc.join(20)
    assert proc.exitcode == 3
    state = server.connect()
    assert state.init_once("setup", lambda s: s.set_value("ready", True)) is True
    assert state.get_value("ready") is True
    assert server.connect().init_once("setup", lambda s: pytest.fail("ran twice")) is False


# --------------------------------------------------------------------- async lock waits
async def test_async_lock_wait_on_another_process_keeps_the_loop_ticking(
    server: Server,
) -> None:
    held, release = CTX.Event(), CTX.Event()

    def holder() -> None:
        with server.connect().lock("resource"):
            held.set()
            release.wait(20)

    proc = CTX.Process(target=holder)
    proc.start()
    try:
        assert await asyncio.to_thread(held.wait, 20)
        state = server.connect()
        waiter = asyncio.create_task(_enter(state.lock("resource")))
        ticks = 0
        while ticks < 20:  # the loop keeps running other tasks while the waiter waits
            await asyncio.sleep(0.005)
            ticks += 1
        assert not waiter.done()
        release.set()
        await asyncio.wait_for(waiter, 10)
        await asyncio.to_thread(proc.join, 20)
        assert proc.exitcode == 0
    finally:
        release.set()
        if proc.is_alive():
            proc.kill()
            proc.join(5)


async def _enter(lock: Any) -> None:
    async with lock:
        pass


def test_init_once_on_a_redis_state_runs_once_across_processes() -> None:
    from tests.redis_support import redis_space

    with contextlib.contextmanager(redis_space)() as space:  # skips when there is no Redis
        from pool.redis import RedisState

        def connect() -> TaskiqState:
            return RedisState(space.url, prefix=space.name("s"))

        def worker(state: TaskiqState, _: int) -> None:
            state.init_once("counter", lambda s: s.set_value("counter", 0))
            state.incr("counter")

        run_in_processes(connect, 3, worker)
        run_in_processes(connect, 1, worker)  # a replaced worker
        state = connect()
        assert state.get_value("counter") == 4
        state.clear()
        assert state.init_once("counter", lambda s: pytest.fail("ran twice")) is False
