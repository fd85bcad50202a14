"""Each example worker, embedded, against the real gateway and a simulated bot."""

from __future__ import annotations

import asyncio
import wave

import numpy as np

from gateway.testing.bot import SimulatedBot, Speaker
from tests.conftest import ws_url
from tests.workers.conftest import eventually, running
from workers.audio import VoiceDetector, write_wav
from workers.examples import announcer, bargein, greeter, recorder


async def test_greeter_chats_on_ready(gateway, worker_settings):
    worker = greeter.build(worker_settings("greeter"), "Hi all", handle_signals=False)
    async with running(worker), SimulatedBot(ws_url(gateway), "bot_greet") as bot:
        assert await bot.next_command(timeout=10) == {
            "command": "sendmsg",
            "bot_id": "bot_greet",
            "message": "Hi all",
            "msg": "Hi all",
        }


async def test_recorder_writes_one_wav_per_speaker_and_closes_it(gateway, worker_settings, tmp_path):
    worker = recorder.build(worker_settings("recorder"), tmp_path, handle_signals=False)
    speakers = [Speaker("s1", "Ada"), Speaker("s2", "Grace", 330)]
    async with running(worker):
        bot = await SimulatedBot(ws_url(gateway), "bot_rec").connect()
        await bot.stream_speech(speakers, 1.0, realtime=False)
        await bot.close()
        await eventually(lambda: len(worker.recorder.closed) == 2, what="both files closed")
    files = sorted(p.name for p in (tmp_path / "bot_rec").iterdir())
    assert files == ["Ada_s1.wav", "Grace_s2.wav"]
    sent = b"".join(f.pcm for f in bot.sent_frames if f.speaker_name == "Ada")
    with wave.open(str(tmp_path / "bot_rec" / "Ada_s1.wav")) as wf:
        assert (wf.getframerate(), wf.getnchannels(), wf.getsampwidth()) == (48_000, 1, 2)
        assert wf.readframes(wf.getnframes()) == sent


async def test_bargein_interrupts_when_a_person_talks_over_the_bot(gateway, worker_settings):
    """1. the bot is ready: the worker plays an 8 s prompt; 2. a person starts talking;
    3. the worker sends ``interrupt`` and says so in the chat, once."""
    worker = bargein.build(worker_settings("bargein"), prompt_s=8.0, handle_signals=False)
    async with running(worker), SimulatedBot(ws_url(gateway), "bot_barge") as bot:
        await bot.wait_commands(1, timeout=10)
        assert bot.commands()[0]["command"] == "sendaudio"
        await bot.stream_speech(
            [Speaker("", "NoSpeaker", 300)], 0.5, realtime=False
        )  # ignored: maybe the bot
        await bot.stream_speech([Speaker("s1", "Ada", 220)], 1.0, realtime=False)
        await eventually(lambda: bot.commands("sendmsg"), what="the barge-in chat message")
        await asyncio.sleep(0.3)
    names = [c["command"] for c in bot.commands() if c["command"] != "sendaudio"]
    assert names == ["interrupt", "sendmsg"]
    assert "Ada started talking" in bot.commands("sendmsg")[0]["message"]


async def test_bargein_stays_quiet_when_the_bot_is_not_playing(gateway, worker_settings):
    worker = bargein.build(worker_settings("bargein"), prompt_s=0.1, handle_signals=False)
    async with running(worker), SimulatedBot(ws_url(gateway), "bot_quiet") as bot:
        await bot.wait_commands(1, timeout=10)
        await asyncio.sleep(0.3)  # the 0.1 s prompt is over
        await bot.stream_speech([Speaker("s1", "Ada", 220)], 0.5, realtime=False)
        await asyncio.sleep(0.5)
    assert [c["command"] for c in bot.commands()] == ["sendaudio"]


async def test_announcer_plays_a_wav_file(gateway, worker_settings, tmp_path):
    path = tmp_path / "hello.wav"
    write_wav(path, (np.sin(np.arange(16_000) / 5) * 8000).astype(np.int16), 16_000)  # 1 s at 16 kHz
    worker = announcer.build(worker_settings("announcer"), path, handle_signals=False)
    async with running(worker), SimulatedBot(ws_url(gateway), "bot_ann") as bot:
        await eventually(
            lambda: sum(len(c["audiochunk"]) for c in bot.commands("sendaudio")) >= 128_000,
            what="one second of audio at the bot",
        )
    chunks = bot.commands("sendaudio")
    assert {c["sample_rate"] for c in chunks} == {48_000}


def test_voice_detector_onset_and_hangover():
    rate = 48_000
    t = np.arange(4800) / rate
    voice = (0.3 * np.sin(2 * np.pi * 200 * t) * 32767).astype(np.int16)
    hiss = (np.random.default_rng(1).normal(0, 0.3, 4800) * 32767).clip(-32768, 32767).astype(np.int16)
    silence = np.zeros(4800, dtype=np.int16)
    vad = VoiceDetector()
    assert [vad.update(voice, rate) for _ in range(2)] == [None, True]  # onset after two frames
    assert all(vad.update(hiss, rate) is None for _ in range(4))  # broadband noise is not voice
    assert vad.update(silence, rate) is False  # fifth quiet frame ends it
