"""Playback end to end: a worker's XADD, the real gateway, and a simulated bot that
models what the meeting hears. Timing assertions are loose on purpose: the
machine is shared; the structure (lengths, order, bounds) is what is asserted."""

from __future__ import annotations

import asyncio
import json
import time

import msgpack
import numpy as np
import soxr

from gateway.testing.bot import PlaybackModel, SimulatedBot
from tests.conftest import running_gateway, ws_url
from tests.helpers import events_of, eventually

CHUNK_S = 0.1
LEAD_S = 0.3


def tone(freq_hz: float, rate: int, seconds: float) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return np.round(np.sin(2 * np.pi * freq_hz * t) * 0.3 * 32767).astype("<i2")


def sendaudio(samples: np.ndarray, rate: int, uid: str = "", **extra: object) -> dict[str, bytes]:
    fields: dict[str, object] = {"command": "sendaudio", "audiochunk": samples.tobytes(), "sample_rate": rate}
    if uid:
        fields["utterance_id"] = uid
    fields.update(extra)
    return {"msgpack": msgpack.packb(fields)}


async def ready(gw, bot_id: str) -> None:
    await eventually(lambda: (s := gw.bots.registry.get(bot_id)) and s.control and s.control.ready)


async def playback_events(client, gw, bot_id: str) -> list[dict[str, str]]:
    events = await events_of(client, gw.keyspace.bot(bot_id).events)
    return [e for e in events if e["type"].startswith("playback_")]


async def has_event(client, gw, bot_id: str, kind: str, count: int = 1) -> bool:
    return sum(e["type"] == kind for e in await playback_events(client, gw, bot_id)) >= count


async def nothing_pending(client, key: str) -> bool:
    return (await client.xpending(key, "gateway"))["pending"] == 0


def dominant_hz(samples: np.ndarray, rate: int = 48_000) -> float:
    spectrum = np.abs(np.fft.rfft(samples.astype(np.float64) * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / rate)[spectrum.argmax()])


async def test_ten_seconds_at_24k_arrive_as_48k_paced_at_real_time_without_gaps(gateway, redis_client):
    bot = SimulatedBot(ws_url(gateway), "bot_tts")
    source = tone(440, 24_000, 10.0)
    async with bot:
        await ready(gateway, "bot_tts")
        keys = gateway.keyspace.bot("bot_tts")
        await redis_client.xadd(keys.commands, sendaudio(source, 24_000, uid="u-10s"))
        await eventually(lambda: has_event(redis_client, gateway, "bot_tts", "playback_finished"), 20)
        await eventually(lambda: nothing_pending(redis_client, keys.commands))
    heard = bot.playback
    commands = bot.commands("sendaudio")
    assert {(c["sample_rate"], c["encoding"], c["channels"], c["endianness"]) for c in commands} == {
        (48000, "pcm16", 1, "little")
    }
    assert all("utterance_id" not in c for c in commands)
    # The right length, and the right samples: what a band-limited conversion gives.
    audio = heard.audio()
    assert len(audio) == 480_000
    expected = soxr.resample(source, 24_000, 48_000, quality="HQ")
    assert np.max(np.abs(audio.astype(np.int32) - expected.astype(np.int32))) <= 2
    # Within one utterance the bot never runs dry for longer than a chunk...
    assert max(heard.gaps_s()) <= CHUNK_S
    # ...is paced at real time (the last chunk is sent one lead before the end)...
    span = heard.chunks[-1].arrived - heard.chunks[0].arrived
    assert 10.0 - LEAD_S - 0.5 < span < 10.0 + 0.5
    # ...and never holds much more than the lead.
    assert max(heard.queued_s(c.arrived) for c in heard.chunks) <= LEAD_S + 0.05
    events = await playback_events(redis_client, gateway, "bot_tts")
    assert [e["type"] for e in events] == ["playback_started", "playback_finished"]
    assert events[1]["utterance_id"] == "u-10s" and events[1]["played_ms"] == "10000"


