"""The shared-memory store under the shared state: real processes, real kills.

The values live in an LMDB environment beside the version file, which workers read and
write directly; the state server creates it, runs ``update`` functions and decides that a
lock's owner died.
"""

from __future__ import annotations

import os
import signal
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import multiprocess
import pytest

from shared_state import TaskiqState
from shared_state.shm import files_of, owner_pid
from tests.pool_support import RunningPool, wait_for
from tests.test_state_shared import Server, run_in_processes, serving

pytestmark = pytest.mark.timeout(60)
CTX = multiprocess.get_context("fork")


@pytest.fixture
def server() -> Iterator[Server]:
    with serving() as srv:
        yield srv


def _reap(proc: Any) -> None:
    if proc.is_alive():
        proc.kill()
    proc.join(10)


def test_a_value_one_process_writes_is_read_at_once_by_another_every_time(
    server: Server,
) -> None:
    """Ping-pong: each side reads the other's write right after it returns, with the
    previous value in its cache every time."""
    ours, theirs = CTX.Pipe()

    def other() -> None:
        state = server.connect()
        while (n := theirs.recv()) is not None:
            assert state.get_value("ball") == n  # our write, seen at once
            state.set_value("ball", n + 1)
            theirs.send(True)

    proc = CTX.Process(target=other)
    proc.start()
    try:
        state = server.connect()
        for n in range(0, 400, 2):
            state.set_value("ball", n)
            ours.send(n)
            assert ours.poll(10) and ours.recv()
            assert state.get_value("ball") == n + 1
            assert state["ball"] == n + 1  # and again, from the cache
        ours.send(None)
        proc.join(10)
        assert proc.exitcode == 0
    finally:
        _reap(proc)


def test_incr_from_four_processes_of_2500_each_is_exact(server: Server) -> None:
    def body(state: TaskiqState, _: int) -> None:
        for _ in range(2500):
            state.incr("hits")
        state.incr("floats", 0.5)

    run_in_processes(server.connect, 4, body)
    state = server.connect()
    assert state.get_value("hits") == 10_000
    assert state.get_value("floats") == 2.0


def test_update_runs_its_function_once_per_call_in_the_server(
    server: Server, tmp_path: Path
) -> None:
    calls = tmp_path / "calls"

    def body(state: TaskiqState, index: int) -> None:
        for n in range(100):

            def add(old: int, n: int = n) -> int:
                with open(calls, "a") as out:
                    out.write(f"{os.getpid()}\n")
                return old + 1

            assert state.update("total", add, default=0) >= 1

    run_in_processes(server.connect, 4, body)
    runners = calls.read_text().splitlines()
    assert len(runners) == 400
    assert set(runners) == {str(server.handle.pid)}, "update's fn runs in the state server"
    assert server.connect().get_value("total") == 400


def test_an_update_whose_function_raises_changes_nothing_and_blocks_no_one(
    server: Server,
) -> None:
    state = server.connect()
    state.set_value("config", {"v": 1})

    def broken(old: Any) -> Any:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        state.update("config", broken)
    other = server.connect()
    assert other.get_value("config") == {"v": 1}
    other.set_value("config", {"v": 2})  # the writer mutex was given back
    assert state.get_value("config") == {"v": 2}


@contextmanager
def a_process_holding(server: Server, name: str) -> Iterator[Any]:
    """A child process that took lock ``name`` and waits (to be killed); reaped after."""
    taken = CTX.Event()

    def holder() -> None:
        server.connect().lock(name).acquire()
        taken.set()
        CTX.Event().wait(60)

    proc = CTX.Process(target=holder)
    proc.start()
    try:
        assert taken.wait(10)
        yield proc
    finally:
        _reap(proc)


