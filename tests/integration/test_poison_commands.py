"""One bad command entry, or one failure inside one bot's handling, hurts no other bot.

Against a real gateway on a real Redis: every poison entry becomes exactly one
``command_rejected`` (and is acked), the shard's reader survives, other bots'
commands flow in order; a failure inside a bot's own tasks closes that bot with
1011, counts it, and detaches its session (never a half-attached bot).
"""

from __future__ import annotations

import json

import msgpack
import pytest
from websockets.exceptions import ConnectionClosed

import gateway.delivery
from gateway.delivery import Delivery
from gateway.keys import COMMAND_GROUP
from gateway.testing.bot import SimulatedBot
from tests.conftest import running_gateway, ws_url
from tests.helpers import events_of, eventually

POISON: list[dict[bytes | str, bytes | str]] = [
    {b"\xff\xfe": b"x"},  # a field name that is not UTF-8
    {"json": "[" * 200_000 + "]" * 200_000},  # deeper than the JSON parser's recursion limit
    {"msgpack": msgpack.packb({b"command": "sendmsg", "message": "hi"})},  # a binary map key
    {"msgpack": msgpack.packb({1: "sendmsg"}, strict_types=False)},  # an integer map key
    {"json": '{"command":"sendmsg","message":"cut \\ud83d"}'},  # a lone surrogate
    {"json": '{"command":"sendchat","role":"assistant","text":"\\ud83d","is_final":true}'},
    {"json": '{"command":"sendaudio","audiochunk":"AAAA","sample_rate":16000,"utterance_id":"\\ud83d"}'},
    {"json": '{"command":"sendmsg","message":' + "[" * 50_000 + "]" * 50_000 + "}"},
]


def sample(gw, name, **labels):
    return gw.metrics.registry.get_sample_value(f"meetstream_gateway_{name}", labels) or 0


def failures(gw) -> float:
    return sum(sample(gw, "bot_failures_total", stage=s) for s in ("receive", "deliver", "send", "unbind"))


async def pending(redis_client, stream: str) -> int:
    return (await redis_client.xpending(stream, COMMAND_GROUP))["pending"]


async def test_poison_entries_are_rejected_one_each_and_others_flow_in_order(redis_url, redis_client):
    # One shard: both bots' commands come back in the same reads, as in the attack.
    async with running_gateway(redis_url, command_shards=1) as gw:
        victim, other = SimulatedBot(ws_url(gw), "victim"), SimulatedBot(ws_url(gw), "bystander")
        await victim.connect()
        await other.connect()
        vkeys, okeys = gw.keyspace.bot("victim"), gw.keyspace.bot("bystander")
        poison_ids = []
        for i, fields in enumerate(POISON):
            poison_ids.append((await redis_client.xadd(vkeys.commands, fields)).decode())
            await redis_client.xadd(
                okeys.commands, {"json": json.dumps({"command": "sendmsg", "message": f"m{i}"})}
            )
        await redis_client.xadd(
            vkeys.commands, {"json": json.dumps({"command": "sendmsg", "message": "after"})}
        )

        received = await other.wait_commands(len(POISON))
        assert [c.command["message"] for c in received] == [f"m{i}" for i in range(len(POISON))]
        assert (await victim.next_command(after=0))["message"] == "after"

        async def rejected():
            events = await events_of(redis_client, vkeys.events)
            return [e for e in events if e["type"] == "command_rejected"]

        events = await eventually(lambda: _at_least(rejected(), len(POISON)))
        assert sorted(e["entry_id"] for e in events) == sorted(poison_ids)  # exactly one each
        assert all(e["reason"] and e["detail"] for e in events)
        await gw.publisher.flush(5)
        assert await pending(redis_client, vkeys.commands) == 0
        assert await pending(redis_client, okeys.commands) == 0
        # Nobody was closed, nothing failed, the reader is still there for both bots.
        assert sample(gw, "connections_closed_total", channel="control", reason="error") == 0
        assert failures(gw) == 0
        assert gw.bots.delivery.reader.connections >= 1
        await redis_client.xadd(
            okeys.commands, {"json": json.dumps({"command": "sendmsg", "message": "last"})}
        )
        assert (await other.next_command())["message"] == "last"
        await victim.close()
        await other.close()


