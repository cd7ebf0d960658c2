"""What one connection, or one result, can make the supervisor hold is bounded.

Each test measures the fault it guards against: the supervisor's RSS (psutil), the
connections it keeps open, the workers it loses. Waits are bounded and wait for an event
(a socket closing, a log line, a result), never for time to pass.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import pytest

from pool import PoolBroker
from pool.extensions.handles import PoolKicker
from pool.runtime.client import connect
from pool.runtime.control import MAX_UNAUTHENTICATED, MAX_UNREAD
from pool.runtime.protocol import Subscribe
from pool.runtime.rundir import RunDir
from tests.pool_support import RunningPool, wait_for

pytestmark = pytest.mark.timeout(180)

MiB = 1024 * 1024
APP = "bounds_app"
HANDSHAKE = 2.5  # POOL_HANDSHAKE_TIMEOUT of these pools, in seconds
CHALLENGE_BYTES = 41  # [u32 size][u8 op][u32 length][32-byte nonce]


def bounds_pool(workers: int = 1, env: dict[str, str] | None = None) -> RunningPool:
    return RunningPool(
        workers=workers,
        app=f"{APP}:broker",
        env={"POOL_HANDSHAKE_TIMEOUT": str(HANDSHAKE), **(env or {})},
    )


def kicker(broker: PoolBroker, task: str) -> PoolKicker[Any, Any]:
    return PoolKicker(f"{APP}:{task}", broker, {})


def rss(pid: int) -> int:
    return int(psutil.Process(pid).memory_info().rss)


def unix_sockets(pid: int) -> int:
    return len(psutil.Process(pid).net_connections(kind="unix"))


@contextmanager
def peak_rss(pid: int) -> Iterator[list[int]]:
    """Sample ``pid``'s RSS every few ms while the block runs; yields [peak]."""
    peak = [rss(pid)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.005):
            try:
                peak[0] = max(peak[0], rss(pid))
            except psutil.Error:
                return

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield peak
    finally:
        stop.set()
        thread.join(5)


