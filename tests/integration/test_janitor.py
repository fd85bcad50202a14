"""Housekeeping of command streams (gateway/janitor.py) against a real redis-server.

Each pass is run directly with ``run_once()``; only the lifecycle tests wait for
the janitor's own schedule, with a short interval.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from gateway import janitor as janitor_module
from gateway.embedded_redis import free_port
from gateway.janitor import Janitor
from gateway.keys import COMMAND_GROUP, KeySpace
from gateway.metrics import Metrics
from gateway.redis_conn import connect
from gateway.testing.bot import SimulatedBot
from tests.conftest import gateway_settings, running_gateway, ws_url
from tests.helpers import eventually

SELF = "gw-self"


@pytest.fixture
async def make_janitor(redis_url: str) -> AsyncIterator:
    """Builds janitors on their own Redis connections; stops and closes them all."""
    made: list[Janitor] = []

    async def make(url: str = redis_url, **overrides: object) -> Janitor:
        settings = gateway_settings(url, gateway_id=overrides.pop("gateway_id", SELF), **overrides)
        backend = await connect(settings, url, attempts=1)
        janitor = Janitor(
            backend,
            KeySpace(settings.key_prefix, settings.command_shards),
            settings,
            Metrics(CollectorRegistry()),
        )
        made.append(janitor)
        return janitor

    yield make
    for janitor in made:
        await janitor.stop()
        await janitor.backend.close()


def sample(janitor: Janitor, name: str) -> float:
    value = janitor.metrics.registry.get_sample_value(f"meetstream_gateway_janitor_{name}_total")
    return value or 0.0


async def _consumers(client, key: str) -> dict[str, int]:
    return {c["name"].decode(): c["pending"] for c in await client.xinfo_consumers(key, COMMAND_GROUP)}


async def test_command_stream_of_a_bot_that_never_connects_gets_the_key_ttl(make_janitor, redis_client):
    janitor = await make_janitor()
    ghost = janitor.keyspace.bot("ghost")
    await redis_client.xadd(ghost.commands, {"json": "{}"})
    # Not command streams, or not ours: left without an expiry.
    await redis_client.xadd(ghost.audio, {"pcm": b""})
    await redis_client.set(janitor.keyspace.bot("not-a-stream").commands, "x")
    await redis_client.xadd(KeySpace("other").bot("ghost").commands, {"json": "{}"})
    await redis_client.script_flush()  # the EVALSHA misses once and falls back to EVAL
    assert await redis_client.ttl(ghost.commands) == -1

    result = await janitor.run_once()

    assert 0 < await redis_client.ttl(ghost.commands) <= janitor.settings.key_ttl_s
    assert await redis_client.xlen(ghost.commands) == 1
    for key in (
        ghost.audio,
        janitor.keyspace.bot("not-a-stream").commands,
        KeySpace("other").bot("ghost").commands,
    ):
        assert await redis_client.ttl(key) == -1, key
    assert (result.streams_checked, result.expiries_set, result.round_complete) == (1, 1, True)
    assert sample(janitor, "expiries_set") == 1
    assert sample(janitor, "passes") == 1 and sample(janitor, "errors") == 0

    # A stream that has an expiry keeps it: the next pass changes nothing.
    await redis_client.expire(ghost.commands, 100)
    again = await janitor.run_once()
    assert (again.streams_checked, again.expiries_set) == (1, 0)
    assert 0 < await redis_client.ttl(ghost.commands) <= 100


async def test_glob_characters_in_the_prefix_match_only_themselves(make_janitor, redis_client):
    janitor = await make_janitor(key_prefix="a*b")
    ours = janitor.keyspace.bot("ghost").commands
    lookalike = KeySpace("aXXb").bot("ghost").commands  # matched by an unescaped a*b:...
    for key in (ours, lookalike):
        await redis_client.xadd(key, {"json": "{}"})
    await janitor.run_once()
    assert await redis_client.ttl(ours) > 0
    assert await redis_client.ttl(lookalike) == -1


async def test_stale_consumers_with_nothing_pending_go_pending_and_own_stay(make_janitor, redis_client):
    """1. a command stream's group has four consumers: a gone gateway's with nothing
       pending, one with an unacked command, this gateway's own, and a fresh one;
    2. all but the fresh one idle past the threshold; a pass runs;
    3. only the first is deleted; the unacked command is still pending."""
    janitor = await make_janitor(janitor_consumer_idle_s=0.2)
    key = janitor.keyspace.bot("bot-old").commands
    await redis_client.xgroup_create(key, COMMAND_GROUP, id="0", mkstream=True)
    await redis_client.xadd(key, {"json": json.dumps({"command": "sendmsg", "message": "hi"})})
    await redis_client.xgroup_createconsumer(key, COMMAND_GROUP, "gone-pod")
    await redis_client.xreadgroup(COMMAND_GROUP, "crashed-pod", {key: ">"}, count=1)
    await redis_client.xgroup_createconsumer(key, COMMAND_GROUP, SELF)
    await asyncio.sleep(0.3)
    await redis_client.xgroup_createconsumer(key, COMMAND_GROUP, "new-pod")

    result = await janitor.run_once()

    assert await _consumers(redis_client, key) == {"crashed-pod": 1, SELF: 0, "new-pod": 0}
    assert result.consumers_deleted == 1 and sample(janitor, "consumers_deleted") == 1
    pending = await redis_client.xpending(key, COMMAND_GROUP)
    assert pending["pending"] == 1 and pending["consumers"] == [{"name": b"crashed-pod", "pending": 1}]


@pytest.mark.parametrize("scan_count", [4, 500], ids=["resumed-scans", "one-scan-over-budget"])
async def test_a_pass_is_bounded_and_the_next_resumes_the_scan(
    make_janitor, redis_client, monkeypatch, scan_count
):
    """Whether a pass's budget ends between SCAN calls (4 keys each) or inside one
    SCAN's reply (500: every stream at once), the next pass goes on from there."""
    monkeypatch.setattr(janitor_module, "SCAN_COUNT", scan_count)
    monkeypatch.setattr(janitor_module, "BATCH_PAUSE_S", 0.001)
    janitor = await make_janitor(janitor_max_keys=10)
    keys = [janitor.keyspace.bot(f"ghost-{i}").commands for i in range(25)]
    for key in keys:
        await redis_client.xadd(key, {"json": "{}"})
    for _ in range(200):  # noise the SCAN walks past
        await redis_client.set(f"meetstream:{{noise}}:{_}", "x")

    checked = []
    for _ in range(3):
        result = await janitor.run_once()
        checked.append(result.streams_checked)
        assert result.streams_checked <= 10
    assert checked == [10, 10, 5] and result.round_complete
    assert all([await redis_client.ttl(k) > 0 for k in keys])
    # The next round starts from the beginning and finds every stream again.
    assert (await janitor.run_once()).streams_checked == 10


