"""Connecting to Redis, standalone or Cluster, and proving the connection at start."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import parse_url
from redis.crc import key_slot
from redis.exceptions import RedisError

from gateway.exceptions import RedisUnavailable
from gateway.settings import Settings, redact_url

log = logging.getLogger(__name__)

# redis-py 8 defaults to a 5 s socket timeout; writes must give up well before
# Kubernetes gives up on us, and blocking reads get their own, longer timeout.
WRITE_SOCKET_TIMEOUT_S = 10.0
CONNECT_TIMEOUT_S = 5.0

Client = aioredis.Redis | RedisCluster


@dataclass
class RedisBackend:
    """The write client (a bounded pool) plus what readers need to open their own connection."""

    client: Any  # aioredis.Redis | RedisCluster
    url: str
    is_cluster: bool
    clock_offset_ms: int = 0  # Redis TIME minus our wall clock

    def slot(self, key: str) -> int:
        return key_slot(key.encode()) if self.is_cluster else 0

    async def dedicated(self, key: str, socket_timeout_s: float) -> aioredis.Redis:
        """A single-connection client to the node that serves ``key``.

        Blocking reads get a connection of their own, never one from the shared
        pool: a cancelled blocking read must not hand a still-blocked connection
        back to the pool (it would answer the next caller with stale data).
        """
        kwargs: dict[str, Any] = parse_url(self.url)
        if self.is_cluster:
            node = self.client.get_node_from_key(key)
            kwargs.update(host=node.host, port=node.port)
            kwargs.pop("db", None)
        kwargs.update(
            single_connection_client=True,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            decode_responses=False,
        )
        return aioredis.Redis(**kwargs)

    def now_ms(self) -> int:
        """Redis server time in Unix ms, as our clock corrected by the offset seen at start."""
        return int(time.time() * 1000) + self.clock_offset_ms

    async def close(self) -> None:
        await self.client.aclose()


async def _detect_cluster(url: str) -> bool:
    probe = aioredis.Redis.from_url(
        url, socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=CONNECT_TIMEOUT_S
    )
    try:
        info = await probe.info("cluster")
        return bool(info.get("cluster_enabled"))
    finally:
        await probe.aclose()


async def connect(settings: Settings, url: str, *, attempts: int = 10, delay_s: float = 0.5) -> RedisBackend:
    """Open the write client and prove it with PING, retrying with a log line per retry."""
    shown = redact_url(url)
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            if settings.redis_cluster == "auto":
                is_cluster = await _detect_cluster(url)
            else:
                is_cluster = settings.redis_cluster == "yes"
            common: dict[str, Any] = dict(
                socket_timeout=WRITE_SOCKET_TIMEOUT_S,
                socket_connect_timeout=CONNECT_TIMEOUT_S,
                max_connections=settings.redis_max_connections,
                decode_responses=False,
            )
            if is_cluster:
                client: Any = RedisCluster.from_url(url, **common)
                await client.initialize()
            else:
                client = aioredis.Redis.from_url(url, **common)
            await client.ping()
            backend = RedisBackend(client, url, is_cluster)
            backend.clock_offset_ms = await _clock_offset_ms(client, is_cluster)
            log.info(
                "redis connected",
                extra={"redis_url": shown, "cluster": is_cluster, "clock_offset_ms": backend.clock_offset_ms},
            )
            return backend
        except (RedisError, OSError) as exc:
            last = exc
            log.warning(
                "redis not reachable, retrying",
                extra={"redis_url": shown, "attempt": attempt, "of": attempts, "error": type(exc).__name__},
            )
            await asyncio.sleep(min(delay_s * attempt, 5.0))
    raise RedisUnavailable(shown, attempts) from last


async def _clock_offset_ms(client: Any, is_cluster: bool) -> int:
    before = time.time()
    if is_cluster:
        reply = await client.time(target_nodes=RedisCluster.RANDOM)
    else:
        reply = await client.time()
    seconds, micros = reply
    after = time.time()
    ours = (before + after) / 2
    return int((seconds + micros / 1e6 - ours) * 1000)
