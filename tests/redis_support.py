"""A real Redis for the tests: a unique key space per test, cleaned up afterwards.

Tests use ``REDIS_URL`` (``$POOL_TEST_REDIS_URL``, default ``redis://127.0.0.1:6379/0``). When
that Redis is unreachable they are skipped with the reason, unless ``POOL_REQUIRE_REDIS=1``, in
which case they fail: a CI job that promises Redis must not pass by skipping everything.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.pool_support import wait_for

REDIS_URL = os.environ.get("POOL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
UNREACHABLE_URL = "redis://127.0.0.1:1/0"


def _unreachable_reason() -> str | None:
    try:
        import redis
    except ImportError:
        return "redis-py is not installed (pip install 'taskiq-pool[redis]')"
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except Exception as exc:
        return f"no Redis at {REDIS_URL} ({type(exc).__name__}: {exc})"
    finally:
        client.close()
    return None


def require_redis() -> None:
    """Skip (or, with ``POOL_REQUIRE_REDIS=1``, fail) the test when Redis is unreachable."""
    reason = _unreachable_reason()
    if reason is None:
        return
    if os.environ.get("POOL_REQUIRE_REDIS") == "1":
        pytest.fail(f"POOL_REQUIRE_REDIS=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@dataclass
class RedisSpace:
    """The key space of one test: every key it creates starts with ``prefix``."""

    url: str
    prefix: str

    def name(self, suffix: str) -> str:
        return f"{self.prefix}:{suffix}"

    def client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5)

    def cleanup(self) -> int:
        """Delete the keys of this space only (SCAN + DEL, never FLUSHDB)."""
        client = self.client()
        try:
            keys = list(client.scan_iter(match=f"{self.prefix}*", count=1000))
            for start in range(0, len(keys), 500):
                client.delete(*keys[start : start + 500])
            return len(keys)
        finally:
            client.close()


def redis_space() -> Iterator[RedisSpace]:
    """Generator behind the ``space`` fixture of the Redis tests."""
    require_redis()
    space = RedisSpace(REDIS_URL, f"pooltest:{uuid.uuid4().hex[:12]}")
    try:
        yield space
    finally:
        space.cleanup()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A throwaway ``redis-server`` on its own port, that a test may stop and restart.

    Without persistence (the default) a restart starts empty. With ``persistent=True`` every
    write is in an append-only file synced before Redis replies, so a restart (even after
    SIGKILL) comes back with everything acknowledged so far.
    """

    def __init__(self, persistent: bool = False) -> None:
        self.persistent = persistent
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not installed")
        self.binary = binary
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="pool-redis-")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--dir", self.dir]
        if self.persistent:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=1)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        try:
            wait_for(up, timeout, f"redis-server on port {self.port}")
        finally:
            client.close()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.kill()
        proc.wait(timeout=10)

    def restart(self, timeout: float = 10.0) -> None:
        """Kill the server and start it again on the same port."""
        self.stop()
        self.start(timeout)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
