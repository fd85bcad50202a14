"""Who may connect, and the bounds on what a connection may do, against a real gateway."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.auth import mint
from gateway.logs import JsonFormatter, ScrubFilter
from gateway.protocol import AudioFrame
from gateway.testing.bot import SimulatedBot
from tests.conftest import running_gateway, ws_url
from tests.helpers import events_of, eventually

SECRET = "test-secret-0123456789"


def refused(gw, reason):
    return gw.metrics.registry.get_sample_value(
        "meetstream_gateway_connections_refused_total", {"reason": reason}
    )


async def status_of(url, **kwargs):
    with pytest.raises(InvalidStatus) as err:
        async with connect(url, **kwargs):
            pass
    return err.value.response.status_code


async def test_tokens_gate_the_upgrade(redis_url):
    async with running_gateway(redis_url, auth_secret=f"new-secret,{SECRET}") as gw:
        base = ws_url(gw)
        assert await status_of(f"{base}/bot_1/audio") == 401
        assert await status_of(f"{base}/bot_1/audio?token=garbage") == 401
        assert await status_of(f"{base}/bot_1/audio?token={mint('wrong', 60, 'bot_1')}") == 401
        assert await status_of(f"{base}/bot_1/audio?token={mint(SECRET, -5, 'bot_1')}") == 401
        assert await status_of(f"{base}/bot_1/audio?token={mint(SECRET, 60, 'bot_2')}") == 403
        assert [
            refused(gw, r) for r in ("missing", "malformed", "bad_signature", "expired", "wrong_bot")
        ] == [1] * 5
        # A token signed with the old secret still works during rotation; so does the header.
        bot = SimulatedBot(base, "bot_1", query=f"token={mint(SECRET, 60, 'bot_1')}")
        await bot.connect()
        async with connect(
            f"{base}/bot_1/audio", additional_headers={"Authorization": f"Bearer {mint(SECRET, 60, 'bot_1')}"}
        ) as ws:
            await ws.send(json.dumps(bot.handshake()))
        await bot.close()
        assert (
            gw.metrics.registry.get_sample_value(
                "meetstream_gateway_connections_opened_total", {"channel": "audio"}
            )
            == 2
        )


async def test_bound_token_on_bare_path_is_checked_at_handshake(redis_url):
    async with running_gateway(redis_url, auth_secret=SECRET) as gw:
        token = mint(SECRET, 60, "bot_1")
        async with connect(f"{ws_url(gw)}/control?token={token}") as ws:
            await ws.send(json.dumps({"type": "ready", "bot_id": "bot_2", "message": "Ready"}))
            with pytest.raises(ConnectionClosed) as closed:
                await ws.recv()
        assert closed.value.rcvd.code == 4403
        assert gw.bots.registry.get("bot_2") is None


async def test_no_token_reaches_a_log_line(redis_url):
    """Every logger at DEBUG, websockets' request lines included: the token never shows."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ScrubFilter())
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    logging.getLogger("websockets").setLevel(logging.DEBUG)
    token = mint(SECRET, 60, "bot_1")
    try:
        async with running_gateway(redis_url, auth_secret=SECRET) as gw:
            await status_of(f"{ws_url(gw)}/bot_1/audio?token={mint(SECRET, 60, 'bot_9')}")
            await status_of(f"{ws_url(gw)}/bot_1/video?token={token}")
            async with SimulatedBot(ws_url(gw), "bot_1", query=f"token={token}"):
                pass
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        logging.getLogger("websockets").setLevel(logging.WARNING)
    text = out.getvalue()
    assert "token=[redacted]" in text  # websockets did log the request line: the scrubber worked
    assert token not in text
    assert token.split(".")[2] not in text


async def test_rate_limit_drops_the_excess_and_counts_it(redis_url, redis_client):
    async with running_gateway(redis_url, max_frames_per_s=20, rate_burst_s=2.0) as gw:
        bot = SimulatedBot(ws_url(gw), "bot_flood")
        await bot.connect_audio()
        frame = AudioFrame("s", "Ada", b"\x00\x00" * 48)
        # Less than a second burst over: dropped and counted, the connection stays.
        for _ in range(70):
            await bot.send_frame(frame)
        keys = gw.keyspace.bot("bot_flood")
        dropped = await eventually(
            lambda: gw.metrics.registry.get_sample_value(
                "meetstream_gateway_frames_dropped_total", {"reason": "rate_limited"}
            )
        )
        await gw.publisher.flush(5)
        stored = await redis_client.xlen(keys.audio)
        # Every frame is either stored or counted as dropped (the handshake came first and passed).
        assert stored + dropped == 70
        assert 35 <= stored <= 50  # a 2 s burst (40) plus what refilled while sending
        assert bot.audio is not None and bot.audio.close_code is None
        # Dropped frames still take a seq: the next frame that passes shows the gap.
        await asyncio.sleep(0.2)
        await bot.send_frame(frame)
        await gw.publisher.flush(5)
        await eventually(lambda: _xlen_is(redis_client, keys.audio, stored + 1))
        (_, last), *_ = await redis_client.xrevrange(keys.audio, count=1)
        assert int(last[b"seq"]) == 70
        await bot.close()