def test_a_lock_whose_holder_was_sigkilled_is_released_to_a_waiter(server: Server) -> None:
    with a_process_holding(server, "job") as proc:
        state = server.connect()
        lock = state.lock("job")
        assert lock.acquire(timeout=0.05) is False
        # SIGKILLed and not reaped yet: a zombie. The server still decides it is dead.
        os.kill(proc.pid, signal.SIGKILL)
        assert lock.acquire(timeout=20) is True
        assert server.connect().lock("job").acquire(timeout=0.05) is False
        lock.release()
        assert server.connect().lock("job").acquire(timeout=1) is True


def test_the_servers_reaper_releases_a_dead_owners_lock_with_no_one_waiting(
    server: Server,
) -> None:
    with a_process_holding(server, "orphan") as proc:
        shm = server.connect()._shared._shm  # type: ignore[attr-defined]
        assert [owner_pid(owner) for _, owner in shm.held_locks()] == [proc.pid]
        proc.kill()
        proc.join(10)
        wait_for(lambda: shm.held_locks() == [], 10, "the reaper's round")


def test_a_writer_killed_inside_its_write_transaction_blocks_no_one(server: Server) -> None:
    """LMDB's writer mutex is robust: the dead writer's transaction is rolled back, and a
    version it stored but never committed is not served from anyone's cache."""
    state = server.connect()
    state.set_value("k", "before")
    assert state.get_value("k") == "before"  # cached
    inside = CTX.Event()

    def writer() -> None:
        from shared_state.shm import locate

        shm = server.connect()._shared._shm  # type: ignore[attr-defined]
        kb, slot = locate("k")
        txn = shm._write()
        txn.put(kb, b"p" + __import__("pickle").dumps("never"))
        shm.slots[slot] = txn.id()  # what a set does just before it commits
        inside.set()
        CTX.Event().wait(60)

    proc = CTX.Process(target=writer)
    proc.start()
    try:
        assert inside.wait(10)
        os.kill(proc.pid, signal.SIGKILL)
        proc.join(10)
        assert state.get_value("k") == "before"
        other = server.connect()
        assert other.get_value("k") == "before"
        other.set_value("k", "after")  # the mutex was recovered
        assert state.get_value("k") == "after"
        assert state.incr("n") == 1
    finally:
        _reap(proc)


def test_a_state_keeps_working_in_a_forked_child_and_in_its_parent(server: Server) -> None:
    state = server.connect()
    state.set_value("from", "parent")
    assert state.get_value("from") == "parent"  # the parent has the store open

    def child(_: TaskiqState, __: int) -> None:
        assert state.get_value("from") in ("parent", "child")  # children run at once
        state.set_value("from", "child")
        with state.lock("fork"):
            state.incr("children")

    run_in_processes(lambda: state, 3, child)
    assert state.get_value("from") == "child"
    assert state.get_value("children") == 3
    state.set_value("from", "parent again")
    assert server.connect().get_value("from") == "parent again"


def test_long_empty_and_unusual_keys_are_keys_like_any(server: Server) -> None:
    state, other = server.connect(), server.connect()
    keys = ["", "x" * 5000, "ключ", "\udcff", "a\x00b"]
    for n, key in enumerate(keys):
        state.set_value(key, n)
    assert [other.get_value(key) for key in keys] == list(range(len(keys)))
    assert sorted(other.keys()) == sorted(keys) and len(other) == len(keys)
    assert other.incr("x" * 5000) == 2
    assert other.update("x" * 5000, lambda old: old * 10) == 20
    assert dict(other.items())["x" * 5000] == 20
    with other.lock("y" * 5000):
        assert state.lock("y" * 5000).acquire(timeout=0.05) is False
    other.delete_value("x" * 5000)
    assert "x" * 5000 not in state
    state.clear()
    assert other.keys() == [] and other.get_value("") is None


def test_the_store_lives_beside_the_version_file_mode_0600_and_goes_with_the_server() -> None:
    with serving() as srv:
        paths = files_of(srv.versions)
        for path in paths:
            assert Path(path).parent == Path(srv.versions).parent
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        srv.connect().set_value("x", 1)
        srv.handle.shutdown()
        assert not any(os.path.exists(path) for path in paths)