async def test_interrupt_two_seconds_into_a_minute_stops_within_the_lead_even_on_zoom(gateway, redis_client):
    """1. a 60 s utterance at 16 kHz starts; 2. 2 s later the worker XADDs interrupt;
    3. the interrupt reaches the bot at once, and no audio follows it; 4. a Zoom bot
    (which ignores interrupt) plays at most the lead; a Meet bot stops at once."""
    zoom = PlaybackModel(honours_interrupt=False)
    bot = SimulatedBot(ws_url(gateway), "bot_barge", playback=zoom)
    async with bot:
        await ready(gateway, "bot_barge")
        keys = gateway.keyspace.bot("bot_barge")
        await redis_client.xadd(keys.commands, sendaudio(tone(300, 16_000, 60.0), 16_000, uid="long"))
        await eventually(lambda: zoom.chunks, 5)
        await asyncio.sleep(2.0 - (time.monotonic() - zoom.chunks[0].arrived))
        written = time.monotonic()
        await redis_client.xadd(
            keys.commands, {"json": '{"command":"interrupt","action":"clear_audio_queue"}'}
        )
        await eventually(lambda: zoom.interrupts, 5, interval_s=0.001)
        arrived = zoom.interrupts[0]
        await asyncio.sleep(0.6)  # anything still coming would have come by now
        await eventually(lambda: has_event(redis_client, gateway, "bot_barge", "playback_interrupted"))
        await eventually(lambda: nothing_pending(redis_client, keys.commands))
    latency_s = arrived - written
    print(f"interrupt XADD -> bot: {latency_s * 1000:.1f} ms")
    assert latency_s < 0.25  # a few ms when the machine is quiet
    assert not [c for c in zoom.chunks if c.arrived > arrived]
    assert zoom.heard_after_s(arrived) <= LEAD_S + 0.02
    meet = PlaybackModel(honours_interrupt=True)
    for item in bot.received:
        meet.receive(item.at, item.command)
    assert meet.heard_after_s(arrived) < 0.001
    event = (await playback_events(redis_client, gateway, "bot_barge"))[-1]
    assert event["type"] == "playback_interrupted" and event["utterance_id"] == "long"
    played, dropped = int(event["played_ms"]), int(event["dropped_ms"])
    assert 1700 <= played <= 2700 and played + dropped == 60_000
    assert int(event["sent_ms"]) - played <= LEAD_S * 1000 + 10


async def test_two_utterances_play_in_order(gateway, redis_client):
    bot = SimulatedBot(ws_url(gateway), "bot_two")
    async with bot:
        await ready(gateway, "bot_two")
        keys = gateway.keyspace.bot("bot_two")
        async with redis_client.pipeline(transaction=True) as pipe:
            pipe.xadd(keys.commands, sendaudio(tone(440, 48_000, 1.0), 48_000, uid="a"))
            pipe.xadd(keys.commands, sendaudio(tone(1000, 22_050, 1.0), 22_050, uid="b"))
            await pipe.execute()
        await eventually(lambda: has_event(redis_client, gateway, "bot_two", "playback_finished", 2), 10)
    audio = bot.playback.audio()
    assert len(audio) == 96_000
    assert abs(dominant_hz(audio[:48_000]) - 440) < 5
    assert abs(dominant_hz(audio[48_000:]) - 1000) < 5
    assert max(bot.playback.gaps_s()) <= CHUNK_S
    events = await playback_events(redis_client, gateway, "bot_two")
    assert [(e["type"], e["utterance_id"]) for e in events] == [
        ("playback_started", "a"),
        ("playback_finished", "a"),
        ("playback_started", "b"),
        ("playback_finished", "b"),
    ]