async def _xlen_is(client, key, n):
    return await client.xlen(key) == n


async def test_a_bot_that_keeps_flooding_is_closed_and_reconnecting_refills_nothing(redis_url, redis_client):
    """Past a whole burst dropped it is abuse, not a catch-up: closed 1008. The limit
    belongs to the bot_id: a new connection starts with the same empty bucket."""
    async with running_gateway(redis_url, max_frames_per_s=20, rate_burst_s=2.0) as gw:
        bot = SimulatedBot(ws_url(gw), "bot_flood")
        await bot.connect_audio()
        frame = AudioFrame("s", "Ada", b"\x00\x00" * 48)
        with contextlib.suppress(ConnectionClosed):
            for _ in range(500):
                await bot.send_frame(frame)
                await asyncio.sleep(0)
        assert bot.audio is not None
        await eventually(lambda: bot.audio.close_code is not None)
        assert bot.audio.close_code == 1008
        await eventually(
            lambda: (
                gw.metrics.registry.get_sample_value(
                    "meetstream_gateway_connections_closed_total",
                    {"channel": "audio", "reason": "policy_violation"},
                )
                == 1
            )
        )
        keys = gw.keyspace.bot("bot_flood")
        await gw.publisher.flush(5)
        before = await redis_client.xlen(keys.audio)
        assert 35 <= before <= 50
        # Reconnect at once and flood again: at most what refilled meanwhile gets through.
        again = SimulatedBot(ws_url(gw), "bot_flood")
        await again.connect_audio()
        with contextlib.suppress(ConnectionClosed):
            for _ in range(30):
                await again.send_frame(frame)
        await gw.publisher.flush(5)
        assert await redis_client.xlen(keys.audio) - before <= 10
        await again.close()


async def test_a_catch_up_after_a_stall_is_not_taken_for_abuse(redis_url, redis_client):
    """The gateway stops reading a bot for 5 s (as behind a saturated Redis); the bot
    keeps streaming within its rate, and its backlog then arrives at once. The default
    burst (10 s of the rate) takes it whole; the old 2 s burst dropped most of it."""
    async with running_gateway(redis_url, max_frames_per_s=25) as gw:
        bot = SimulatedBot(ws_url(gw), "bot_catch_up", record_sent=False)
        await bot.connect_audio()
        session = await eventually(lambda: gw.bots.registry.get("bot_catch_up"))
        session.audio.ws.transport.pause_reading()
        frame = AudioFrame("s", "Ada", b"\x00\x00" * 480)
        for _ in range(100):  # 5 s at 20 frames/s, under the 25/s limit
            await bot.send_frame(frame)
            await asyncio.sleep(0.05)
        session.audio.ws.transport.resume_reading()
        keys = gw.keyspace.bot("bot_catch_up")

        async def stored() -> bool:
            return await redis_client.xlen(keys.audio) == 100

        await eventually(stored, 10, 0.05)
        dropped = gw.metrics.registry.get_sample_value(
            "meetstream_gateway_frames_dropped_total", {"reason": "rate_limited"}
        )
        assert not dropped
        await bot.close()


async def test_oversized_messages(redis_url, redis_client):
    async with (
        running_gateway(redis_url, control_max_message_bytes=1000, ws_max_message_bytes=100_000) as gw,
        SimulatedBot(ws_url(gw), "bot_big") as bot,
    ):
        await bot.control.send(json.dumps({"type": "note", "blob": "x" * 2000}))
        await eventually(
            lambda: (
                gw.metrics.registry.get_sample_value(
                    "meetstream_gateway_frames_dropped_total", {"reason": "too_large"}
                )
                == 1
            )
        )
        # Past the hard cap, the WebSocket layer closes with 1009.
        await bot.audio.send(b"\x01" + b"\x00" * 200_000)
        await eventually(lambda: bot.audio.close_code == 1009, 5)
        assert bot.control.close_code is None  # the control channel is untouched
        # Counted and reported as what it was, not as a bot that left (1006).
        await eventually(
            lambda: (
                gw.metrics.registry.get_sample_value(
                    "meetstream_gateway_connections_closed_total",
                    {"channel": "audio", "reason": "message_too_big"},
                )
                == 1
            ),
            5,
        )
        assert not gw.metrics.registry.get_sample_value(
            "meetstream_gateway_connections_closed_total", {"channel": "audio", "reason": "bot_left"}
        )
        await gw.publisher.flush(5)
        gone = [
            e
            for e in await events_of(redis_client, gw.keyspace.bot("bot_big").events)
            if e["type"] == "disconnected"
        ]
        assert [(e["channel"], e["code"]) for e in gone] == [("audio", "1009")]