def test_a_new_server_starts_with_an_empty_store(tmp_path: Path) -> None:
    with serving() as first:
        first.connect().set_value("left", "over")
        versions = first.versions
        # a pool SIGKILLed leaves its files; the next one on the run directory clears them
        # (hard links keep the files: the store may be symlinks to a memory filesystem)
        kept = {}
        for path in files_of(versions):
            real, linked = os.path.realpath(path), os.path.islink(path)
            copy = real + ".kept" if linked else str(tmp_path / Path(path).name)
            kept[path] = (real, copy, linked)
            os.link(real, copy)
    short = Path(versions).parent
    short.mkdir(mode=0o700)
    try:
        for path, (real, copy, linked) in kept.items():
            os.rename(copy, real)  # real is path itself when not linked
            if linked:
                os.symlink(real, path)
        srv = Server(short)
        try:
            assert srv.connect().keys() == []
            assert srv.connect().get_value("left") is None
        finally:
            srv.handle.shutdown()
    finally:
        for child in short.iterdir():
            child.unlink()
        short.rmdir()


def test_the_pools_store_is_in_its_run_dir_mode_0600_and_removed_with_the_pool() -> None:
    with RunningPool(workers=2) as running:
        run_dir = Path(running.run_dir)
        paths = files_of(str(run_dir / "state.ver"))
        for path in paths:
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert running.stats()["state"]["keys"] >= 0
        assert running.stop() == 0
        assert not any(os.path.exists(path) for path in paths)


def test_threads_of_one_process_share_the_store_from_their_first_call(server: Server) -> None:
    import threading

    state = server.connect()  # nothing opened yet: the threads race to open the store
    errors: list[BaseException] = []

    def body() -> None:
        try:
            for i in range(500):
                state.incr("n")
                with state.lock("shared"):
                    state.set_value("last", i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=body) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == [] and not any(thread.is_alive() for thread in threads)
    assert server.connect().get_value("n") == 2000


def test_many_lock_names_over_time_fit_in_the_lock_table(server: Server) -> None:
    from shared_state.versions import LOCK_SLOTS

    state = server.connect()
    outer = state.lock("outer")
    outer.acquire()
    for n in range(LOCK_SLOTS + 100):  # each name once: the table compacts as it fills
        with state.lock(f"item:{n}"):
            pass
    assert server.connect().lock("outer").acquire(timeout=0.05) is False  # still held
    outer.release()
    assert server.connect().lock("outer").acquire(timeout=1) is True


def test_the_store_pages_live_in_memory_not_under_the_run_directory() -> None:
    """With a memory filesystem, the run directory holds links only: a full disk there
    cannot make a write through the mapping fail (SIGBUS)."""
    from shared_state.shm import SHM_DIR

    if not os.path.isdir(SHM_DIR):
        pytest.skip(f"no {SHM_DIR} here: the store lives in the run directory")
    with serving() as srv:
        srv.connect().set_value("x", 1)
        for path in files_of(srv.versions):
            assert os.path.islink(path)
            target = os.readlink(path)
            assert os.path.dirname(target) == SHM_DIR
            assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
        targets = [os.readlink(path) for path in files_of(srv.versions)]
        srv.handle.shutdown()
        assert not any(os.path.exists(target) for target in targets)


def test_a_supervisor_killed_with_sigkill_leaves_no_store_in_memory() -> None:
    import signal

    from shared_state.shm import SHM_DIR

    if not os.path.isdir(SHM_DIR):
        pytest.skip(f"no {SHM_DIR} here: the store lives in the run directory")
    with RunningPool(workers=1) as running:
        links = files_of(str(Path(running.run_dir) / "state.ver"))
        targets = [os.readlink(path) for path in links]
        assert all(os.path.exists(target) for target in targets)
        running.signal(signal.SIGKILL)
        wait_for(lambda: not any(os.path.exists(t) for t in targets), 20, "the store's files gone")
