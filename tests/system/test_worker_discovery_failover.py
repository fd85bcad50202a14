"""Reproduction, found by the day: after a Redis Cluster failover of the primary that
holds the discovery stream, SDK workers never learn of a new bot.

SDK discovery (``Worker._discovery_loop`` then, ``Discovery.run`` now) opens its dedicated
connection to the node serving ``meetstream:events`` once, before its loop; on an error it sleeps and
reads again on the same connection. When that node dies, every read fails
(ConnectionError), and once the old primary is back as a replica every read is
answered MOVED: discovery never recovers, so bots that connect after the failover
are never claimed by any instance of the group (the day saw 20 of 25 meetings
unhandled, 21,798 frames and 94 chat questions never handled).

1. Redis Cluster 3+3; one SDK worker (fast leases) discovers a bot: it is claimed.
2. The primary of ``meetstream:events`` is SIGKILLed; its replica is promoted.
3. A new bot connects (its ``connected`` event is written as the gateway writes it):
   it must be claimed within 10 s. (It never was, before the discovery loop reconnected.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from gateway.keys import KeySpace
from gateway.testing.cluster import RedisClusterProcesses
from tests.helpers import eventually
from workers.worker import Worker, WorkerSettings

pytestmark = [pytest.mark.system, pytest.mark.cluster]


@pytest.fixture
def cluster() -> Iterator[RedisClusterProcesses]:
    with RedisClusterProcesses(3, replicas=1, node_timeout_ms=1000) as c:
        yield c


async def announce(client: RedisCluster, keys: KeySpace, bot_id: str) -> None:
    """What a gateway writes when a bot's channel connects."""
    bot = keys.bot(bot_id)
    fields: dict[Any, Any] = {
        "type": "connected",
        "bot_id": bot_id,
        "channel": "control",
        "ts": int(time.time() * 1000),
        "conn": "c1",
        "gateway": "gw",
        **bot.as_fields(),
    }
    await client.xadd(bot.events, fields)
    await client.xadd(keys.global_events, fields)


async def test_discovery_follows_a_failover_of_the_global_stream(cluster: RedisClusterProcesses) -> None:
    keys = KeySpace()
    client = RedisCluster.from_url(cluster.url)
    worker = Worker(
        WorkerSettings(
            redis_url=cluster.url,
            group="repro",
            lease_ttl_s=2.0,
            lease_renew_s=0.4,
            claim_interval_s=0.2,
            read_block_ms=200,
            graceful_timeout_s=2.0,
        ),
        handle_signals=False,
    )
    try:
        await worker.start()
        await announce(client, keys, "early")
        await eventually(lambda: "early" in worker.bots, 10)
        victim = cluster.server_of_key(keys.global_events)
        cluster.kill(victim)
        await asyncio.to_thread(cluster.wait_failover, victim, key_slot(keys.global_events.encode()), 30.0)
        for _ in range(50):  # the cluster client learns the new map on its first failure
            try:
                await announce(client, keys, "late")
                break
            except Exception:
                await asyncio.sleep(0.2)
        await eventually(lambda: "late" in worker.bots, 10)
    finally:
        await asyncio.wait_for(worker.stop(), 30)
        await client.aclose()