async def test_connection_cap_and_idle_timeout(redis_url):
    async with running_gateway(redis_url, max_connections=2, idle_timeout_s=0.6) as gw:
        bot = SimulatedBot(ws_url(gw), "bot_cap")
        await bot.connect()
        assert await status_of(f"{ws_url(gw)}/other/audio") == 503
        assert refused(gw, "over_capacity") == 1
        # Silence on both channels: both are closed as idle.
        await eventually(lambda: bot.audio.close_code == 4410 and bot.control.close_code == 4410, 5)
        await eventually(
            lambda: (
                gw.metrics.registry.get_sample_value(
                    "meetstream_gateway_connections_closed_total", {"channel": "audio", "reason": "idle"}
                )
                == 1
            )
        )
        await bot.close()
        await asyncio.sleep(0)


async def test_keepalive_closes_the_dead_and_spares_the_busy(redis_url):
    """Two bots stop answering pings (their client no longer reads the socket). One
    also stops sending: it is closed with 1011. The other keeps streaming audio: the
    audio proves it alive, so it is never closed (a pong can be stuck behind audio)."""
    async with running_gateway(
        redis_url, ws_ping_interval_s=0.2, ws_ping_timeout_s=0.5, ws_close_timeout_s=0.5
    ) as gw:
        dead = SimulatedBot(ws_url(gw), "bot_dead")
        busy = SimulatedBot(ws_url(gw), "bot_busy", record_sent=False)
        await dead.connect_audio()
        await busy.connect_audio()
        dead.audio.transport.pause_reading()
        busy.audio.transport.pause_reading()
        frame = AudioFrame("s", "Ada", b"\x00\x00" * 480)
        for _ in range(150):  # 3 s of audio at 20 ms
            await busy.send_frame(frame)
            await asyncio.sleep(0.02)
        registry = gw.metrics.registry
        await eventually(
            lambda: (
                registry.get_sample_value(
                    "meetstream_gateway_connections_closed_total",
                    {"channel": "audio", "reason": "keepalive_timeout"},
                )
                == 1
            ),
            5,
        )
        assert gw.bots.registry.get("bot_dead") is None
        assert gw.bots.registry.get("bot_busy") is not None
        busy.audio.transport.resume_reading()
        await busy.close()


async def test_keepalive_keeps_quiet_bots_that_answer_and_pings_them_apart(redis_url):
    """Control channels are silent for minutes in a real meeting: each is pinged when
    its own silence reaches the interval, is kept while it answers, and bots that went
    quiet at different times are not all pinged in the same sweep."""
    async with running_gateway(
        redis_url, ws_ping_interval_s=0.4, ws_ping_timeout_s=0.4, ws_close_timeout_s=0.5
    ) as gw:
        bots = []
        for i in range(4):
            bot = SimulatedBot(ws_url(gw), f"bot_quiet_{i}")
            await bot.connect_control()  # ready, then silent: only pongs come back
            bots.append(bot)
            await asyncio.sleep(0.1)
        sessions = [await eventually(lambda b=b: gw.bots.registry.get(b.bot_id)) for b in bots]
        pongs: list[set[float]] = [set() for _ in bots]
        for _ in range(40):  # 2 s: five intervals
            await asyncio.sleep(0.05)
            for seen, session in zip(pongs, sessions, strict=True):
                if session.control.ws.pong_at:
                    seen.add(session.control.ws.pong_at)
        assert all(b.control.close_code is None for b in bots)
        assert all(gw.bots.registry.get(b.bot_id) is not None for b in bots)
        assert all(len(seen) >= 3 for seen in pongs), [len(seen) for seen in pongs]
        firsts = sorted(min(seen) for seen in pongs)
        assert firsts[-1] - firsts[0] >= 0.15, "every quiet channel was pinged at the same moment"
        for bot in bots:
            await bot.close()


async def test_keepalive_spares_a_bot_whose_data_we_have_not_read_yet(redis_url):
    """The gateway falls behind (here: its side of one socket stops reading), so the
    bot's audio, and any pong, waits in the kernel. The bot is alive: not closed."""
    async with running_gateway(
        redis_url, ws_ping_interval_s=0.2, ws_ping_timeout_s=0.5, ws_close_timeout_s=0.5
    ) as gw:
        bot = SimulatedBot(ws_url(gw), "bot_behind", record_sent=False)
        await bot.connect_audio()
        session = await eventually(lambda: gw.bots.registry.get("bot_behind"))
        session.audio.ws.transport.pause_reading()
        frame = AudioFrame("s", "Ada", b"\x00\x00" * 480)
        for _ in range(100):  # 2 s of audio into a socket the gateway does not read
            await bot.send_frame(frame)
            await asyncio.sleep(0.02)
        assert gw.bots.registry.get("bot_behind") is not None
        assert bot.audio.close_code is None
        session.audio.ws.transport.resume_reading()
        await bot.close()
