"""Redis settings and connections for workers (standalone or Cluster).

Blocking reads get a dedicated single-connection client, never one from the
shared pool: a cancelled blocking read must not hand a still-blocked connection
back to the pool, where it would answer the next caller with stale data.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.asyncio.connection import parse_url

from gateway.redis_conn import CONNECT_TIMEOUT_S, open_client
from gateway.settings import redact_url

log = logging.getLogger(__name__)

ClusterMode = Literal["auto", "yes", "no"]
SOCKET_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class RedisSettings:
    url: str = "redis://127.0.0.1:6379/0"
    cluster: ClusterMode = "auto"
    max_connections: int = 32

    def __repr__(self) -> str:
        return f"RedisSettings(url={redact_url(self.url)!r}, cluster={self.cluster!r})"


class Connections:
    """The shared pool (commands, leases) plus dedicated clients for blocking reads."""

    def __init__(self, settings: RedisSettings, client: Any, is_cluster: bool) -> None:
        self.settings = settings
        self.client = client
        self.is_cluster = is_cluster

    async def dedicated(self, key: str, block_ms: int) -> aioredis.Redis:
        """A single-connection client on the node that serves ``key``."""
        kwargs: dict[str, Any] = dict(parse_url(self.settings.url))
        if self.is_cluster:
            node = self.client.get_node_from_key(key)
            kwargs.update(host=node.host, port=node.port)
            kwargs.pop("db", None)
        kwargs.update(
            single_connection_client=True,
            socket_timeout=block_ms / 1000 + SOCKET_TIMEOUT_S,
            socket_connect_timeout=CONNECT_TIMEOUT_S,
            decode_responses=False,
        )
        return aioredis.Redis(**kwargs)

    async def close(self) -> None:
        await self.client.aclose()


async def connect(settings: RedisSettings, *, attempts: int = 10, delay_s: float = 0.5) -> Connections:
    """Open the shared pool and prove it with PING, one log line per retry (as arq)."""
    client, is_cluster = await open_client(
        settings.url,
        settings.cluster,
        max_connections=settings.max_connections,
        socket_timeout_s=SOCKET_TIMEOUT_S,
        attempts=attempts,
        delay_s=delay_s,
    )
    return Connections(settings, client, is_cluster)
