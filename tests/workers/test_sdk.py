"""The Worker against a real gateway, real Redis and simulated bots."""

from __future__ import annotations

import asyncio
import itertools

from gateway.testing.bot import SimulatedBot, Speaker
from tests.conftest import ws_url
from tests.workers.conftest import eventually, running
from workers import AudioFrame, Bot, Event, Worker


async def test_handlers_see_ready_audio_and_end_in_order(gateway, worker_settings):
    worker = Worker(worker_settings(), handle_signals=False)
    seen: list[str] = []
    frames: list[AudioFrame] = []
    stops: list[str] = []

    @worker.on("*")
    async def on_event(bot: Bot, event: Event) -> None:
        seen.append(event.type)

    @worker.on_audio
    async def on_audio(bot: Bot, frame: AudioFrame) -> None:
        frames.append(frame)

    @worker.on_bot_stop
    async def on_stop(bot: Bot, reason: str) -> None:
        stops.append(reason)

    async with running(worker):
        bot = SimulatedBot(ws_url(gateway), "bot_sdk")
        await bot.connect()
        await bot.stream_speech([Speaker("s1", "Ada"), Speaker("s2", "Grace", 330)], 1.0, realtime=False)
        await eventually(lambda: len(frames) == 20, what="20 frames")
        await bot.close()
        await eventually(lambda: stops == ["session_ended"], what="bot let go after session_ended")
    assert seen.index("ready") < seen.index("session_ended") == len(seen) - 1
    assert {f.speaker_name for f in frames} == {"Ada", "Grace"}
    assert [f.seq for f in frames] == list(range(20))
    assert frames[0].int16.dtype.name == "int16" and len(frames[0].resample(16_000)) == 1600
    assert worker.stats.seq_gaps == 0


async def test_commands_reach_the_bot(gateway, worker_settings, redis_client):
    worker = Worker(worker_settings(), handle_signals=False)
    done = asyncio.Event()

    @worker.on_ready
    async def talk(bot: Bot, event: Event) -> None:
        await bot.chat("hi")
        await bot.stream_chat(["Hel", "lo", " there"], min_interval_s=0)
        await bot.say(b"\x01\x00" * 48_000 * 3, 48_000)  # 3 s: two entries of 2 s and 1 s
        await bot.interrupt()
        await bot.show_image(b"\x89PNG\r\n\x1a\nfake")
        await bot.show_image_url("https://example.com/a.png")
        done.set()

    async with running(worker), SimulatedBot(ws_url(gateway), "bot_cmd") as bot:
        await asyncio.wait_for(done.wait(), 10)
        await eventually(lambda: "sendimg_url" in [c["command"] for c in bot.commands()], what="last command")
        entries = await redis_client.xrange(worker.bots["bot_cmd"].commands_key)
    # What the SDK wrote: exactly the documented entries, one per command...
    assert [next(iter(f)).decode() for _, f in entries] == ["json"] * 5 + ["msgpack"] * 2 + [
        "json",
        "msgpack",
        "json",
    ]
    # ...and what the bot got, in order (the gateway may re-chunk audio and drop what interrupt cleared).
    names = [c["command"] for c in bot.commands()]
    collapsed = [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n or n == "sendchat"]
    assert collapsed == [
        "sendmsg",
        "sendchat",
        "sendchat",
        "sendchat",
        "sendchat",
        "sendaudio",
        "interrupt",
        "sendimg",
        "sendimg_url",
    ]
    chats = bot.commands("sendchat")
    assert [c["is_final"] for c in chats] == [False, False, False, True]
    assert chats[-1]["text"] == "Hello there"
    assert bot.commands("sendmsg")[0]["message"] == "hi"
    assert not [
        e
        for e in await redis_client.xrange("meetstream:{bot_cmd}:events")
        if e[1][b"type"] == b"command_rejected"
    ]


async def test_own_voice_is_left_out(gateway, worker_settings):
    worker = Worker(worker_settings(bot_name="Notetaker"), handle_signals=False)
    names: list[str] = []
    worker.on_audio(lambda bot, frame: names.append(frame.speaker_name))
    async with running(worker), SimulatedBot(ws_url(gateway), "bot_self") as bot:
        await bot.stream_speech(
            [Speaker("s1", "Ada"), Speaker("me", "Notetaker"), Speaker("", "NoSpeaker")],
            0.5,
            realtime=False,
        )
        await eventually(lambda: len(names) == 10, what="10 frames")
        await asyncio.sleep(0.3)
    assert sorted(set(names)) == ["Ada", "NoSpeaker"]
    assert worker.stats.own_voice_skipped == 5


