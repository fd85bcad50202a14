"""A gateway replica killed with SIGKILL, and one stopped with SIGTERM mid-meeting."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest
import redis.asyncio as aioredis
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.keys import KeySpace
from gateway.protocol import AudioFrame
from gateway.testing.bot import SimulatedBot, tone
from gateway.testing.process import GatewayProcess
from tests.faults.conftest import report
from tests.helpers import eventually


async def test_killed_replica_commands_are_delivered_by_the_next(durable_redis):
    """1. A bot's control channel is on replica A; a worker writes 20 commands a second.
    2. A is SIGKILLed at 1 s; the bot sees its socket drop and, like a real bot, reconnects
       0.5 s later, to replica B.
    3. The worker writes for 3 s in all: every command arrives, B's in stream order.
    """
    keys = KeySpace().bot("bot_crash")
    client = aioredis.Redis.from_url(durable_redis.url)
    with GatewayProcess(durable_redis.url) as a, GatewayProcess(durable_redis.url) as b:
        bot = SimulatedBot(a.url, "bot_crash")
        await bot.connect_control()
        await eventually(lambda: a.sample("meetstream_gateway_bots_connected") == 1, 10)
        written: list[str] = []

        async def worker():
            for i in range(60):
                await client.xadd(
                    keys.commands, {"json": json.dumps({"command": "sendmsg", "message": str(i)})}
                )
                written.append(str(i))
                await asyncio.sleep(0.05)

        async def crash():
            await asyncio.sleep(1.0)
            await asyncio.to_thread(a.kill)
            await eventually(lambda: bot.control.close_code is not None, 5)
            await asyncio.sleep(0.5)
            bot.base_url = b.url
            await bot.connect_control()

        await asyncio.gather(worker(), crash())
        await eventually(lambda: {c["message"] for c in bot.commands()} >= set(written), 15)
        received = [c["message"] for c in bot.commands()]
        duplicates = len(received) - len(set(received))
        report(
            "gateway SIGKILL",
            written=len(written),
            received=len(received),
            unique=len(set(received)),
            duplicates=duplicates,
        )
        assert set(received) == set(written)
        assert received[-1] == written[-1]
        b_part = _ordered_tail(received)
        assert b_part == sorted(b_part, key=int)
        await eventually(lambda: _no_pending(client, keys.commands), 10)
        await bot.close()
    await client.aclose()


def _ordered_tail(received: list[str]) -> list[str]:
    """The commands after the last time the sequence went backwards (the redelivery point)."""
    last_break = 0
    for i in range(1, len(received)):
        if int(received[i]) <= int(received[i - 1]):
            last_break = i
    return received[last_break:]


async def _no_pending(client, stream):
    return (await client.xpending(stream, "gateway"))["pending"] == 0


async def test_sigterm_drains_then_closes_with_1012_and_flushes(durable_redis):
    """1. A bot streams audio into a gateway process.
    2. SIGTERM: /readyz turns 503 at once and new handshakes get HTTP 503.
    3. The bot already there keeps streaming through the drain (2 s).
    4. Then it is closed with 1012, the process exits 0, and every frame sent is in Redis.
    """
    with GatewayProcess(durable_redis.url, "--drain-timeout-s", "2") as gw:
        bot = SimulatedBot(gw.url, "bot_drain", record_sent=False)
        await bot.connect()
        sent = 0

        async def stream():
            nonlocal sent
            start = time.monotonic()
            while bot.audio.close_code is None and time.monotonic() - start < 10:
                try:
                    await bot.send_frame(AudioFrame("s", "Ada", tone(300, 960, sent * 960)))
                except Exception:
                    break
                sent += 1
                await asyncio.sleep(0.01)

        streaming = asyncio.create_task(stream())
        await asyncio.sleep(0.5)
        gw.signal(signal.SIGTERM)
        await eventually(lambda: gw.http_get("/readyz")[0] == 503, 5)
        with pytest.raises(InvalidStatus) as err:
            async with connect(f"{gw.url}/bot_new/control"):
                pass
        assert err.value.response.status_code == 503
        sent_at_sigterm = sent
        await streaming
        assert sent - sent_at_sigterm > 100  # it kept working during the drain
        assert bot.audio.close_code == 1012
        await eventually(lambda: bot.control.close_code == 1012, 5)
        assert await asyncio.to_thread(gw.wait, 20) == 0
    client = aioredis.Redis.from_url(durable_redis.url)
    entries = await client.xrange("meetstream:{bot_drain}:audio")
    await client.aclose()
    stored = {int(f[b"seq"]) for _, f in entries}
    report("SIGTERM drain", sent=sent, stored=len(stored), sent_during_drain=sent - sent_at_sigterm)
    # A frame in flight when the socket closed may not have reached the gateway;
    # every frame it took is in Redis.
    assert stored == set(range(len(stored)))
    assert sent - 2 <= len(stored) <= sent
