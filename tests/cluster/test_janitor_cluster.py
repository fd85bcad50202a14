"""The janitor on a real 3-node Redis Cluster: its SCAN covers every primary."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry
from redis.asyncio.cluster import RedisCluster

from gateway.janitor import Janitor
from gateway.keys import COMMAND_GROUP, KeySpace
from gateway.metrics import Metrics
from gateway.redis_conn import connect
from tests.conftest import gateway_settings

pytestmark = pytest.mark.cluster


async def test_every_primary_is_scanned_and_swept_over_several_passes(cluster):
    """1. command streams of bots that never connected, on all three primaries, each
       with a consumer of a gone gateway;
    2. passes of at most 5 streams run until the round is complete;
    3. every stream has an expiry and no stale consumer, on every node."""
    cluster.flushall()
    client = RedisCluster.from_url(cluster.url)
    settings = gateway_settings(
        cluster.url, gateway_id="gw-self", janitor_max_keys=5, janitor_consumer_idle_s=0.2
    )
    backend = await connect(settings, cluster.url, attempts=1)
    try:
        assert backend.is_cluster
        await client.initialize()
        keyspace = KeySpace(settings.key_prefix, settings.command_shards)
        by_node: dict[str, list[str]] = {}
        for i in range(200):
            key = keyspace.bot(f"ghost-{i}").commands
            node = client.get_node_from_key(key).name
            if len(by_node.setdefault(node, [])) < 4:
                by_node[node].append(key)
        assert len(by_node) == 3 and all(len(keys) == 4 for keys in by_node.values())
        streams = [key for keys in by_node.values() for key in keys]
        for key in streams:
            await client.xgroup_create(key, COMMAND_GROUP, id="0", mkstream=True)
            await client.xgroup_createconsumer(key, COMMAND_GROUP, "gone-pod")
        await asyncio.sleep(0.3)

        janitor = Janitor(backend, keyspace, settings, Metrics(CollectorRegistry()))
        checked = []
        for _ in range(10):
            result = await janitor.run_once()
            checked.append(result.streams_checked)
            if result.round_complete:
                break
        assert checked == [5, 5, 2]
        for key in streams:
            assert await client.ttl(key) > 0, key
            assert await client.xinfo_consumers(key, COMMAND_GROUP) == [], key
    finally:
        await backend.close()
        await client.aclose()
