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


def _changed_gets_us(
    change: Callable[[str, int], None], reads: dict[str, Callable[[], Any]], rounds: int
) -> dict[str, float]:
    """Median of each ``reads[side]()`` just after another process ran ``change(side, i)``.

    The other process is forked here and changes the value when told through a pipe, so
    the pipe's round trip is outside the timed read; the sides take turns, read by read.
    """
    import multiprocess

    ctx = multiprocess.get_context("fork")
    ours, theirs = ctx.Pipe()

    def writer() -> None:
        while True:
            order = theirs.recv()
            if order is None:
                return
            change(*order)
            theirs.send(True)

    proc = ctx.Process(target=writer, daemon=True)
    proc.start()
    samples: dict[str, list[float]] = {side: [] for side in reads}
    try:
        for read in reads.values():
            read()
        for i in range(rounds):
            for side, read in reads.items():
                ours.send((side, i))
                ours.recv()
                start = time.perf_counter()
                read()
                samples[side].append((time.perf_counter() - start) * 1e6)
        ours.send(None)
        proc.join(10)
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(5)
    return {side: median(values) for side, values in samples.items()}


def time_state(state: Any, rounds: int) -> dict[str, float]:
    """get of an unchanged key, set, incr, lock on a ``TaskiqState`` (from any process)."""
    return {
        f"{name}_us": _per_op_us(fn, rounds * 10 if name.startswith("get_") else rounds)
        for name, fn in _state_ops(state).items()
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


def _interleaved(
    sides: dict[str, dict[str, Callable[[int], Any]]], rounds: dict[str, int]
) -> dict[str, dict[str, float]]:
    """Per side, the median µs of each operation, the sides taking turns batch by batch (so
    that the load of a shared machine weighs on each side alike)."""
    samples: dict[str, dict[str, list[float]]] = {side: {} for side in sides}
    for op, count in rounds.items():
        for _ in range(max(1, count // BATCH)):
            for side, ops in sides.items():
                fn = ops[op]
                start = time.perf_counter()
                for i in range(BATCH):
                    fn(i)
                took = (time.perf_counter() - start) / BATCH * 1e6
                samples[side].setdefault(f"{op}_us", []).append(took)
    return {
        side: {key: median(values) for key, values in ops.items()} for side, ops in samples.items()
    }


def _state_ops(state: Any) -> dict[str, Callable[[int], Any]]:
    state.set_value("bench:config", {"debug": False, "name": "bench"})
    state.set_value("bench:n", 1)
    state.get_value("bench:n")
    state.get_value("bench:config")

    def lock(_: int) -> None:
        with state.lock("bench:lock"):
            pass

    return {
        "get_unchanged": lambda i: state.get_value("bench:n"),
        "get_unchanged_dict": lambda i: state.get_value("bench:config"),
        "set": lambda i: state.set_value("bench:s", i),
        "incr": lambda i: state.incr("bench:c"),
        "lock": lock,
    }


_LMDB_OPTIONS: dict[str, Any] = {
    "subdir": False,
    "map_size": 1 << 28,
    "writemap": True,
    "sync": False,
    "metasync": False,
    "max_dbs": 2,
}


def _lmdb_ops(env: Any, db: Any) -> dict[str, Callable[[int], Any]]:
    """Raw py-lmdb, configured as pool's store: the shared-memory floor.

    Values are pickled as pool's are; ``lock`` is LMDB's writer mutex (an empty write
    transaction), the cheapest cross-process lock it offers; ``get_unchanged`` has no cache
    to serve it: it is a read transaction and an unpickling.
    """

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
    put(b"x", 0)
    return {
        "get_unchanged": lambda i: get(b"n"),
        "set": lambda i: put(b"s", i),
        "incr": incr,
        "lock": lock,
        "get_changed": lambda i: get(b"x"),
    }


def time_pool_and_lmdb(rounds: int) -> dict[str, dict[str, float]]:
    """pool's state (served by a state server, timed from a client process) and raw LMDB,
    side by side."""
    import lmdb

    from shared_state.shm import _per_process_identity

    with _state_server() as connect, tempfile.TemporaryDirectory(prefix="sbl-") as tmp:
        path = f"{tmp}/data.mdb"
        env = lmdb.open(path, **_LMDB_OPTIONS)
        db = env.open_db(b"values")
        state = connect()
        sides = {"pool_state": _state_ops(state), "lmdb": _lmdb_ops(env, db)}
        figures = _interleaved(
            sides,
            {"get_unchanged": rounds * 10, "set": rounds, "incr": rounds, "lock": rounds},
        )
        figures["pool_state"]["get_unchanged_dict_us"] = _interleaved(
            {"pool_state": sides["pool_state"]}, {"get_unchanged_dict": rounds * 10}
        )["pool_state"]["get_unchanged_dict_us"]
        state.set_value("bench:changed", 0)
        writers: list[Any] = []  # the other process's own clients, made there once

        def change(side: str, i: int) -> None:
            if not writers:
                _per_process_identity()  # LMDB's rule: a child opens its own environment
                mine = lmdb.open(path, **_LMDB_OPTIONS)
                writers.extend([connect(), mine, mine.open_db(b"values")])
            if side == "pool_state":
                writers[0].set_value("bench:changed", i)
            else:
                with writers[1].begin(write=True, db=writers[2]) as txn:
                    txn.put(b"x", pickle.dumps(i, protocol=5))

        changed = _changed_gets_us(
            change,
            {
                "pool_state": lambda: state.get_value("bench:changed"),
                "lmdb": lambda: sides["lmdb"]["get_changed"](0),
            },
            rounds,
        )
        for side, value in changed.items():
            figures[side]["get_changed_us"] = value
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
    results = {**time_pool_and_lmdb(rounds), "manager_dict": time_manager(rounds)}
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
