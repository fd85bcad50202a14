"""Shared fixtures: a real redis-server per test session, a clean database per
test, and a real gateway on free ports. Every fixture stops what it starts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator

import pytest
import redis
import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from gateway.app import Gateway
from gateway.embedded_redis import RedisServer, free_port
from gateway.settings import Settings
from gateway.testing.cluster import RedisClusterProcesses


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterProcesses]:
    """A 3-node Redis Cluster on loopback, one per test module that asks for it."""
    with RedisClusterProcesses(3) as c:
        yield c


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


def gateway_settings(redis_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = dict(
        host="127.0.0.1",
        port=0,
        metrics_host="127.0.0.1",
        metrics_port=free_port(),
        redis_url=redis_url,
        command_block_ms=1000,
        handshake_timeout_s=5.0,
        log_format="text",
        # The tests share this process (and two cores) with the gateway: a slow turn of
        # the loop here is the test's own load, not the gateway's. Overload tests set it.
        overload_lag_s=0.0,
    )
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running_gateway(redis_url: str, **overrides: object) -> AsyncIterator[Gateway]:
    gw = Gateway(gateway_settings(redis_url, **overrides), CollectorRegistry())
    await gw.start()
    try:
        yield gw
    finally:
        await asyncio.wait_for(gw.stop(), 30)


@pytest.fixture
async def gateway(redis_url: str) -> AsyncIterator[Gateway]:
    async with running_gateway(redis_url) as gw:
        yield gw


def ws_url(gw: Gateway) -> str:
    return f"ws://127.0.0.1:{gw.port}"
