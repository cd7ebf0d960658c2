"""Shared state from a worker: pool's TaskiqState beside raw LMDB, a Manager dict and Redis.

Each figure is the median, in microseconds, over batches of the per-operation time (a
changed get: the median of single reads, each just after another process changed the key).
Operations: ``get_unchanged`` (a key nobody changed since this process read it), ``set``,
``incr``, ``get_changed`` (a key another process just changed), ``lock`` (take and release
an uncontended lock).

    .venv/bin/python -m bench.state_bench [--rounds N] [--no-redis]
"""

from __future__ import annotations

import os
import pickle
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from bench.stats import median

BATCH = 200
OPERATIONS = ("get_unchanged", "set", "incr", "get_changed", "lock")


def _per_op_us(fn: Callable[[int], Any], rounds: int) -> float:
    samples = []
    for _ in range(max(1, rounds // BATCH)):
        start = time.perf_counter()
        for i in range(BATCH):
            fn(i)
        samples.append((time.perf_counter() - start) / BATCH * 1e6)
    return median(samples)


def _changed_get_us(change: Callable[[int], None], read: Callable[[], Any], rounds: int) -> float:
    """Median of ``read()`` just after another process ran ``change(i)``.

    The other process is forked here and changes the value when told through a pipe, so
    the pipe's round trip is outside the timed read.
    """
    import multiprocess

    ctx = multiprocess.get_context("fork")
    ours, theirs = ctx.Pipe()

    def writer() -> None:
        while True:
            i = theirs.recv()
            if i is None:
                return
            change(i)
            theirs.send(True)

    proc = ctx.Process(target=writer, daemon=True)
    proc.start()
    samples = []
    try:
        read()
        for i in range(rounds):
            ours.send(i)
            ours.recv()
            start = time.perf_counter()
            read()
            samples.append((time.perf_counter() - start) * 1e6)
        ours.send(None)
        proc.join(10)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    return median(samples)


def time_state(state: Any, rounds: int) -> dict[str, float]:
    """get of an unchanged key, set, incr, lock on a ``TaskiqState`` (from any process)."""
    state.set_value("bench:config", {"debug": False, "name": "bench"})
    state.set_value("bench:n", 1)
    state.get_value("bench:n")
    state.get_value("bench:config")

    def lock(_: int) -> None:
        with state.lock("bench:lock"):
            pass

    return {
        "get_unchanged_us": _per_op_us(lambda i: state.get_value("bench:n"), rounds * 10),
        "get_unchanged_dict_us": _per_op_us(lambda i: state.get_value("bench:config"), rounds * 10),
        "set_us": _per_op_us(lambda i: state.set_value("bench:s", i), rounds),
        "incr_us": _per_op_us(lambda i: state.incr("bench:c"), rounds),
        "lock_us": _per_op_us(lock, rounds),
    }


@contextmanager
def _state_server() -> Iterator[Callable[[], Any]]:
    from shared_state import connect_state, start_state_server

    with tempfile.TemporaryDirectory(prefix="sb-", dir="/tmp") as tmp:
        key = os.urandom(32)
        server = start_state_server(f"{tmp}/s.sock", key, f"{tmp}/v")
        try:
            yield lambda: connect_state(f"{tmp}/s.sock", key, f"{tmp}/v")
        finally:
            server.shutdown()


def time_state_standalone(rounds: int) -> dict[str, float]:
    """Our state served by a state server, timed from this (client) process."""
    with _state_server() as connect:
        state = connect()
        figures = time_state(state, rounds)
        state.set_value("bench:changed", 0)
        writer: list[Any] = []  # the other process's own client, made there once

        def change(i: int) -> None:
            if not writer:
                writer.append(connect())
            writer[0].set_value("bench:changed", i)

        figures["get_changed_us"] = _changed_get_us(
            change, lambda: state.get_value("bench:changed"), rounds
        )
        return figures


def time_lmdb(rounds: int) -> dict[str, float]:
    """Raw py-lmdb, configured as pool's store: the shared-memory floor.

    Values are pickled as pool's are; ``lock`` is LMDB's writer mutex (an empty write
    transaction), the cheapest cross-process lock it offers.
    """
    import lmdb

    with tempfile.TemporaryDirectory(prefix="sbl-", dir="/tmp") as tmp:
        path = f"{tmp}/data.mdb"
        options: dict[str, Any] = {
            "subdir": False,
            "map_size": 1 << 28,
            "writemap": True,
            "sync": False,
            "metasync": False,
            "max_dbs": 2,
        }
        env = lmdb.open(path, **options)
        db = env.open_db(b"values")

        def put(key: bytes, value: Any) -> None:
            with env.begin(write=True, db=db) as txn:
                txn.put(key, pickle.dumps(value, protocol=5))

        def get(key: bytes) -> Any:
            with env.begin(db=db) as txn:
                return pickle.loads(txn.get(key))

        def incr(_: int) -> None:
            with env.begin(write=True, db=db) as txn:
                blob = txn.get(b"c")
                txn.put(b"c", pickle.dumps((0 if blob is None else pickle.loads(blob)) + 1, 5))

        def lock(_: int) -> None:
            with env.begin(write=True):
                pass

        put(b"n", 1)
        writer: list[Any] = []

        def change(i: int) -> None:
            # the forked writer opens its own environment (LMDB's rule; pool's way around
            # py-lmdb's guard against a second open in what it takes for the same process)
            if not writer:
                from shared_state.shm import _per_process_identity

                _per_process_identity()
                mine = lmdb.open(path, **options)
                writer.append((mine, mine.open_db(b"values")))
            mine, mine_db = writer[0]
            with mine.begin(write=True, db=mine_db) as txn:
                txn.put(b"x", pickle.dumps(i, protocol=5))

        put(b"x", 0)
        figures = {
            "get_unchanged_us": _per_op_us(lambda i: get(b"n"), rounds * 10),
            "set_us": _per_op_us(lambda i: put(b"s", i), rounds),
            "incr_us": _per_op_us(incr, rounds),
            "lock_us": _per_op_us(lock, rounds),
            "get_changed_us": _changed_get_us(change, lambda: get(b"x"), rounds),
        }
        env.close()
        return figures


def time_manager(rounds: int) -> dict[str, float]:
    """The same operations on a Manager dict proxy; incr is get + set under a Manager lock."""
    import multiprocess

    with multiprocess.Manager() as manager:
        shared = manager.dict()
        lock = manager.Lock()
        shared["bench:n"] = 1
        shared["bench:config"] = {"debug": False, "name": "bench"}

        def incr(_: int) -> None:
            with lock:
                shared["bench:c"] = shared.get("bench:c", 0) + 1

        def take(_: int) -> None:
            with lock:
                pass

        return {
            "get_unchanged_us": _per_op_us(lambda i: shared["bench:n"], rounds),
            "get_unchanged_dict_us": _per_op_us(lambda i: shared["bench:config"], rounds),
            "set_us": _per_op_us(lambda i: shared.__setitem__("bench:s", i), rounds),
            "incr_us": _per_op_us(incr, rounds),
            "lock_us": _per_op_us(take, rounds),
            # every get of a proxy asks the manager: a changed key costs what any get does
            "get_changed_us": _per_op_us(lambda i: shared["bench:n"], rounds),
        }


def time_redis(rounds: int, url: str = "redis://127.0.0.1:6379/0") -> dict[str, float]:
    """Plain redis-py GET / SET / INCR (and SET NX + DEL as a lock) on the local Redis."""
    import uuid

    import redis

    client = redis.Redis.from_url(url)
    key = f"bench-state-{uuid.uuid4().hex[:8]}"

    def lock(_: int) -> None:
        client.set(f"{key}:l", "me", nx=True, px=10_000)
        client.delete(f"{key}:l")

    try:
        client.set(f"{key}:n", 1)
        return {
            "get_unchanged_us": _per_op_us(lambda i: client.get(f"{key}:n"), rounds),
            "set_us": _per_op_us(lambda i: client.set(f"{key}:s", i), rounds),
            "incr_us": _per_op_us(lambda i: client.incr(f"{key}:c"), rounds),
            "lock_us": _per_op_us(lock, rounds),
            "get_changed_us": _per_op_us(lambda i: client.get(f"{key}:n"), rounds),
        }
    finally:
        client.delete(f"{key}:n", f"{key}:s", f"{key}:c", f"{key}:l")
        client.close()


def run(rounds: int = 5000, redis: bool = True) -> dict[str, dict[str, float]]:
    results = {
        "pool_state": time_state_standalone(rounds),
        "lmdb": time_lmdb(rounds),
        "manager_dict": time_manager(rounds),
    }
    if redis:
        try:
            results["redis"] = time_redis(rounds)
        except Exception as exc:  # no Redis here: the other figures still stand
            print(f"redis skipped: {exc}")
    return results


def table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table: µs per operation, and pool's state over raw LMDB."""
    names = [n for n in ("pool_state", "lmdb", "manager_dict", "redis") if n in results]
    lines = [
        "| operation | " + " | ".join(f"{n} µs" for n in names) + " | pool / lmdb |",
        "|---" * (len(names) + 2) + "|",
    ]
    for op in OPERATIONS:
        key = f"{op}_us"
        cells = [f"{results[n][key]:.2f}" if key in results[n] else "" for n in names]
        ratio = results["pool_state"][key] / results["lmdb"][key]
        lines.append(f"| {op} | " + " | ".join(cells) + f" | {ratio:.1f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5000)
    parser.add_argument("--no-redis", action="store_true")
    args = parser.parse_args()
    figures = run(args.rounds, redis=not args.no_redis)
    print(json.dumps(figures, indent=1))
    print(table(figures))