async def _at_least(items, n):
    found = await items
    return found if len(found) >= n else None


async def test_an_entry_our_code_fails_on_is_rejected_not_retried(redis_url, redis_client, monkeypatch):
    """Whatever the bug, the entry becomes one ``unprocessable`` rejection: never a crash
    that leaves it pending to come back on every connection of the bot."""
    parse = gateway.delivery.parse_command

    def buggy(fields, *args, **kwargs):
        if b"boom" in fields:
            raise ZeroDivisionError("a bug")
        return parse(fields, *args, **kwargs)

    monkeypatch.setattr(gateway.delivery, "parse_command", buggy)
    async with running_gateway(redis_url) as gw, SimulatedBot(ws_url(gw), "bot_b") as bot:
        keys = gw.keyspace.bot("bot_b")
        bad = (await redis_client.xadd(keys.commands, {"json": "{}", "boom": "1"})).decode()
        await redis_client.xadd(keys.commands, {"json": json.dumps({"command": "sendmsg", "message": "ok"})})
        assert (await bot.next_command(after=0))["message"] == "ok"
        events = await eventually(lambda: _at_least(_rejections(redis_client, keys.events), 1))
        assert [(e["entry_id"], e["reason"]) for e in events] == [(bad, "unprocessable")]
        assert "ZeroDivisionError" in events[0]["detail"]
        await gw.publisher.flush(5)
        assert await pending(redis_client, keys.commands) == 0
        assert sample(gw, "commands_rejected_total", command="unknown", reason="unprocessable") == 1


async def _rejections(redis_client, key):
    return [e for e in await events_of(redis_client, key) if e["type"] == "command_rejected"]


@pytest.mark.parametrize("where", ["reader_turn", "sender_task"])
async def test_a_failure_inside_one_bot_closes_it_with_1011_and_detaches_it(
    redis_url, redis_client, monkeypatch, where
):
    count_sent = Delivery._count_sent
    doomed = "doomed"

    def failing(self, out):
        if out.name == "sendmsg" and "fail" in out.text:
            raise RuntimeError("a bug in bookkeeping")
        count_sent(self, out)

    monkeypatch.setattr(Delivery, "_count_sent", failing)
    if where == "sender_task":
        # The reader's own turn never writes: everything goes through the bot's sender task.
        monkeypatch.setattr(gateway.delivery.BotWebSocket, "can_send_now", lambda self: False)
    async with running_gateway(redis_url) as gw:
        bot, bystander = SimulatedBot(ws_url(gw), doomed), SimulatedBot(ws_url(gw), "fine")
        await bot.connect_control()
        await bystander.connect()
        keys = gw.keyspace.bot(doomed)
        await redis_client.xadd(
            keys.commands, {"json": json.dumps({"command": "sendmsg", "message": "fail"})}
        )
        assert bot.control is not None
        await eventually(lambda: bot.control.close_code is not None)
        assert bot.control.close_code == 1011
        # Detached: its session ended and was published; only the bystander is connected.
        events = await eventually(lambda: _ended(redis_client, keys.events))
        assert [e["type"] for e in events][-2:] == ["disconnected", "session_ended"]
        assert gw.bots.registry.get(doomed) is None
        assert sample(gw, "bots_connected") == 1
        assert failures(gw) == 1
        assert sample(gw, "connections_closed_total", channel="control", reason="error") == 1
        # The bystander is untouched.
        await redis_client.xadd(
            gw.keyspace.bot("fine").commands, {"json": json.dumps({"command": "sendmsg", "message": "hi"})}
        )
        assert (await bystander.next_command(after=0))["message"] == "hi"
        await bystander.close()
        with pytest.raises(ConnectionClosed):
            await bot.control.recv()


async def _ended(redis_client, key):
    events = await events_of(redis_client, key)
    return events if any(e["type"] == "session_ended" for e in events) else None
