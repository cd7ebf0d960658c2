"""Shared state from a worker: TaskiqState vs a plain ``multiprocess`` Manager dict proxy.

Each figure is the median over batches of the per-operation time, in microseconds.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench.stats import median

BATCH = 200


def _per_op_us(fn: Callable[[int], Any], rounds: int) -> float:
    samples = []
    for _ in range(max(1, rounds // BATCH)):
        start = time.perf_counter()
        for i in range(BATCH):
            fn(i)
        samples.append((time.perf_counter() - start) / BATCH * 1e6)
    return median(samples)


def time_state(state: Any, rounds: int) -> dict[str, float]:
    """get of an unchanged key, set, incr on a ``TaskiqState``."""
    state.set_value("bench:config", {"debug": False, "name": "bench"})
    state.set_value("bench:n", 1)
    state.get_value("bench:n")
    return {
        "get_unchanged_us": _per_op_us(lambda i: state.get_value("bench:n"), rounds * 10),
        "get_unchanged_dict_us": _per_op_us(lambda i: state.get_value("bench:config"), rounds * 10),
        "set_us": _per_op_us(lambda i: state.set_value("bench:s", i), rounds),
        "incr_us": _per_op_us(lambda i: state.incr("bench:c"), rounds),
    }


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

        return {
            "get_unchanged_us": _per_op_us(lambda i: shared["bench:n"], rounds),
            "get_unchanged_dict_us": _per_op_us(lambda i: shared["bench:config"], rounds),
            "set_us": _per_op_us(lambda i: shared.__setitem__("bench:s", i), rounds),
            "incr_us": _per_op_us(incr, rounds),
        }


def time_state_standalone(rounds: int) -> dict[str, float]:
    """Our state served by a state server, timed from this (client) process."""
    from shared_state import connect_state, start_state_server

    with tempfile.TemporaryDirectory(prefix="sb-", dir="/tmp") as tmp:
        key = os.urandom(32)
        server = start_state_server(f"{tmp}/s.sock", key, f"{tmp}/v")
        try:
            return time_state(connect_state(f"{tmp}/s.sock", key, f"{tmp}/v"), rounds)
        finally:
            server.shutdown()


def time_redis(rounds: int, url: str = "redis://127.0.0.1:6379/0") -> dict[str, float]:
    """Plain redis-py GET / SET / INCR on the local Redis, for scale."""
    import uuid

    import redis

    client = redis.Redis.from_url(url)
    key = f"bench-state-{uuid.uuid4().hex[:8]}"
    try:
        client.set(f"{key}:n", 1)
        return {
            "get_unchanged_us": _per_op_us(lambda i: client.get(f"{key}:n"), rounds),
            "set_us": _per_op_us(lambda i: client.set(f"{key}:s", i), rounds),
            "incr_us": _per_op_us(lambda i: client.incr(f"{key}:c"), rounds),
        }
    finally:
        client.delete(f"{key}:n", f"{key}:s", f"{key}:c")
        client.close()


def run(rounds: int = 5000) -> dict[str, dict[str, float]]:
    return {
        "pool_state": time_state_standalone(rounds),
        "manager_dict": time_manager(rounds),
        "redis": time_redis(rounds),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=1))
