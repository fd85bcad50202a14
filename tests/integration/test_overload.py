"""Overload, on purpose: a hogged event loop sheds audio evenly and says so.

1. A bot streams 20 ms frames into an in-process gateway.
2. Something hogs the gateway's event loop (a stand-in for more bots than a core serves).
3. The gateway reports not-ready, sheds a share of the audio (counted, seq gaps visible)
   and keeps the bot connected; once the hog stops, shedding stops and it is ready again.
4. Every frame sent is stored or counted as shed.
"""

from __future__ import annotations

import asyncio
import time

from gateway.protocol import AudioFrame
from gateway.testing.bot import SimulatedBot
from tests.conftest import running_gateway, ws_url
from tests.helpers import eventually


async def test_hogged_loop_sheds_audio_keeps_bots_and_accounts_for_every_frame(redis_url, redis_client):
    async with running_gateway(redis_url, overload_lag_s=0.1, max_frames_per_s=100_000) as gw:
        bot = SimulatedBot(ws_url(gw), "bot_hot", record_sent=False)
        await bot.connect()
        hogging = True
        readiness: set[bool] = set()

        async def hog():
            while hogging:
                time.sleep(0.15)  # noqa: ASYNC251 - blocking the loop, as too much work would, is the point
                readiness.add(gw.is_ready())
                await asyncio.sleep(0.01)

        frame = AudioFrame("s", "Ada", b"\x01\x00" * 960)
        hog_task = asyncio.create_task(hog())
        sent = 0
        started = time.monotonic()
        while time.monotonic() - started < 3.0:
            await bot.send_frame(frame)
            sent += 1
            await asyncio.sleep(0.005)
        hogging = False
        await hog_task
        registry = gw.metrics.registry
        shed = registry.get_sample_value("meetstream_gateway_frames_dropped_total", {"reason": "overload"})
        keys = gw.keyspace.bot("bot_hot")

        async def settled():
            stored = {int(f[b"seq"]) for _, f in await redis_client.xrange(keys.audio)}
            return stored if len(stored) + shed >= sent else None

        stored = await eventually(settled, 10)
        assert shed > 0
        assert False in readiness  # not-ready while overloaded
        assert len(stored) + shed == sent
        assert len(set(range(sent)) - stored) == shed  # every shed frame is a visible seq gap
        assert bot.audio.close_code is None and bot.control.close_code is None
        await eventually(lambda: gw.bots.shedder.ratio == 0 and gw.is_ready(), 10)
        await bot.close()


async def test_flood_meets_tcp_backpressure_not_loss(redis_url, redis_client):
    """A bot that sends as fast as it can: once unsent audio passes the high-water mark,
    audio sockets stop being read until Redis catches up. The sender is slowed down
    by TCP, and every frame it managed to send is stored: none is dropped."""
    async with running_gateway(
        redis_url,
        publish_backpressure_bytes=64 * 1024,
        max_frames_per_s=1_000_000,
        bot_max_bytes_per_s=1 << 30,
        audio_maxlen=100_000,
        audio_stream_max_bytes=1 << 30,
    ) as gw:
        bot = SimulatedBot(ws_url(gw), "bot_flood", record_sent=False)
        await bot.connect_audio()
        frame = AudioFrame("s", "Ada", b"\x01\x00" * 960)
        sent = 0
        started = time.monotonic()
        while time.monotonic() - started < 2.0:
            await bot.send_frame(frame)
            sent += 1
        keys = gw.keyspace.bot("bot_flood")
        await eventually(lambda: _stored(redis_client, keys.audio, sent), 20)
        registry = gw.metrics.registry
        assert registry.get_sample_value("meetstream_gateway_publish_backpressure_total") > 0
        dropped = sum(
            registry.get_sample_value("meetstream_gateway_frames_dropped_total", {"reason": r}) or 0
            for r in ("buffer_full", "overload", "rate_limited")
        )
        assert dropped == 0
        await bot.close()


async def _stored(client, key, n):
    return await client.xlen(key) == n
