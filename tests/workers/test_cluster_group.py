"""A worker group on a real 3-node Redis Cluster: the member set, the registry and the
journal are one key each, leases live with their bots, and nothing crosses slots."""

from __future__ import annotations

from collections import Counter

import pytest
from redis.asyncio.cluster import RedisCluster

from gateway.testing.bot import SimulatedBot, Speaker
from tests.conftest import running_gateway, ws_url
from tests.workers.conftest import eventually, fast_settings, running
from workers import AudioFrame, Bot, Worker

pytestmark = pytest.mark.cluster


async def test_a_group_shares_bots_across_slots_and_hands_them_back(cluster):
    """1. two instances (conformance mode: frame records in the journal) and eight bots whose
    keys spread over the three nodes; 2. four each; every frame handled once and journalled;
    3. one instance stops: the other owns all eight; no Redis error on either."""
    cluster.flushall()
    handled: Counter[tuple[str, int]] = Counter()

    def build() -> Worker:
        w = Worker(fast_settings(cluster.url, "cl", conformance=True), handle_signals=False)

        @w.on_audio
        async def note(bot: Bot, frame: AudioFrame) -> None:
            handled[(bot.bot_id, frame.seq)] += 1

        return w

    a, b = build(), build()
    client = RedisCluster.from_url(cluster.url)
    await client.initialize()
    try:
        async with running_gateway(cluster.url) as gw, running(a, b):
            ids = [f"cl-{i}" for i in range(8)]
            bots = [await SimulatedBot(ws_url(gw), i, record_sent=False).connect() for i in ids]
            nodes = {client.get_node_from_key(gw.keyspace.bot(i).audio).name for i in ids}
            assert len(nodes) == 3
            await eventually(lambda: len(a.bots) == len(b.bots) == 4, timeout_s=10, what="4 and 4")
            for bot in bots:
                await bot.stream_speech([Speaker("s1", "Ada")], 0.5, realtime=False)
            await eventually(lambda: len(handled) == 8 * 5, what="every frame")
            await a.stop()
            await eventually(lambda: sorted(b.bots) == ids, timeout_s=5, what="b owns all")
            for bot in bots:
                await bot.close()
            await eventually(lambda: not b.bots, timeout_s=10, what="every bot let go")
        journal = await client.xrange("meetstream:workers:cl:journal")
    finally:
        await client.aclose()
    assert set(handled.values()) == {1}
    kinds = Counter(f[b"type"].decode() for _, f in journal)
    assert kinds["frame"] == 40 and kinds["hello"] == 2 and kinds["bye"] == 2
    assert a.stats.redis_errors == b.stats.redis_errors == 0