async def test_interim_chat_piling_up_is_coalesced(gateway, redis_client):
    bot = SimulatedBot(ws_url(gateway), "bot_chat")
    async with bot:
        await ready(gateway, "bot_chat")
        keys = gateway.keyspace.bot("bot_chat")
        texts = [
            ("Hel", False),
            ("Hello", False),
            ("Hello wor", False),
            ("Hello world.", True),
            ("Bye", False),
        ]
        # One transaction: the gateway reads all five at once, as if its socket had been slow.
        async with redis_client.pipeline(transaction=True) as pipe:
            for text, final in texts:
                chat = {"command": "sendchat", "role": "assistant", "text": text, "is_final": final}
                pipe.xadd(keys.commands, {"json": json.dumps(chat)})
            await pipe.execute()
        await bot.wait_commands(2, timeout=5)
        await asyncio.sleep(0.3)
        await eventually(lambda: nothing_pending(redis_client, keys.commands))
    assert [(c["text"], c["is_final"]) for c in bot.commands("sendchat")] == [
        ("Hello world.", True),
        ("Bye", False),
    ]
    coalesced = gateway.metrics.registry.get_sample_value("meetstream_gateway_chat_interims_coalesced_total")
    assert coalesced == 3


async def test_five_interims_and_a_final_at_once_reach_the_bot_as_the_final(gateway, redis_client):
    """What PROTOCOL.md and PLAYBACK.md state, found by test: 1. five interims and a final
    written in one MULTI; 2. the bot gets the final only (each interim was still waiting when
    the next arrived); 3. each dropped interim is a ``command_superseded`` event naming the
    entry that replaced it; 4. every entry is acknowledged."""
    bot = SimulatedBot(ws_url(gateway), "bot_chat5")
    async with bot:
        await ready(gateway, "bot_chat5")
        keys = gateway.keyspace.bot("bot_chat5")
        texts = [("H", False), ("He", False), ("Hel", False), ("Hell", False), ("Hello", False)]
        async with redis_client.pipeline(transaction=True) as pipe:
            for text, final in [*texts, ("Hello.", True)]:
                chat = {"command": "sendchat", "role": "assistant", "text": text, "is_final": final}
                pipe.xadd(keys.commands, {"json": json.dumps(chat)})
            ids = [i.decode() for i in await pipe.execute()]
        await bot.wait_commands(1, timeout=5)
        await eventually(lambda: nothing_pending(redis_client, keys.commands))
        await asyncio.sleep(0.2)
        events = await redis_client.xrange(keys.events)
    assert [(c["text"], c["is_final"]) for c in bot.commands("sendchat")] == [("Hello.", True)]
    superseded = [
        (f[b"entry_id"].decode(), f[b"superseded_by"].decode(), f[b"command"])
        for _, f in events
        if f[b"type"] == b"command_superseded"
    ]
    assert superseded == [(ids[i], ids[i + 1], b"sendchat") for i in range(5)]


