"""Redis killed and restarted mid-meeting.

1. A bot streams 20 ms frames at 100 frames/s into a gateway process.
2. At 1 s, redis-server is SIGKILLed; at 2.5 s it is restarted on the same port.
3. During the outage the gateway stays connected to the bot and reports not-ready.
4. Afterwards publishing and command delivery resume by themselves.
5. sent == stored (unique seq) + counted as dropped; with the default budget, nothing is dropped.
"""

from __future__ import annotations

import asyncio
import json
import time

import redis.asyncio as aioredis

from gateway.protocol import AudioFrame
from gateway.testing.bot import SimulatedBot, tone
from gateway.testing.process import GatewayProcess
from tests.faults.conftest import report
from tests.helpers import eventually

FRAME = 960  # 20 ms at 48 kHz


async def _stream(bot: SimulatedBot, seconds: float, fps: int = 100) -> int:
    start = time.monotonic()
    n = int(seconds * fps)
    for i in range(n):
        await bot.send_frame(AudioFrame("s1", "Ada", tone(220, FRAME, i * FRAME)))
        delay = start + (i + 1) / fps - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    return n


async def _outage(redis_server, down_at: float, up_at: float, gw: GatewayProcess, seen: dict) -> None:
    await asyncio.sleep(down_at)
    redis_server.kill()
    t0 = time.monotonic()
    while time.monotonic() - t0 < up_at - down_at:
        status, _ = await asyncio.to_thread(gw.http_get, "/readyz")
        seen.setdefault("readyz", set()).add(status)
        await asyncio.sleep(0.2)
    redis_server.start()


async def _run(redis_server, *gateway_args: str, down_at=1.0, up_at=2.5, seconds=4.0):
    with GatewayProcess(redis_server.url, *gateway_args) as gw:
        bot = SimulatedBot(gw.url, "bot_outage", record_sent=False)
        await bot.connect()
        seen: dict = {}
        sent, _ = await asyncio.gather(_stream(bot, seconds), _outage(redis_server, down_at, up_at, gw, seen))
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            # Command delivery resumed too.
            cmd_key = json.loads(await asyncio.to_thread(_keys, "bot_outage"))["commands_key"]
            await client.xadd(cmd_key, {"json": '{"command":"sendmsg","message":"after the outage"}'})
            got = await bot.next_command(timeout=20, after=0)
            assert got["message"] == "after the outage"
            dropped_metric = "meetstream_gateway_frames_dropped_total"
            audio_key = "meetstream:{bot_outage}:audio"

            async def settled():
                stored = {int(f[b"seq"]) for _, f in await client.xrange(audio_key)}
                dropped = await asyncio.to_thread(
                    lambda: (
                        gw.sample(dropped_metric, reason="buffer_full")
                        + gw.sample(dropped_metric, reason="redis_error")
                    )
                )
                return (stored, dropped) if len(stored) + dropped >= sent else None

            stored, dropped = await eventually(settled, 20, 0.2)
            entries = await client.xlen(audio_key)
            # Readiness comes back by itself (the health check runs every 2 s).
            status = await eventually(
                lambda: asyncio.to_thread(lambda: gw.http_get("/readyz")[0] == 200 and 200), 10, 0.2
            )
        finally:
            await client.aclose()
        await bot.close()
        assert bot.control.close_code == 1000 and bot.audio.close_code == 1000  # never dropped by the gateway
    return sent, stored, dropped, entries, seen, status


def _keys(bot_id: str) -> str:
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "keys", bot_id], capture_output=True, text=True, check=True
    ).stdout


async def test_redis_restart_loses_nothing_within_the_budget(durable_redis):
    sent, stored, dropped, entries, seen, status = await _run(
        durable_redis, "--audio-maxlen", "100000", "--audio-stream-max-bytes", str(1 << 30)
    )
    report(
        "redis restart, default budget",
        sent=sent,
        stored_unique=len(stored),
        stored_entries=entries,
        dropped=dropped,
        readyz_during_outage=sorted(seen["readyz"]),
    )
    assert 503 in seen["readyz"]
    assert status == 200
    assert dropped == 0
    assert stored == set(range(sent))
    assert len(stored) + dropped == sent


async def test_redis_outage_past_the_budget_drops_oldest_and_counts_every_frame(durable_redis):
    # 64 KiB holds ~34 frames of 1,920 bytes: a 1.5 s outage at 100 frames/s overflows it.
    sent, stored, dropped, entries, _seen, _ = await _run(
        durable_redis,
        "--audio-maxlen",
        "100000",
        "--audio-stream-max-bytes",
        str(1 << 30),
        "--publish-buffer-bytes",
        "65536",
    )
    report(
        "redis outage over budget",
        sent=sent,
        stored_unique=len(stored),
        stored_entries=entries,
        dropped=dropped,
    )
    assert dropped > 50
    assert len(stored) + dropped == sent
    missing = sorted(set(range(sent)) - stored)
    # What was dropped is the oldest audio of the outage: one contiguous run, newer frames kept.
    assert missing == list(range(missing[0], missing[0] + len(missing)))
