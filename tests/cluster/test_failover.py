"""A Redis Cluster primary dies under load and its replica takes over: the gateway follows.

1. 3 primaries with a replica each; one gateway; 18 bots stream audio and receive
   a command every 250 ms.
2. The primary that serves the most of their keys is SIGKILLed; its replica is
   promoted after the node timeout.
3. Bots whose keys live elsewhere never stop being stored; the others resume once
   the replica took over; every frame sent is in Redis or counted as dropped; every
   command written is delivered (a repeat is allowed: delivery is at least once);
   the gateway is ready again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from gateway.protocol import AudioFrame
from gateway.testing.bot import SimulatedBot
from gateway.testing.cluster import RedisClusterProcesses
from tests.conftest import running_gateway, ws_url
from tests.helpers import eventually

pytestmark = pytest.mark.cluster

BOTS = 18
FRAME = AudioFrame("s", "Ada", b"\x01\x00" * 960)  # 20 ms at 48 kHz


@pytest.fixture
def cluster() -> Iterator[RedisClusterProcesses]:
    with RedisClusterProcesses(3, replicas=1, node_timeout_ms=1000) as c:
        yield c


async def stream(bot: SimulatedBot, stop: asyncio.Event) -> int:
    sent = 0
    while not stop.is_set() and sent < 5000:
        await bot.send_frame(FRAME)
        sent += 1
        await asyncio.sleep(0.02)
    return sent


async def command_writer(client: RedisCluster, stream_key: str, stop: asyncio.Event) -> int:
    n = 0
    while not stop.is_set() and n < 500:
        with contextlib.suppress(Exception):  # the dead node's streams refuse until promotion
            await client.xadd(stream_key, {"json": json.dumps({"command": "sendmsg", "message": str(n)})})
            n += 1
        await asyncio.sleep(0.25)
    return n


async def test_the_gateway_follows_a_primary_failover(cluster):
    async with running_gateway(cluster.url, command_block_ms=500) as gw:
        keys = [gw.keyspace.bot(f"fo{i}") for i in range(BOTS)]
        bots = [SimulatedBot(ws_url(gw), k.bot_id, record_sent=False) for k in keys]
        for bot in bots:
            await bot.connect()
        victim = max(
            cluster.primaries(),
            key=lambda s: sum(cluster.server_of_key(k.audio) is s for k in keys),
        )
        on_victim = [k for k in keys if cluster.server_of_key(k.audio) is victim]
        elsewhere = [k for k in keys if k not in on_victim]
        assert on_victim and elsewhere
        client = RedisCluster.from_url(cluster.url)
        stop = asyncio.Event()
        streams = [asyncio.create_task(stream(b, stop)) for b in bots]
        writers = [asyncio.create_task(command_writer(client, k.commands, stop)) for k in keys]
        await asyncio.sleep(2.0)

        killed_at = time.monotonic()
        victim_slot = _slot(on_victim[0].audio)
        cluster.kill(victim)
        # Bots elsewhere keep being stored, at once: nothing waits on the dead node.
        direct = {k.audio: aioredis.Redis(port=cluster.server_of_key(k.audio).port) for k in elsewhere}
        before = {key: await c.xlen(key) for key, c in direct.items()}
        await asyncio.sleep(1.0)
        assert all([await c.xlen(key) > before[key] + 10 for key, c in direct.items()]), (
            "audio of bots on live nodes stopped while a node was down"
        )
        new_primary = await asyncio.get_running_loop().run_in_executor(
            None, cluster.wait_failover, victim, victim_slot, 30.0
        )
        promoted_after = time.monotonic() - killed_at
        # Healed: the first frame of a bot on the dead node stored on its replica.
        healed_key = on_victim[0].audio
        healed_client = aioredis.Redis(port=new_primary.port)
        stored_then = await healed_client.xlen(healed_key)
        await eventually(lambda: _grew(healed_client, healed_key, stored_then), 15, 0.01)
        healed_after = time.monotonic() - killed_at
        await healed_client.aclose()
        await asyncio.sleep(2.0)
        stop.set()
        sent = await asyncio.gather(*streams)
        written = await asyncio.gather(*writers)

        await eventually(gw.is_ready, 15)
        assert await gw.publisher.flush(15)
        stored = {k.bot_id: await client.xlen(k.audio) for k in keys}
        dropped = sum(
            gw.metrics.registry.get_sample_value("meetstream_gateway_frames_dropped_total", {"reason": r})
            or 0
            for r in ("buffer_full", "redis_error", "overload", "rate_limited")
        )
        print(
            f"\n[failover] promoted after {promoted_after:.1f}s ({victim.port} -> {new_primary.port}), "
            f"its bots' audio stored again after {healed_after:.1f}s; "
            f"sent {sum(sent)}, stored {sum(stored.values())}, dropped {dropped}"
        )
        # Frames: each stored once at least (a retried batch may repeat an entry that had landed).
        for bot_keys, n in zip(keys, sent, strict=True):
            in_stream = [int(f[b"seq"]) for _, f in await client.xrange(bot_keys.audio)]
            assert set(in_stream) == set(range(n)), f"{bot_keys.bot_id}: {n - len(set(in_stream))} missing"
            # In the order the bot sent them (a repeat of a frame already stored aside).
            top, seen, late = -1, set(), []
            for seq in in_stream:
                if seq < top and seq not in seen:
                    late.append(seq)
                top, seen = max(top, seq), seen | {seq}
            assert not late, f"{bot_keys.bot_id}: frames {late[:5]}... stored after later ones"
        assert dropped == 0
        # Commands: every one written reaches its bot.
        for bot, n in zip(bots, written, strict=True):
            await eventually(
                lambda b=bot, n=n: (
                    {c["message"] for c in b.commands("sendmsg")} >= {str(i) for i in range(n)}
                ),
                20,
            )
        for bot in bots:
            await bot.close()
        for c in direct.values():
            await c.aclose()
        await client.aclose()


async def _grew(client: aioredis.Redis, key: str, than: int) -> bool:
    return await client.xlen(key) > than


def _slot(key: str) -> int:
    from redis.crc import key_slot

    return key_slot(key.encode())
