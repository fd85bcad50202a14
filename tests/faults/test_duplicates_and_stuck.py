"""The same bot on two replicas at once, and a bot that stops reading."""

from __future__ import annotations

import asyncio
import json
import time

import redis.asyncio as aioredis

from gateway.keys import KeySpace
from gateway.testing.bot import SimulatedBot
from gateway.testing.process import GatewayProcess
from tests.conftest import running_gateway, ws_url
from tests.faults.conftest import report
from tests.helpers import eventually


async def test_newest_connection_wins_across_replicas(durable_redis):
    """1. A bot's control channel is on replica A; a worker writes 25 commands a second.
    2. The bot reconnects to replica B while its socket on A is half-open: still open for A,
       but the bot no longer reads it (anything arriving there after the takeover is lost).
    3. A closes its socket with 4409 as soon as B has taken over; every command reaches the bot:
       before the takeover on A's socket, after it on B's. Nothing goes to the dead one unrepeated.
    """
    keys = KeySpace().bot("bot_dup")
    client = aioredis.Redis.from_url(durable_redis.url)
    with GatewayProcess(durable_redis.url) as a, GatewayProcess(durable_redis.url) as b:
        old = SimulatedBot(a.url, "bot_dup")
        await old.connect_control()
        await eventually(lambda: a.sample("meetstream_gateway_bots_connected") == 1, 10)
        written: list[str] = []

        async def worker():
            for i in range(75):
                await client.xadd(
                    keys.commands, {"json": json.dumps({"command": "sendmsg", "message": str(i)})}
                )
                written.append(str(i))
                await asyncio.sleep(0.04)

        new = SimulatedBot(b.url, "bot_dup")

        async def reconnect():
            await asyncio.sleep(1.0)
            await new.connect_control()

        await asyncio.gather(worker(), reconnect())
        takeover = await asyncio.to_thread(
            b.wait_log, lambda r: r.get("msg") == "taking bot over from another gateway"
        )
        cutoff_ms = takeover["ts"] * 1000
        await eventually(lambda: old.control.close_code == 4409, 10)
        before = {r.command["message"] for r in old.received if r.wall_ms <= cutoff_ms}
        after_on_dead = {r.command["message"] for r in old.received if r.wall_ms > cutoff_ms}
        await eventually(lambda: set(written) <= before | {c["message"] for c in new.commands()}, 15)
        on_new = [c["message"] for c in new.commands()]
        report(
            "duplicate connection across replicas",
            written=len(written),
            on_old_before_takeover=len(before),
            on_old_after_takeover=len(after_on_dead),
            on_new=len(on_new),
            repeated=len(before & set(on_new)),
            acks_refused=a.sample("meetstream_gateway_command_acks_refused_total"),
        )
        assert set(written) == before | set(on_new)
        # What the old socket got after the takeover was sent again on the new one.
        assert after_on_dead <= set(on_new)
        assert on_new[-1] == written[-1]
        await eventually(lambda: _no_pending(client, keys.commands), 10)
        await new.close()
        await old.close()
    await client.aclose()


async def _no_pending(client, stream):
    return (await client.xpending(stream, "gateway"))["pending"] == 0


async def test_stuck_bot_is_disconnected_and_nobody_else_notices(redis_url, redis_client):
    """1. Two bots on one gateway; the stuck one stops reading its control channel.
    2. A worker floods the stuck bot with 200 KB chat commands, and writes to the healthy one.
    3. The gateway closes the stuck bot (send timeout); the healthy one is served throughout.
    4. Commands the stuck bot never took stay pending, for its next connection.
    """
    async with running_gateway(redis_url, send_timeout_s=1.0, ws_close_timeout_s=1.0) as gw:
        stuck = SimulatedBot(ws_url(gw), "bot_stuck")
        healthy = SimulatedBot(ws_url(gw), "bot_ok")
        await stuck.connect_control()
        await healthy.connect_control()
        await eventually(
            lambda: all(
                gw.bots.registry.get(b) and gw.bots.registry.get(b).control.ready
                for b in ("bot_stuck", "bot_ok")
            )
        )
        stuck.stop_reading()
        stuck_keys, ok_keys = gw.keyspace.bot("bot_stuck"), gw.keyspace.bot("bot_ok")
        big = "x" * 200_000
        for _ in range(100):
            await redis_client.xadd(
                stuck_keys.commands, {"json": json.dumps({"command": "sendmsg", "message": big})}
            )
        latencies = []
        for i in range(20):
            t0 = time.monotonic()
            await redis_client.xadd(
                ok_keys.commands, {"json": json.dumps({"command": "sendmsg", "message": str(i)})}
            )
            await healthy.wait_commands(i + 1, timeout=10)
            latencies.append(time.monotonic() - t0)
            await asyncio.sleep(0.1)
        await eventually(
            lambda: (
                gw.metrics.registry.get_sample_value(
                    "meetstream_gateway_connections_closed_total",
                    {"channel": "control", "reason": "too_slow"},
                )
                == 1
            ),
            15,
        )
        pending = (await redis_client.xpending(stuck_keys.commands, "gateway"))["pending"]
        unread = await redis_client.xlen(stuck_keys.commands)
        report(
            "stuck bot",
            commands_to_stuck=100,
            healthy_max_latency_ms=round(max(latencies) * 1000, 1),
            stuck_pending_after_close=pending,
            stuck_stream_len=unread,
        )
        assert [c["message"] for c in healthy.commands()] == [str(i) for i in range(20)]
        assert gw.bots.registry.get("bot_stuck") is None
        # Nothing was acknowledged that the bot did not take: all still pending, or never read.
        delivered = (
            gw.metrics.registry.get_sample_value(
                "meetstream_gateway_commands_delivered_total", {"command": "sendmsg"}
            )
            - 20
        )
        assert delivered < 100
        await healthy.close()
        await stuck.close()