async def test_slow_handler_does_not_hold_up_other_bots(gateway, worker_settings):
    worker = Worker(worker_settings(), handle_signals=False)
    release = asyncio.Event()
    fast_frames: list[int] = []

    @worker.on_audio
    async def handle(bot: Bot, frame: AudioFrame) -> None:
        if bot.bot_id == "bot_slow":
            await release.wait()
        else:
            fast_frames.append(frame.seq)

    async with (
        running(worker),
        SimulatedBot(ws_url(gateway), "bot_slow") as slow,
        SimulatedBot(ws_url(gateway), "bot_fast") as fast,
    ):
        await slow.stream_speech([Speaker("s1", "Ada")], 0.3, realtime=False)
        await fast.stream_speech([Speaker("s1", "Ada")], 0.5, realtime=False)
        await eventually(lambda: fast_frames == list(range(5)), what="the fast bot's frames, in order")
        release.set()


async def test_two_instances_share_bots_and_clean_stop_hands_back(gateway, worker_settings):
    """1. two instances of one group, four bots: each bot is owned by exactly one;
    2. one instance stops cleanly: the other owns all four well before a lease could expire."""
    a = Worker(worker_settings(lease_ttl_s=30.0, lease_renew_s=1.0), handle_signals=False)
    b = Worker(worker_settings(lease_ttl_s=30.0, lease_renew_s=1.0), handle_signals=False)
    ids = [f"bot_{i}" for i in range(4)]
    async with running(a, b):
        bots = [await SimulatedBot(ws_url(gateway), i).connect() for i in ids]
        try:
            await eventually(lambda: sorted([*a.bots, *b.bots]) == ids, what="every bot owned")
            assert not set(a.bots) & set(b.bots)
            await a.stop()
            await eventually(lambda: sorted(b.bots) == ids, timeout_s=5, what="b owns all bots")
        finally:
            for bot in bots:
                await bot.close()


async def test_a_renewal_that_fails_as_a_whole_lapses_only_the_bots_that_fail_alone(
    gateway, redis_url, monkeypatch
):
    """A dead Cluster node fails the whole renewal pipeline: the instance renews bot by
    bot, and only the bots whose keys live on it lapse (all of them moved, before)."""
    from gateway.testing.bot import SimulatedBot
    from tests.conftest import ws_url
    from tests.workers.conftest import eventually, fast_settings, running
    from workers.leases import Leases
    from workers.worker import Worker

    worker = Worker(fast_settings(redis_url), handle_signals=False)
    bots = [SimulatedBot(ws_url(gateway), f"renew{i}") for i in range(3)]
    async with running(worker):
        for bot in bots:
            await bot.connect()
        await eventually(lambda: len(worker._runners) == 3, 10)
        renew = Leases.renew
        doomed = "renew0"

        async def one_node_down(self, runners):
            if any(r.bot.bot_id == doomed for r in runners):
                raise ConnectionError("node of renew0 is down")
            return await renew(self, runners)

        monkeypatch.setattr(Leases, "renew", one_node_down)
        before = dict(worker._runners)
        await asyncio.sleep(worker.settings.lease_ttl_s * 2)
        # The same runners still handle the healthy bots: never stopped, never taken again.
        for bot_id in ("renew1", "renew2"):
            assert worker._runners.get(bot_id) is before[bot_id], f"{bot_id} lapsed and moved"
        assert worker._runners.get(doomed) is not before[doomed]  # its lease could not be kept
        for bot in bots:
            await bot.close()


async def test_a_read_interval_batches_frames_and_loses_none(gateway, worker_settings):
    """read_interval_ms=200 while a bot streams 1.2 s of 20 ms frames in real time: every
    frame is handled once, in order, and they come in a few reads of several frames each
    (a read per frame, as without the interval, is what costs a worker its CPU)."""
    worker = Worker(worker_settings(read_interval_ms=200), handle_signals=False)
    handled: list[tuple[int, float]] = []
    worker.on_audio(lambda bot, frame: handled.append((frame.seq, asyncio.get_running_loop().time())))
    bot = await SimulatedBot(ws_url(gateway), "paced").connect()
    try:
        async with running(worker):
            await eventually(lambda: "paced" in worker.bots, what="owned")
            await bot.stream_speech([Speaker("s1", "Ada")], 1.2, frame_ms=20)
            await eventually(lambda: len(handled) == 60, what="every frame")
    finally:
        await bot.close()
    assert [seq for seq, _ in handled] == list(range(60))
    reads = 1 + sum(1 for (_, a), (_, b) in itertools.pairwise(handled) if b - a > 0.01)
    assert reads <= 20, f"{reads} reads for 60 frames: the interval did not hold reads back"
