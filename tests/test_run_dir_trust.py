"""A producer and a supervisor trust a run directory only when it is theirs.

The producer proves it holds the authkey, and since this change the supervisor proves it
too: a socket that someone else put in the run directory gets no task. A run directory
owned by another user is refused by both sides, root included.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pool import PoolBroker, PoolUnavailableError
from pool.extensions.handles import PoolKicker
from pool.runtime.protocol import Auth, Challenge, FrameReader, Kick, Welcome, decode_frame
from pool.runtime.rundir import RunDir
from tests.pool_support import APPS, ROOT

pytestmark = pytest.mark.timeout(60)

NOBODY = 65534


@pytest.fixture
def run_dir() -> Iterator[RunDir]:
    path = tempfile.mkdtemp(prefix="pt-", dir="/tmp")
    rd = RunDir.at(path)
    rd.create()
    yield rd
    shutil.rmtree(path, ignore_errors=True)


async def test_a_producer_sends_no_task_to_a_server_without_the_authkey(run_dir: RunDir) -> None:
    """An impostor's socket answers the handshake with a made-up proof: kiq fails with
    PoolUnavailableError and the impostor never sees a task."""
    run_dir.new_authkey()
    received: list[object] = []

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(Challenge(os.urandom(32)).encode())
        frames = FrameReader()
        while data := await reader.read(65536):
            for op, body in frames.feed(data):
                frame = decode_frame(op, body)
                received.append(frame)
                if isinstance(frame, Auth):
                    writer.write(Welcome(os.urandom(32)).encode())  # it cannot compute one

    server = await asyncio.start_unix_server(impostor, path=str(run_dir.control_socket))
    broker = PoolBroker(run_dir=str(run_dir.path), connect_timeout=1.0)
    try:
        with pytest.raises(PoolUnavailableError):
            await PoolKicker("app:task", broker, {}).kiq("secret argument")
    finally:
        await broker.shutdown()
        server.close()
        await server.wait_closed()
    assert any(isinstance(f, Auth) for f in received), "the producer did try the handshake"
    assert not any(isinstance(f, Kick) for f in received), "a task went to the impostor"


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory away needs root")


@needs_root
def test_the_supervisor_refuses_a_run_directory_of_another_user(run_dir: RunDir) -> None:
    os.chown(run_dir.path, NOBODY, NOBODY)
    command = [sys.executable, "-m", "pool", "run", "pool_test_app:broker", "--workers", "1",
               "--run-dir", str(run_dir.path)]  # fmt: skip
    done = subprocess.run(
        command,
        cwd=APPS,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(APPS), str(ROOT)])},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert f"belongs to uid {NOBODY}" in done.stderr
    assert not run_dir.authkey_file.exists()


@needs_root
async def test_a_producer_refuses_a_run_directory_of_another_user(run_dir: RunDir) -> None:
    run_dir.new_authkey()
    os.chown(run_dir.path, NOBODY, NOBODY)
    broker = PoolBroker(run_dir=str(run_dir.path), connect_timeout=5.0)
    try:
        with pytest.raises(PoolUnavailableError, match=f"belongs to uid {NOBODY}"):
            await asyncio.wait_for(PoolKicker("app:task", broker, {}).kiq(), 3)
    finally:
        await broker.shutdown()
    assert Path(run_dir.path).exists()
