"""Fault tests: real redis-server and gateway processes, killed and restarted for real.

Each test reports what was sent, what arrived and what was counted as dropped
(printed, and shown by pytest -s), and asserts that the three add up.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.embedded_redis import RedisServer


@pytest.fixture
def durable_redis() -> Iterator[RedisServer]:
    """A redis-server of its own that survives a SIGKILL: AOF with fsync on every write."""
    server = RedisServer(extra_args=["--appendonly", "yes", "--appendfsync", "always"])
    server.start()
    try:
        yield server
    finally:
        server.stop()


def report(name: str, **figures: object) -> None:
    print(f"\n[{name}] " + ", ".join(f"{k}={v}" for k, v in figures.items()))
