"""The limit of pool's embedded topology on this machine: the same processes and hops with
nothing but the essentials, to measure pool's throughput and round trip against.

A producer sends no-op tasks to a relay over a Unix socket; the relay hands them to 2
workers and routes each result back to the producer that sent the task. Like pool:

- every message is JSON in a length-prefixed frame, with the task's id in a fixed header
  the relay reads to route its result (the relay never parses the JSON);
- the producer writes each task when it is sent (one write each, as a ``kiq`` must), and
  decodes and checks every result;
- the relay and the workers write what one read produced in one write per peer; relay and
  workers run on uvloop, the producer on asyncio's default loop (as pool's bench producer).

Left out, because they are what pool adds: taskiq's message, kicker and receiver, the
journal, acknowledgements, the shared state, events, stats and every check of a peer.

It also measures what this machine charges for a wake-up (:func:`measure`), which bounds
the round trip of any topology of four processes.

Reproduce: ``python -m bench.limit``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.stats import median, percentile

ROOT = Path(__file__).resolve().parent.parent
_HEAD = struct.Struct("!I")
_ID = 32  # a task id: uuid4's 32 hex digits


def _frames(buffer: bytearray) -> list[bytes]:
    """Take the whole frames off the front of ``buffer``."""
    out, pos, size = [], 0, len(buffer)
    while size - pos >= 4:
        (length,) = _HEAD.unpack_from(buffer, pos)
        if size - pos - 4 < length:
            break
        out.append(bytes(buffer[pos + 4 : pos + 4 + length]))
        pos += 4 + length
    del buffer[:pos]
    return out


def _frame(body: bytes) -> bytes:
    return _HEAD.pack(len(body)) + body


class _Framed(asyncio.Protocol):
    def __init__(self, on_frames: Callable[[_Framed, list[bytes]], None]) -> None:
        self.buffer = bytearray()
        self.on_frames = on_frames
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        frames = _frames(self.buffer)
        if frames:
            self.on_frames(self, frames)


# --------------------------------------------------------------------------- relay
async def _relay(run_dir: str, expected: int) -> None:
    """Serves producers once ``expected`` workers are connected (its socket appears)."""
    workers: list[_Framed] = []
    all_connected = asyncio.Event()
    origin: dict[bytes, _Framed] = {}  # task id -> the producer connection that sent it
    turn = [0]

    def from_producer(conn: _Framed, frames: list[bytes]) -> None:
        batches: list[list[bytes]] = [[] for _ in workers]
        for body in frames:
            origin[body[:_ID]] = conn
            batches[turn[0]].append(_frame(body))
            turn[0] = (turn[0] + 1) % len(workers)
        for worker, batch in zip(workers, batches, strict=True):
            if batch and worker.transport is not None:
                worker.transport.write(b"".join(batch))

    def from_worker(conn: _Framed, frames: list[bytes]) -> None:
        out: dict[_Framed, list[bytes]] = {}
        for body in frames:
            producer = origin.pop(body[:_ID])
            out.setdefault(producer, []).append(_frame(body))
        for producer, batch in out.items():
            if producer.transport is not None:
                producer.transport.write(b"".join(batch))

    loop = asyncio.get_running_loop()

    def worker_conn() -> _Framed:
        conn = _Framed(from_worker)
        workers.append(conn)
        if len(workers) == expected:
            all_connected.set()
        return conn

    await loop.create_unix_server(worker_conn, f"{run_dir}/workers.sock")
    await all_connected.wait()
    await loop.create_unix_server(lambda: _Framed(from_producer), f"{run_dir}/producers.sock")
    await asyncio.Event().wait()


# --------------------------------------------------------------------------- worker
async def _worker(run_dir: str) -> None:
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def on_tasks(conn: _Framed, frames: list[bytes]) -> None:
        out = []
        for body in frames:
            message = json.loads(body[_ID:])
            result = {"is_err": False, "return_value": None, "task_id": message["task_id"]}
            out.append(_frame(body[:_ID] + json.dumps(result).encode()))
        assert conn.transport is not None
        conn.transport.write(b"".join(out))

    class Worker(_Framed):
        def connection_lost(self, exc: Exception | None) -> None:
            done.set_result(None)

    await loop.create_unix_connection(lambda: Worker(on_tasks), f"{run_dir}/workers.sock")
    await done


# --------------------------------------------------------------------------- producer
class Producer:
    """Sends no-op tasks and waits for their results, each checked."""

    def __init__(self) -> None:
        self.waiting: dict[bytes, asyncio.Future[Any]] = {}
        self.conn: _Framed | None = None

    async def connect(self, run_dir: str) -> None:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_unix_connection(
            lambda: _Framed(self._on_results), f"{run_dir}/producers.sock"
        )
        self.conn = conn

    def _on_results(self, conn: _Framed, frames: list[bytes]) -> None:
        for body in frames:
            result = json.loads(body[_ID:])
            if result["is_err"]:
                raise RuntimeError(f"task {result['task_id']} failed")
            self.waiting.pop(body[:_ID]).set_result(result["return_value"])

    def send(self) -> asyncio.Future[Any]:
        task_id = uuid.uuid4().hex
        message = {"task_id": task_id, "task_name": "noop", "labels": {}, "args": [],
                   "kwargs": {}}  # fmt: skip
        key = task_id.encode()
        future = asyncio.get_running_loop().create_future()
        self.waiting[key] = future
        assert self.conn is not None and self.conn.transport is not None
        self.conn.transport.write(_frame(key + json.dumps(message).encode()))
        return future


async def _throughput(producer: Producer, total: int, batch: int = 1000) -> float:
    start = time.perf_counter()
    for offset in range(0, total, batch):
        futures = [producer.send() for _ in range(min(batch, total - offset))]
        for future in futures:
            await future
    return total / (time.perf_counter() - start)


async def _round_trips(producer: Producer, count: int) -> dict[str, float]:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        await producer.send()
        samples.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": median(samples), "p99_ms": percentile(samples, 99)}


def _spawn(role: str, run_dir: str, workers: int = 0) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, "-m", "bench.limit", "--role", role, "--run-dir", run_dir,
            "--workers", str(workers)]  # fmt: skip
    return subprocess.Popen(argv, cwd=str(ROOT), env=env)


async def _wait_for(path: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not appear")
        await asyncio.sleep(0.01)


@contextlib.contextmanager
def on_one_cpu() -> Iterator[None]:
    """This process, and every process it starts meanwhile, on its first CPU only."""
    mask = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(mask)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, mask)


def wake_cost(across_cpus: bool, rounds: int = 3000) -> float | None:
    """Median µs of one round of 40 bytes between two processes over a socket pair (two
    wake-ups), both pinned to one CPU or each to its own; None without a second CPU. The
    sender idles 0.3 ms between rounds, as the processes of a round trip do."""
    mask = os.sched_getaffinity(0)
    if across_cpus and len(mask) < 2:
        return None
    mine, theirs = sorted(mask)[:2] if across_cpus else (min(mask), min(mask))
    ours, peer = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the echo: nothing but recv and send, then out without any cleanup
        try:
            ours.close()
            os.sched_setaffinity(0, {theirs})
            while data := peer.recv(64):
                peer.send(data)
        finally:
            os._exit(0)
    peer.close()
    samples = []
    try:
        os.sched_setaffinity(0, {mine})
        for _ in range(rounds):
            start = time.perf_counter()
            ours.send(b"x" * 40)
            ours.recv(64)
            samples.append((time.perf_counter() - start) * 1e6)
            time.sleep(0.0003)
    finally:
        os.sched_setaffinity(0, mask)
        ours.close()
        os.waitpid(pid, 0)
    return median(samples)


async def measure(
    workers: int = 2, total: int = 30_000, calls: int = 1000, rounds: int = 3
) -> dict[str, Any]:
    """:func:`measure_topology`, then what this machine charges for a wake-up: the limit's
    round trip with every process on one CPU, and :func:`wake_cost` on one CPU and across
    two (on a VM whose idle CPUs halt, a wake-up across CPUs can cost several times one
    on the same CPU, which no code of pool's can avoid)."""
    figures = await measure_topology(workers, total, calls, rounds)
    with on_one_cpu():
        figures["one_cpu_p50_ms"] = (await measure_topology(workers, 2000, calls, 1))["p50_ms"]
    figures["wake_us"] = {"same_cpu": wake_cost(False), "across_cpus": wake_cost(True)}
    return figures


async def measure_topology(
    workers: int = 2, total: int = 30_000, calls: int = 1000, rounds: int = 3
) -> dict[str, Any]:
    """Throughput and CPU µs per task of each process (medians of ``rounds`` runs of
    ``total`` tasks: a run takes well under a second, and psutil counts 10 ms ticks), and
    the sequential round trip."""
    import psutil

    run_dir = tempfile.mkdtemp(prefix="pb-limit-", dir="/tmp")
    relay = _spawn("relay", run_dir, workers)
    children: list[subprocess.Popen[bytes]] = [relay]
    try:
        await _wait_for(f"{run_dir}/workers.sock", relay)
        children += [_spawn("worker", run_dir) for _ in range(workers)]
        await _wait_for(f"{run_dir}/producers.sock", relay)  # every worker is connected
        producer = Producer()
        await producer.connect(run_dir)
        await asyncio.wait_for(_throughput(producer, 2000), 60)  # warm up
        procs = {"producer": psutil.Process(), "relay": psutil.Process(relay.pid)}
        procs.update({f"worker {i}": psutil.Process(c.pid) for i, c in enumerate(children[1:])})

        def cpu() -> dict[str, float]:
            return {k: p.cpu_times().user + p.cpu_times().system for k, p in procs.items()}

        rates, cpus = [], []
        for _ in range(rounds):
            before = cpu()
            rates.append(await asyncio.wait_for(_throughput(producer, total), 120))
            after = cpu()
            cpus.append({k: (after[k] - before[k]) / total * 1e6 for k in procs})
        cpu_us = {k: median([c[k] for c in cpus]) for k in procs}
        cpu_us["total"] = sum(cpu_us.values())
        latency = await asyncio.wait_for(_round_trips(producer, calls), 120)
    finally:
        for child in children:
            child.kill()
            child.wait()
        shutil.rmtree(run_dir, ignore_errors=True)
    return {"throughput_tasks_per_s": median(rates), "cpu_us_per_task": cpu_us, **latency}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.limit", description=__doc__)
    parser.add_argument("--role", choices=("relay", "worker"), help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tasks", type=int, default=30_000)
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args()
    if args.role:
        import uvloop

        if args.role == "relay":
            uvloop.run(_relay(args.run_dir, args.workers))
        else:
            uvloop.run(_worker(args.run_dir))
        return
    fig = asyncio.run(measure(args.workers, args.tasks, args.calls))
    print(json.dumps(fig, indent=1))


if __name__ == "__main__":
    main()
