"""The gateway, unchanged, against a real 3-node Redis Cluster on loopback."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from gateway.protocol import AudioFrame
from gateway.testing.bot import SimulatedBot, Speaker
from gateway.testing.cluster import RedisClusterProcesses
from tests.conftest import running_gateway, ws_url
from tests.helpers import eventually

pytestmark = pytest.mark.cluster


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
            assert gw.bots.delivery.reader.connections <= len(shards)
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


def _move_slot(cluster: RedisClusterProcesses, slot: int) -> tuple[int, int]:
    """Migrate ``slot`` (and its keys) to another node, as `redis-cli --cluster reshard` does."""
    clients = {s.port: redis.Redis(port=s.port) for s in cluster.servers}
    try:
        owner = next(p for p, c in clients.items() if slot in _slots_of(c))
        target = next(p for p in clients if p != owner)
        src, dst = clients[owner], clients[target]
        src_id, dst_id = src.execute_command("CLUSTER", "MYID"), dst.execute_command("CLUSTER", "MYID")
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        while keys := src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
        for client in clients.values():
            client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        return owner, target
    finally:
        for client in clients.values():
            client.close()


def _slots_of(client: redis.Redis) -> set[int]:
    nodes = client.execute_command("CLUSTER", "NODES").decode().splitlines()
    myself = next(n for n in nodes if "myself" in n)
    slots: set[int] = set()
    for part in myself.split()[8:]:
        if part.startswith("["):
            continue
        lo, _, hi = part.partition("-")
        slots.update(range(int(lo), int(hi or lo) + 1))
    return slots


async def test_a_slot_moved_mid_stream_loses_no_audio(cluster):
    """Resharding while a bot streams: writes to the old node come back MOVED (or ASK
    during the move); the gateway refreshes its slot map and writes them again to
    the new owner, in order, none dropped."""
    cluster.flushall()
    client = RedisCluster.from_url(cluster.url)
    try:
        async with running_gateway(cluster.url) as gw:
            bot = SimulatedBot(ws_url(gw), "cbot-moving")
            await bot.connect()
            keys = gw.keyspace.bot(bot.bot_id)
            frames = [AudioFrame("s1", "Ada", i.to_bytes(4, "big") * 240) for i in range(150)]
            moved: tuple[int, int] | None = None
            for i, frame in enumerate(frames):
                await bot.send_frame(frame)
                await asyncio.sleep(0.005)
                if i == 50:
                    moved = await asyncio.to_thread(_move_slot, cluster, key_slot(keys.audio.encode()))

            async def complete() -> bool:
                entries = await client.xrange(keys.audio)
                return [f[b"pcm"] for _, f in entries] == [f.pcm for f in frames]

            await eventually(complete, 15)
            assert moved is not None and moved[0] != moved[1]
            node = client.get_node_from_key(keys.audio)
            assert node.port == moved[1]
            registry = gw.metrics.registry
            dropped = "meetstream_gateway_frames_dropped_total"
            for reason in ("redis_error", "buffer_full"):
                assert not registry.get_sample_value(dropped, {"reason": reason})
            # The move was noticed as redirected writes (then retried), not missed.
            assert registry.get_sample_value("meetstream_gateway_redis_errors_total", {"op": "publish"}) >= 1
            await bot.close()
    finally:
        await client.aclose()


async def test_a_burst_past_a_nodes_pool_waits_instead_of_failing(cluster):
    """A takeover of many bots at once: 200 commands and 200 pipelines at once on pools of 2
    a node. redis-py's Cluster client fails past its pool where the standalone one waits;
    ungated, the worker SDK gave every bot that failed away again."""
    from redis.exceptions import MaxConnectionsError

    from gateway.redis_conn import open_client

    async def burst(client) -> None:
        async def one(i: int) -> None:
            await client.xadd(f"burst:{{{i % 7}}}", {"i": i})
            pipe = client.pipeline(transaction=False)
            pipe.xlen(f"burst:{{{i % 7}}}")
            pipe.get(f"k{i}")
            await pipe.execute()

        await asyncio.gather(*(one(i) for i in range(200)))

    raw = RedisCluster.from_url(cluster.url, max_connections=2)
    try:
        with pytest.raises(MaxConnectionsError):
            await burst(raw)
    finally:
        await raw.aclose()
    gated, is_cluster = await open_client(cluster.url, "yes", max_connections=2, socket_timeout_s=5)
    try:
        assert is_cluster
        await burst(gated)
        assert sum([await gated.xlen(f"burst:{{{k}}}") for k in range(7)]) >= 200
        assert not gated.slots_gate.locked()  # every slot given back
    finally:
        await gated.aclose()
