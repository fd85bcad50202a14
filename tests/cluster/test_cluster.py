"""The gateway, unchanged, against a real 3-node Redis Cluster on loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from redis.asyncio.cluster import RedisCluster

from gateway.testing.bot import SimulatedBot, Speaker
from gateway.testing.cluster import RedisClusterProcesses
from tests.conftest import running_gateway, ws_url
from tests.helpers import eventually

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisClusterProcesses]:
    with RedisClusterProcesses(3) as c:
        yield c


async def test_bots_across_slots_audio_and_commands_without_crossslot(cluster):
    cluster.flushall()
    client = RedisCluster.from_url(cluster.url)
    try:
        async with running_gateway(cluster.url) as gw:
            assert gw.backend.is_cluster
            bots = [SimulatedBot(ws_url(gw), f"cbot-{i}") for i in range(24)]
            for bot in bots:
                await bot.connect()
            for bot in bots:
                await bot.stream_speech(
                    [Speaker("s1", "Ada"), Speaker("s2", "Grace", 330)], 0.3, realtime=False
                )
            for bot in bots:
                keys = gw.keyspace.bot(bot.bot_id)
                for n in range(3):
                    await client.xadd(
                        keys.commands, {"json": json.dumps({"command": "sendmsg", "message": f"{n}"})}
                    )
            for bot in bots:
                await bot.wait_commands(3, timeout=15)
                assert [c["message"] for c in bot.commands()] == ["0", "1", "2"]
                assert {c["bot_id"] for c in bot.commands()} == {bot.bot_id}
            for bot in bots:
                keys = gw.keyspace.bot(bot.bot_id)

                async def complete(keys=keys, bot=bot):
                    entries = await client.xrange(keys.audio)
                    return [f[b"pcm"] for _, f in entries] == [f.pcm for f in bot.sent_frames]

                await eventually(complete, 10)
            # Bots' keys live on every node, not one.
            nodes = {client.get_node_from_key(gw.keyspace.bot(b.bot_id).audio).name for b in bots}
            assert len(nodes) == 3
            shards = {gw.keyspace.bot(b.bot_id).shard for b in bots}
            assert gw.bots.reader.connections <= len(shards)
            registry = gw.metrics.registry
            for op in ("publish", "read_commands", "ack", "claim"):
                assert not registry.get_sample_value("meetstream_gateway_redis_errors_total", {"op": op})
            for bot in bots:
                await bot.close()
            await eventually(lambda: len(gw.bots.registry) == 0)
            await gw.publisher.flush(5)
            lifecycle = await client.xrange(gw.keyspace.global_events)
            assert sum(1 for _, f in lifecycle if f[b"type"] == b"session_ended") == len(bots)
    finally:
        await client.aclose()