async def test_what_cannot_play_or_show_is_rejected_with_a_reason(redis_url, redis_client):
    async with running_gateway(redis_url, playback_max_held_s=2.0, image_max_bytes=1000) as gw:
        bot = SimulatedBot(ws_url(gw), "bot_rej")
        async with bot:
            await ready(gw, "bot_rej")
            keys = gw.keyspace.bot("bot_rej")
            floats = (np.sin(np.arange(4000) / 8000 * 2 * np.pi * 200) * 0.5).astype("<f4")  # 0.5 s
            cases = [
                sendaudio(tone(440, 96_000, 0.1), 96_000),
                sendaudio(tone(440, 16_000, 0.1), 16_000, channels=2),
                {
                    "msgpack": msgpack.packb(
                        {
                            "command": "sendaudio",
                            "audiochunk": b"\x00\x00\xc0\x7f",
                            "sample_rate": 16_000,
                            "encoding": "float32",
                        }
                    )
                },
                {"msgpack": msgpack.packb({"command": "sendimg", "img": b"GIF89a" + bytes(20)})},
                {"msgpack": msgpack.packb({"command": "sendimg", "img": b"\xff\xd8\xff" + bytes(2000)})},
                {"json": '{"command":"sendimg_url","img_url":"ftp://example.com/a.png"}'},
                sendaudio(tone(440, 16_000, 1.5), 16_000, uid="fits"),
                sendaudio(tone(440, 16_000, 1.0), 16_000, uid="over"),
                {
                    "msgpack": msgpack.packb(
                        {
                            "command": "sendaudio",
                            "audiochunk": floats.tobytes(),
                            "sample_rate": 8000,
                            "encoding": "float32",
                            "utterance_id": "f32",
                        }
                    )
                },
                {"msgpack": msgpack.packb({"command": "sendimg", "img": b"\x89PNG\r\n\x1a\n" + bytes(20)})},
            ]
            async with redis_client.pipeline(transaction=True) as pipe:
                for fields in cases:
                    pipe.xadd(keys.commands, fields)
                await pipe.execute()
            await eventually(lambda: has_event(redis_client, gw, "bot_rej", "playback_finished", 2), 10)
            await eventually(lambda: nothing_pending(redis_client, keys.commands))
            events = await events_of(redis_client, keys.events)
    rejected = [(e["command"], e["reason"], e["detail"]) for e in events if e["type"] == "command_rejected"]
    assert [(c, r) for c, r, _ in rejected] == [
        ("sendaudio", "bad_field"),
        ("sendaudio", "bad_field"),
        ("sendaudio", "bad_field"),
        ("sendimg", "bad_field"),
        ("sendimg", "too_large"),
        ("sendimg_url", "bad_field"),
        ("sendaudio", "queue_full"),
    ]
    details = [d for _, _, d in rejected]
    assert "96000 Hz is not supported" in details[0]
    assert "mono only" in details[1]
    assert "NaN or infinite" in details[2]
    assert "not a JPEG or PNG" in details[3]
    assert "http:// or https://" in details[5]
    assert "limit is 2s" in details[6]
    assert len(bot.commands("sendimg")) == 1
    assert len(bot.playback.audio()) == 48_000 * 2  # 1.5 s at 16 kHz, then 0.5 s of float32 at 8 kHz
    hits = gw.metrics.registry.get_sample_value(
        "meetstream_gateway_playback_bound_hits_total", {"bound": "held_seconds"}
    )
    assert hits == 1


async def test_control_socket_drop_mid_utterance_replays_it_on_reconnect(gateway, redis_client):
    """1. a 2 s utterance plays; 2. after 0.7 s the control socket drops; 3. the cut is
    reported (reason disconnected) and the entry stays unacked; 4. the bot reconnects
    and the utterance plays again from its start, within the command max age."""
    bot = SimulatedBot(ws_url(gateway), "bot_drop")
    async with bot:
        await ready(gateway, "bot_drop")
        keys = gateway.keyspace.bot("bot_drop")
        await redis_client.xadd(keys.commands, sendaudio(tone(500, 24_000, 2.0), 24_000, uid="again"))
        await eventually(lambda: bot.playback.chunks, 5)
        await asyncio.sleep(0.7)
        await bot.control.close()
        await eventually(lambda: has_event(redis_client, gateway, "bot_drop", "playback_interrupted"))
        pending = await redis_client.xpending(keys.commands, "gateway")
        assert pending["pending"] == 1
        first = len(bot.playback.chunks)
        await bot.connect_control()
        await eventually(lambda: has_event(redis_client, gateway, "bot_drop", "playback_finished"), 10)
        await eventually(lambda: nothing_pending(redis_client, keys.commands))
    replay = bot.playback.chunks[first:]
    assert sum(c.n for c in replay) == 96_000
    events = await playback_events(redis_client, gateway, "bot_drop")
    assert [e["type"] for e in events] == [
        "playback_started",
        "playback_interrupted",
        "playback_started",
        "playback_finished",
    ]
    cut = events[1]
    assert cut["reason"] == "disconnected" and 400 <= int(cut["played_ms"]) <= 1200