async def test_a_live_bots_stream_is_left_to_its_gateway(redis_url, redis_client, make_janitor):
    """1. a bot is connected and has received a command (its consumer: nothing pending);
    2. its gateway's own janitor runs with a tiny idle threshold, then another
       replica's with the default one;
    3. its stream's entries and consumer are as before, its expiry too or, if the
       gateway had none on it yet, key_ttl_s (what the gateway's refresh sets), and
       the next command still arrives.

    (The gateway's expiry on arrival can land before the stream exists, which ready
    creates: until the refresh, up to 5 minutes later, the stream may have none.)"""
    async with running_gateway(redis_url, janitor_consumer_idle_s=0.05) as gw:
        bot = SimulatedBot(ws_url(gw), "bot-live")
        await bot.connect()
        keys = gw.keyspace.bot("bot-live")
        await eventually(lambda: _ready(gw, "bot-live"))
        await redis_client.xadd(keys.commands, {"json": json.dumps({"command": "sendmsg", "message": "1"})})
        await bot.wait_commands(1)
        await eventually(lambda: _nothing_pending(redis_client, keys.commands))
        await gw.publisher.flush(5)  # the expiry set once delivery is up has landed (or not)
        ttl = await redis_client.ttl(keys.commands)
        await asyncio.sleep(0.1)

        own = await gw.janitor.run_once()
        other = await (await make_janitor(gateway_id="gw-other")).run_once()

        assert own.expiries_set == (1 if ttl == -1 else 0) and other.expiries_set == 0
        assert own.consumers_deleted == other.consumers_deleted == 0
        assert await _consumers(redis_client, keys.commands) == {gw.settings.gateway_id: 0}
        assert 0 < await redis_client.ttl(keys.commands) <= (gw.settings.key_ttl_s if ttl == -1 else ttl)
        assert await redis_client.xlen(keys.commands) == 1
        await redis_client.xadd(keys.commands, {"json": json.dumps({"command": "sendmsg", "message": "2"})})
        assert (await bot.next_command(after=1))["message"] == "2"
        await bot.close()