def raw_connection(running: RunningPool) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(RunDir.at(running.run_dir).control_socket))  # blocks while the backlog is full
    sock.settimeout(10 + HANDSHAKE)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the supervisor sends until it closes the connection (bounded by the
    socket's timeout)."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def recv_or_reset(sock: socket.socket) -> bytes:
    try:
        return sock.recv(1024)
    except ConnectionResetError:
        return b""


def log_lines(running: RunningPool, needle: str) -> list[str]:
    text = running.log_path.read_text(errors="replace")
    return [line for line in text.splitlines() if needle in line]


# --------------------------------------------------------------------- before authentication
def test_unauthenticated_big_frames_are_refused_and_cost_no_memory() -> None:
    """Before: 10 connections announcing 64 MiB frames added 590 MiB to the supervisor."""
    with bounds_pool() as running:
        assert running.proc is not None
        pid = running.proc.pid
        before = rss(pid)
        sent = []
        socks = [raw_connection(running) for _ in range(10)]
        with peak_rss(pid) as peak:
            for sock in socks:  # all ten stay open
                total = 0
                try:
                    sock.sendall(struct.pack("!IB", 60 * MiB, 2))
                    chunk = bytes(MiB)
                    for _ in range(40):
                        sock.sendall(chunk)
                        total += len(chunk)
                except OSError:
                    pass  # closed by the supervisor: what we want
                sent.append(total)
        for sock in socks:
            sock.close()
        grew = (peak[0] - before) / MiB
        assert grew < 16, f"the supervisor grew by {grew:.0f} MiB (sent {sent})"
        assert max(sent) < 40 * MiB, "some connection was read to the end"
        # more than 1 KiB before authenticating, even in small frames, closes too
        with raw_connection(running) as sock:
            assert len(sock.recv(1024)) == CHALLENGE_BYTES
            try:
                sock.sendall(struct.pack("!IB", 1000, 2) + bytes(2000))
            except OSError:
                pass
            assert read_until_closed(sock) == b""
        running.stats()  # still serves


def test_a_silent_connection_is_closed_after_the_handshake_timeout() -> None:
    with bounds_pool() as running:
        with raw_connection(running) as sock:
            start = time.monotonic()
            data = read_until_closed(sock)
            elapsed = time.monotonic() - start
        assert len(data) == CHALLENGE_BYTES  # the challenge, then nothing
        assert HANDSHAKE * 0.8 <= elapsed < HANDSHAKE + 5, elapsed


def test_unauthenticated_connections_are_capped_and_logged_once_per_burst() -> None:
    """Before: 1,000 idle connections all stayed open."""
    total = 3 * MAX_UNAUTHENTICATED
    with bounds_pool() as running:
        assert running.proc is not None
        pid = running.proc.pid
        baseline = unix_sockets(pid)
        socks = [raw_connection(running) for _ in range(total)]
        try:
            # the admitted get their challenge; the others are closed at once
            first = [recv_or_reset(sock) for sock in socks]
            admitted = [s for s, data in zip(socks, first, strict=True) if data]
            assert len(admitted) == MAX_UNAUTHENTICATED
            assert all(len(data) in (0, CHALLENGE_BYTES) for data in first)
            assert unix_sockets(pid) <= baseline + MAX_UNAUTHENTICATED
            # the admitted ones are closed when their handshake times out
            for sock in admitted:
                assert read_until_closed(sock) == b""
        finally:
            for sock in socks:
                sock.close()
        wait_for(lambda: unix_sockets(pid) <= baseline, 10, "the sockets closed")
        refused = total - MAX_UNAUTHENTICATED

        def logged() -> bool:
            return bool(log_lines(running, "no authentication within")) and bool(
                log_lines(running, "already waiting to authenticate")
            )

        wait_for(logged, 10, "the burst log lines")
        lines = log_lines(running, "before they authenticated")
        assert len(lines) == 2, lines  # one for the refused burst, one for the timeouts
        assert any(f"{refused} x {MAX_UNAUTHENTICATED} connections" in line for line in lines)
        assert any(f"{MAX_UNAUTHENTICATED} x no authentication" in line for line in lines)
        assert running.stats()["workers"]


# --------------------------------------------------------------------- a peer that never reads
async def a_stored_blob(running: RunningPool) -> tuple[int, Any, int]:
    """The supervisor's pid, the handle of a 1 MiB result it holds, its count of sockets."""
    assert running.proc is not None
    broker = running.broker()
    handle = await kicker(broker, "blob").kiq(MiB)
    assert (await handle.wait_result(timeout=30)).is_err is False
    await broker.shutdown()
    return running.proc.pid, handle, unix_sockets(running.proc.pid)


async def a_client_that_never_reads(running: RunningPool) -> Any:
    client = await connect(running.run_dir)
    assert client.transport is not None
    client.transport.pause_reading()  # never reads again
    return client


async def test_a_client_that_never_reads_is_dropped_and_the_memory_comes_back() -> None:
    """Before: Subscribe 500 times to a 1 MiB result without reading: +500 MiB, for ever."""
    with bounds_pool() as running:
        pid, handle, baseline = await a_stored_blob(running)
        before = rss(pid)
        with peak_rss(pid) as peak:
            client = await a_client_that_never_reads(running)
            # one write: the supervisor reads them together (it stops reading from a peer
            # that does not read, so frames arriving later would never be read)
            client.send_raw(Subscribe(handle.task_id).encode() * 500)
            try:
                await asyncio.wait_for(client.drain(), 30)
            except ConnectionError:
                pass  # dropped already
            wait_for(lambda: log_lines(running, "dropped it"), 30, "the drop")
        grew = (peak[0] - before) / MiB
        assert grew < MAX_UNREAD / MiB + 24, f"the supervisor grew by {grew:.0f} MiB"
        (line,) = log_lines(running, "dropped it")
        assert "left" in line and "unread" in line and "POOL_MAX_UNREAD" in line
        wait_for(lambda: unix_sockets(pid) <= baseline, 10, "the connection closed")
        if client.transport is not None:
            assert client.transport is not None
        client.transport.abort()
        after = rss(pid)
        assert (after - before) / MiB < 24, f"{(after - before) / MiB:.0f} MiB still held"
        # the result stays in the pool: a new connection gets it
        fresh = running.broker()
        handle.result_backend = fresh.result_backend
        result = await handle.wait_result(timeout=30)
        assert len(result.return_value[0]) == MiB
        await fresh.shutdown()


async def test_a_producer_that_stops_reading_gets_its_results_after_it_reads_again() -> None:
    """Its own results wait in the supervisor, uncopied; past the limit it is dropped, and
    every result is still there when it reads again (it subscribes on a new connection)."""
    count, size = 48, 512 * 1024  # 24 MiB of results, over the 16 MiB limit
    with bounds_pool(workers=2) as running:
        broker = running.broker()
        release = running.mark_path("release")
        blob = kicker(broker, "blob")
        handles = [await blob.kiq(size, f"t{i}", str(release)) for i in range(count)]
        client = await broker.connection()
        assert client.transport is not None
        client.transport.pause_reading()  # from now on this producer does not read
        assert running.proc is not None
        before = rss(running.proc.pid)
        with peak_rss(running.proc.pid) as peak:
            release.touch()
            wait_for(lambda: log_lines(running, "dropped it"), 60, "the drop")
            wait_for(lambda: running.stats()["totals"]["tasks_done"] >= count, 60, "all done")
        # the results are kept once (in the ResultStore), not a second time for the producer
        grew = (peak[0] - before) / MiB
        assert grew < count * size / MiB + 12, f"the supervisor grew by {grew:.0f} MiB"
        client.transport.resume_reading()
        results = [await h.wait_result(timeout=60) for h in handles]
        assert all(not r.is_err and len(r.return_value[0]) == size for r in results)
        stats = running.stats()
        assert stats["totals"]["restarts"] == 0
        await broker.shutdown()


# --------------------------------------------------------------------- a result over the limit
async def test_a_result_over_the_frame_limit_is_an_error_result_of_that_task_alone() -> None:
    """Before: the supervisor closed the pipe on the oversized frame, the task killed three
    workers and ended as WorkerCrashedError."""
    with bounds_pool(env={"POOL_MAX_FRAME": str(MiB)}) as running:
        broker = running.broker()
        pids = running.worker_pids()
        result = await (await kicker(broker, "blob").kiq(2 * MiB, "big")).wait_result(timeout=60)
        assert result.is_err
        assert isinstance(result.error, ValueError), repr(result.error)
        message = str(result.error)
        assert "bytes once serialized, over the limit" in message
        assert "POOL_MAX_FRAME" in message
        ran = await kicker(broker, "runs").kiq("big")
        assert (await ran.wait_result(timeout=30)).return_value == 1  # not run again
        # a result just under the limit still comes back, from the same worker
        small = await (await kicker(broker, "blob").kiq(MiB - 4096)).wait_result(timeout=30)
        assert not small.is_err
        assert small.return_value[2] in pids
        stats = running.stats()
        assert [w["pid"] for w in stats["workers"]] == pids
        assert stats["totals"]["restarts"] == 0
        await broker.shutdown()


async def test_a_client_that_stops_reading_is_dropped_though_it_holds_little() -> None:
    """5 MiB of results unread stays under POOL_MAX_UNREAD (16 MiB), but a peer that reads
    none of it for POOL_UNREAD_TIMEOUT is dropped: before, it held them for ever."""
    with bounds_pool(env={"POOL_UNREAD_TIMEOUT": "1"}) as running:
        pid, handle, baseline = await a_stored_blob(running)
        client = await a_client_that_never_reads(running)
        client.send_raw(Subscribe(handle.task_id).encode() * 5)
        await client.drain()
        wait_for(lambda: log_lines(running, "unread for"), 30, "the drop")
        (line,) = log_lines(running, "unread for")
        assert "POOL_UNREAD_TIMEOUT" in line and "dropped it" in line
        assert not log_lines(running, "POOL_MAX_UNREAD")  # not the size bound: the time
        wait_for(lambda: unix_sockets(pid) <= baseline, 10, "the connection closed")
        assert client.transport is not None
        client.transport.abort()
