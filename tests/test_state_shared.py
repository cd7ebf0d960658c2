"""The shared state for real: a state server process and client processes."""

from __future__ import annotations

import asyncio
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


@pytest.fixture
def server() -> Iterator[Server]:
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


def run_in_processes(server: Server, count: int, body: Callable[[TaskiqState, int], Any]) -> None:
    """Run ``body(state, index)`` in ``count`` processes at once, each with its own client."""
    start = CTX.Event()

    def child(index: int) -> None:
        state = server.connect()
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
    run_in_processes(server, 1, lambda state, _: state.set_value("config", {"debug": True}))
    assert reader.get_value("config") == {"debug": True}
    run_in_processes(server, 1, lambda state, _: state.delete_value("config"))
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

    run_in_processes(server, 4, body)
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

    run_in_processes(server, 4, body)
    seen = server.connect().get_value("seen")
    assert sorted(seen) == sorted(i * 1000 + n for i in range(4) for n in range(50))
    assert len(calls.read_text().splitlines()) == 200


def test_setdefault_gives_every_process_the_same_winner(server: Server, tmp_path: Path) -> None:
    def body(state: TaskiqState, index: int) -> None:
        winner = state.setdefault("leader", index)
        (tmp_path / f"p{index}").write_text(str(winner))

    run_in_processes(server, 4, body)
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

    run_in_processes(server, 4, body)
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