def _ready(gw, bot_id: str) -> bool:
    session = gw.bots.registry.get(bot_id)
    return bool(session and session.control and session.control.ready)


async def _nothing_pending(client, key: str) -> bool:
    return (await client.xpending(key, COMMAND_GROUP))["pending"] == 0


async def test_the_gateway_runs_its_janitor_and_stops_it(redis_url, redis_client):
    ghost = KeySpace().bot("ghost")
    await redis_client.xadd(ghost.commands, {"json": "{}"})
    async with running_gateway(redis_url, janitor_interval_s=0.2) as gw:
        await eventually(lambda: _has_ttl(redis_client, ghost.commands), 5)
        assert gw.metrics.registry.get_sample_value("meetstream_gateway_janitor_passes_total") >= 1
        task = gw.janitor._task
    assert task is not None and task.done()
    async with running_gateway(redis_url, janitor_interval_s=0) as gw:
        assert gw.janitor._task is None


async def _has_ttl(client, key: str) -> bool:
    return await client.ttl(key) > 0


async def test_redis_errors_are_counted_and_the_next_pass_goes_on(redis_url, redis_client, make_janitor):
    """1. the janitor's Redis user loses every permission: passes fail, are counted
       and retried, and the task lives on;
    2. the permissions come back: the next pass does its work."""
    await redis_client.acl_setuser(
        "janitor", enabled=True, passwords=["+pw"], keys=["*"], categories=["+@all"]
    )
    try:
        url = redis_url.replace("redis://", "redis://janitor:pw@")
        janitor = await make_janitor(url, janitor_interval_s=0.05)
        ghost = janitor.keyspace.bot("ghost")
        await redis_client.xadd(ghost.commands, {"json": "{}"})
        await redis_client.acl_setuser("janitor", enabled=True, categories=["-@all"])

        janitor.start()
        await eventually(lambda: sample(janitor, "errors") >= 3, 5)
        assert janitor._task is not None and not janitor._task.done()
        assert await redis_client.ttl(ghost.commands) == -1

        await redis_client.acl_setuser("janitor", enabled=True, categories=["+@all"])
        await eventually(lambda: _has_ttl(redis_client, ghost.commands), 5)
        await janitor.stop()
        assert janitor._task is None
    finally:
        await redis_client.acl_deluser("janitor")


async def test_an_unreachable_redis_is_counted_and_stop_is_prompt(make_janitor, redis_url):
    janitor = await make_janitor(janitor_interval_s=0.05)
    # The same janitor, now pointed at a port where nothing listens.
    await janitor.backend.close()
    janitor.backend.client = type(janitor.backend.client).from_url(f"redis://127.0.0.1:{free_port()}/0")
    janitor.start()
    await eventually(lambda: sample(janitor, "errors") >= 2, 5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await janitor.stop()
    assert loop.time() - started < 1
