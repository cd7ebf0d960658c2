"""The real services some tests need: Redis, RabbitMQ, NATS with JetStream.

``require(name, ...)`` skips a test, with the reason, when a service does not answer; under
``POOL_REQUIRE_SERVICES=1`` (``.ci/run`` sets it) it fails instead, so that a CI job that
promises the services cannot pass by skipping. Each check is a plain socket handshake of the
service's own protocol (a few milliseconds), and its answer is kept for the session.
"""

from __future__ import annotations

import functools
import json
import os
import socket
from urllib.parse import urlsplit

import pytest

REDIS_URL = os.environ.get("POOL_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
AMQP_URL = os.environ.get("POOL_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
NATS_URL = os.environ.get("POOL_TEST_NATS_URL", "nats://127.0.0.1:4222")

_URLS = {"redis": REDIS_URL, "rabbitmq": AMQP_URL, "nats": NATS_URL}
_DEFAULT_PORTS = {"redis": 6379, "rabbitmq": 5672, "nats": 4222}
_HOW = {
    "redis": "apt-get install redis-server; redis-server --daemonize yes",
    "rabbitmq": "apt-get install rabbitmq-server; rabbitmq-server -detached",
    "nats": "apt-get install nats-server; nats-server -js",
}


def _connect(name: str) -> socket.socket:
    parts = urlsplit(_URLS[name])
    host, port = parts.hostname or "127.0.0.1", parts.port or _DEFAULT_PORTS[name]
    sock = socket.create_connection((host, port), timeout=2)
    sock.settimeout(2)
    return sock


def _redis_answers() -> str | None:
    with _connect("redis") as sock:
        sock.sendall(b"PING\r\n")
        reply = sock.recv(64)
    return None if reply.startswith((b"+PONG", b"-NOAUTH")) else f"it answered {reply!r}"


def _rabbitmq_answers() -> str | None:
    with _connect("rabbitmq") as sock:
        sock.sendall(b"AMQP\x00\x00\x09\x01")
        reply = sock.recv(64)
    return None if reply[:1] == b"\x01" else f"it answered {reply[:16]!r} (not AMQP 0-9-1)"


def _nats_answers() -> str | None:
    with _connect("nats") as sock:
        line = sock.makefile("rb").readline()
    if not line.startswith(b"INFO "):
        return f"it answered {line[:40]!r} (not NATS)"
    if not json.loads(line[5:]).get("jetstream"):
        return "JetStream is not enabled (start nats-server with -js)"
    return None


_CHECKS = {"redis": _redis_answers, "rabbitmq": _rabbitmq_answers, "nats": _nats_answers}


@functools.cache
def unavailable(name: str) -> str | None:
    """Why service ``name`` cannot be used, or ``None``."""
    try:
        problem = _CHECKS[name]()
    except OSError as exc:
        problem = f"nothing answers ({type(exc).__name__}: {exc})"
    if problem is None:
        return None
    return f"{name} at {_URLS[name]}: {problem}; to run these tests: {_HOW[name]}"


def require(*names: str) -> None:
    """Skip the test (fail under ``POOL_REQUIRE_SERVICES=1``) unless every service answers."""
    for name in names:
        reason = unavailable(name)
        if reason is None:
            continue
        if os.environ.get("POOL_REQUIRE_SERVICES") == "1":
            pytest.fail(f"POOL_REQUIRE_SERVICES=1 but {reason}", pytrace=False)
        pytest.skip(reason)
