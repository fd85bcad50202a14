"""A shard with more bots than one blocking read waits on is read by several readers.

Each reader's XREADGROUP names at most ``command_read_streams`` command streams
(what a command costs Redis grows with the keys of the read it wakes); these
tests put every bot in one shard and check that commands, membership changes
and other gateways' signals still reach the right bot whichever reader holds it.
"""

from __future__ import annotations

import json

from gateway.testing.bot import SimulatedBot
from tests.conftest import running_gateway, ws_url
from tests.helpers import eventually


def _ready(gw, bot_id: str) -> bool:
    session = gw.bots.registry.get(bot_id)
    return bool(session and session.control and session.control.ready)


async def _send(redis_client, gw, bot_id: str, message: str) -> None:
    keys = gw.keyspace.bot(bot_id)
    await redis_client.xadd(keys.commands, {"json": json.dumps({"command": "sendmsg", "message": message})})


async def test_each_reader_takes_a_few_streams_and_every_command_arrives_in_order(redis_url, redis_client):
    async with running_gateway(redis_url, command_shards=1, command_read_streams=2) as gw:
        bots = [SimulatedBot(ws_url(gw), f"bot-r{i}", record_sent=False) for i in range(5)]
        for bot in bots:
            await bot.connect_control()
        await eventually(lambda: all(_ready(gw, b.bot_id) for b in bots))
        assert gw.bots.delivery.reader.connections == 3  # 2 + 2 + 1 streams
        for n in range(3):
            for bot in bots:
                await _send(redis_client, gw, bot.bot_id, f"{bot.bot_id}/{n}")
        for bot in bots:
            await bot.wait_commands(3, timeout=10)
            assert [c["message"] for c in bot.commands()] == [f"{bot.bot_id}/{n}" for n in range(3)]

        # A bot leaves and another comes: it takes the free place, no reader is added.
        await bots[1].close()
        await eventually(lambda: gw.bots.registry.get("bot-r1") is None)
        late = SimulatedBot(ws_url(gw), "bot-late", record_sent=False)
        await late.connect_control()
        await eventually(lambda: _ready(gw, "bot-late"))
        assert gw.bots.delivery.reader.connections == 3
        await _send(redis_client, gw, "bot-late", "welcome")
        assert (await late.next_command(timeout=10, after=0))["message"] == "welcome"
        await _send(redis_client, gw, "bot-r4", "still here")
        assert (await bots[4].next_command(timeout=10, after=3))["message"] == "still here"
        for bot in [late, *bots[2:], bots[0]]:
            await bot.close()
        await eventually(lambda: gw.bots.delivery.reader.connections == 0)


async def test_another_gateway_takes_over_a_bot_held_by_any_of_the_readers(redis_url, redis_client):
    """A takeover signal goes to the shard's signal stream, which every reader reads: with
    the shard's first readers gone, the bot on the last one is still let go (4409) and its
    commands follow it to the new gateway."""
    async with (
        running_gateway(redis_url, command_shards=1, command_read_streams=1) as a,
        running_gateway(redis_url, command_shards=1, command_read_streams=1) as b,
    ):
        held = [SimulatedBot(ws_url(a), f"bot-h{i}", record_sent=False) for i in range(3)]
        for bot in held:
            await bot.connect_control()
        await eventually(lambda: all(_ready(a, h.bot_id) for h in held))
        assert a.bots.delivery.reader.connections == 3
        signals = a.keyspace.shard_wake(0, a.settings.gateway_id)
        await held[0].close()
        await held[1].close()
        await eventually(lambda: a.bots.delivery.reader.connections == 1)
        # The readers that left did not take the shard's signal stream with them.
        assert await redis_client.xinfo_groups(signals)
        await _send(redis_client, a, held[2].bot_id, "before")
        assert (await held[2].next_command(timeout=10, after=0))["message"] == "before"
        moved = SimulatedBot(ws_url(b), held[2].bot_id, record_sent=False)
        await moved.connect_control()
        await eventually(lambda: held[2].control.close_code == 4409, 10)
        await _send(redis_client, b, held[2].bot_id, "on the new gateway")
        assert (await moved.next_command(timeout=10, after=0))["message"] == "on the new gateway"
        # The shard's last reader on A is gone: its signal stream goes with it.
        await eventually(lambda: a.bots.delivery.reader.connections == 0)
        await eventually(lambda: _gone(redis_client, signals))
        await moved.close()


async def _gone(redis_client, key: str) -> bool:
    return not await redis_client.exists(key)
