"""MeetstreamTransport in a Pipecat pipeline, with Pipecat's test utilities and a gateway
stand-in: the transport's commands are captured where the Redis client would write them,
and the stand-in answers ``sendaudio`` and ``interrupt`` with the playback events the real
gateway would publish (the real one is in test_e2e.py)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgpack
import numpy as np
import pytest

pytest.importorskip("pipecat")

import soxr
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    ClientConnectedFrame,
    EndFrame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    OutputImageRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    URLImageRawFrame,
    UserAudioRawFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.frame_processor import FrameDirection
from pipecat.tests.utils import QueuedFrameProcessor, SleepFrame, run_test
from pipecat.workers.runner import WorkerRunner

from workers import AudioFrame, Bot, Event
from workers.pipecat import MeetstreamParams, MeetstreamTransport

RATE_IN = 48_000


class FakeGateway:
    """Where ``Bot.send`` XADDs go: records commands; plays audio at ``speed`` x real time."""

    def __init__(self, speed: float = 20.0) -> None:
        self.commands: list[dict[str, Any]] = []
        self.transport: MeetstreamTransport | None = None
        self.speed = speed
        self._n = 0
        self._playing: dict[str, asyncio.Task[None]] = {}

    async def xadd(
        self, key: str, fields: dict[str, Any], maxlen: int = 0, approximate: bool = True
    ) -> bytes:
        self._n += 1
        entry_id = f"{self._n}-0"
        cmd = msgpack.unpackb(fields["msgpack"]) if "msgpack" in fields else json.loads(fields["json"])
        self.commands.append(cmd)
        if cmd["command"] == "sendaudio":
            ms = len(cmd["audiochunk"]) / 2 / cmd["sample_rate"] * 1000
            self._playing[entry_id] = asyncio.create_task(self._play(entry_id, cmd["utterance_id"], ms))
        elif cmd["command"] == "interrupt":
            for eid, task in list(self._playing.items()):
                task.cancel()
                await self._event("playback_interrupted", entry_id=eid, reason="interrupt")
            self._playing.clear()
        return entry_id.encode()

    async def _play(self, entry_id: str, uid: str, ms: float) -> None:
        await asyncio.sleep(0.005)
        await self._event("playback_started", entry_id=entry_id, utterance_id=uid, duration_ms=round(ms))
        await asyncio.sleep(ms / 1000 / self.speed)
        self._playing.pop(entry_id, None)
        await self._event("playback_finished", entry_id=entry_id, utterance_id=uid, duration_ms=round(ms))

    async def _event(self, kind: str, **fields: Any) -> None:
        assert self.transport is not None
        f = {"type": kind, "bot_id": "bot_1", **{k: str(v) for k, v in fields.items()}}
        await self.transport.feed_event(Event(kind, "bot_1", f, f"{kind}-event"))

    def named(self, name: str) -> list[dict[str, Any]]:
        return [c for c in self.commands if c["command"] == name]


def make_transport(**params: Any) -> tuple[MeetstreamTransport, FakeGateway]:
    gw = FakeGateway()
    bot = Bot("bot_1", "meetstream:{c01}:bot_1:commands", gw)
    params.setdefault("bot_speaking_period_s", 10.0)  # keep BotSpeakingFrame out of frame lists
    transport = MeetstreamTransport(bot, MeetstreamParams(**params))
    gw.transport = transport
    return transport, gw


def speaking(frames: Any) -> list[type]:
    return [type(f) for f in frames if isinstance(f, (BotStartedSpeakingFrame, BotStoppedSpeakingFrame))]


def tone48(freq: float, n: int, start: int = 0) -> np.ndarray:
    t = (np.arange(n) + start) / RATE_IN
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def bot_frame(seq: int, pcm: bytes, speaker: tuple[str, str] = ("spk-1", "Ada")) -> AudioFrame:
    return AudioFrame("bot_1", speaker[0], speaker[1], pcm, RATE_IN, seq, "c1", 0, f"{seq}-0")


async def run_input(transport: MeetstreamTransport, feed: Any, rate: int = 16_000) -> list[Any]:
    """Run ``[transport.input(), sink]`` (Pipecat's QueuedFrameProcessor), call ``feed``, end."""
    received: asyncio.Queue[Any] = asyncio.Queue()
    sink = QueuedFrameProcessor(queue=received, queue_direction=FrameDirection.DOWNSTREAM)
    worker = PipelineWorker(
        Pipeline([transport.input(), sink]),
        params=PipelineParams(audio_in_sample_rate=rate),
        enable_rtvi=False,
        idle_timeout_secs=None,
    )
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")
    async def _on_started(_w: Any, _f: Any) -> None:
        started.set()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    run = asyncio.create_task(runner.run())
    await asyncio.wait_for(started.wait(), 5)
    await feed()
    await asyncio.sleep(0.1)
    await worker.queue_frame(EndFrame())
    await asyncio.wait_for(run, 10)
    frames = []
    while not received.empty():
        frames.append(received.get_nowait())
    return frames


async def test_meeting_audio_reaches_the_pipeline_resampled_without_seams_and_attributed() -> None:
    """1 s of a 48 kHz tone in 50 frames of 20 ms arrives at 16 kHz as UserAudioRawFrames of
    the speaker, equal to soxr's one-shot conversion of the whole second: no seam at any
    frame boundary. Frames before the pipeline started, and unattributed ones, are counted
    and left out."""
    transport, _ = make_transport(silence_fill=False)
    signal = tone48(440, RATE_IN)
    await transport.feed_audio(bot_frame(0, b"\0\0" * 960))  # before the pipeline runs
    connected: list[Any] = []

    @transport.event_handler("on_client_connected")
    async def _connected(_t: Any, bot: Bot) -> None:
        connected.append(bot.bot_id)

    async def feed() -> None:
        for i in range(50):
            chunk = (signal[i * 960 : (i + 1) * 960] * 32767).astype("<i2").tobytes()
            await transport.feed_audio(bot_frame(i + 1, chunk))
        await transport.feed_audio(bot_frame(99, b"\1\0" * 960, ("", "NoSpeaker")))

    frames = await run_input(transport, feed)
    audio = [f for f in frames if isinstance(f, UserAudioRawFrame)]
    assert audio and all(f.sample_rate == 16_000 and f.user_id == "spk-1" for f in audio)
    assert all(f.metadata["speaker_name"] == "Ada" for f in audio)
    got = np.concatenate([np.frombuffer(f.audio, "<i2") for f in audio]).astype(np.float32) / 32767
    pcm16 = (signal * 32767).astype("<i2").astype(np.float32) / 32767
    want = soxr.resample(pcm16, RATE_IN, 16_000, quality="LQ")
    n = min(len(got), len(want)) - 200  # the streaming resampler holds its last few ms
    assert n > 15_000
    assert np.max(np.abs(got[:n] - want[:n])) < 3 / 32767, "chunked conversion must equal one-shot"
    assert any(isinstance(f, ClientConnectedFrame) for f in frames) and connected == ["bot_1"]
    stats = transport.stats
    assert (stats.dropped_not_started, stats.dropped_unattributed, stats.frames_to_pipeline) == (
        1,
        1,
        len(audio),
    )


async def test_silence_fills_the_input_while_nobody_talks() -> None:
    """After 100 ms without audio the input carries silence in real time (VAD must see
    speech end); about 0.6 s of it arrives in 0.7 s of quiet."""
    transport, _ = make_transport(silence_fill=True, silence_fill_after_ms=100)

    async def feed() -> None:
        for i in range(5):
            await transport.feed_audio(bot_frame(i, (tone48(300, 960) * 32767).astype("<i2").tobytes()))
        await asyncio.sleep(0.7)

    frames = await run_input(transport, feed)
    audio = [f for f in frames if isinstance(f, UserAudioRawFrame)]
    total_s = sum(f.num_frames for f in audio) / 16_000
    assert 0.5 < total_s < 1.0, total_s
    assert 400 <= transport.stats.silence_fill_ms <= 800


async def test_speech_out_interrupt_and_speaking_frames_from_playback() -> None:
    """TTS audio is written as sendaudio under one utterance id, at the pipeline's rate;
    BotStarted/StoppedSpeakingFrame come when the gateway says the audio started and
    finished playing; an InterruptionFrame writes ``interrupt`` after the audio."""
    transport, gw = make_transport()
    pcm = (tone48(200, 48_000) * 32767).astype("<i2").tobytes()  # 2 s at 24 kHz
    chunks = [TTSAudioRawFrame(pcm[i : i + 1920], 24_000, 1) for i in range(0, len(pcm), 1920)]
    down, up = await run_test(
        transport.output(),
        frames_to_send=[TTSStartedFrame(), *chunks, TTSStoppedFrame(), SleepFrame(0.6)],
        pipeline_params=PipelineParams(audio_out_sample_rate=24_000),
    )
    audio = gw.named("sendaudio")
    assert {c["sample_rate"] for c in audio} == {24_000} and len({c["utterance_id"] for c in audio}) == 1
    assert sum(len(c["audiochunk"]) for c in audio) == len(pcm)
    assert len(audio) <= 25, "written in entries of ~100 ms, not frame by frame"
    assert speaking(up) == [BotStartedSpeakingFrame, BotStoppedSpeakingFrame]
    assert sum(isinstance(f, BotStartedSpeakingFrame) for f in down) == 1
    assert transport.stats.audio_out_ms == pytest.approx(2000, abs=1)

    transport, gw = make_transport()
    gw.speed = 1.0  # plays in real time: 2 s, interrupted after 0.3 s
    down, up = await run_test(
        transport.output(),
        frames_to_send=[TTSStartedFrame(), *chunks, SleepFrame(0.3), InterruptionFrame(), SleepFrame(0.2)],
        pipeline_params=PipelineParams(audio_out_sample_rate=24_000),
    )
    names = [c["command"] for c in gw.commands]
    assert "interrupt" in names and set(names[names.index("interrupt") + 1 :]) <= {"sendchat"}
    assert speaking(up) == [BotStartedSpeakingFrame, BotStoppedSpeakingFrame]
    assert transport.stats.interrupts_sent == 1


async def test_text_becomes_interim_then_final_chat_and_images_become_sendimg() -> None:
    transport, gw = make_transport(chat_interim_interval_s=0.0)
    image = OutputImageRawFrame(bytes(4 * 4 * 3), (4, 4), "RGB")
    url = URLImageRawFrame(b"", (0, 0), None, url="https://example.com/a.png")
    await run_test(
        transport.output(),
        frames_to_send=[
            LLMFullResponseStartFrame(),
            LLMTextFrame("Hello"),
            LLMTextFrame(" there."),
            LLMFullResponseEndFrame(),
            image,
            SleepFrame(0.1),
        ],
    )
    chats = gw.named("sendchat")
    assert [(c["text"], c["is_final"]) for c in chats] == [
        ("Hello", False),
        ("Hello there.", False),
        ("Hello there.", True),
    ]
    [img] = gw.named("sendimg")
    assert img["img"][:3] == b"\xff\xd8\xff", "raw RGB is encoded as JPEG"

    transport, gw = make_transport(image_min_interval_s=0.0)
    await run_test(transport.output(), frames_to_send=[url, SleepFrame(0.05)])
    assert gw.named("sendimg_url") == [{"command": "sendimg_url", "img_url": "https://example.com/a.png"}]


def test_bad_params_are_refused() -> None:
    with pytest.raises(ValueError, match="mono"):
        MeetstreamParams(audio_out_channels=2)
    with pytest.raises(ValueError, match="speaker_policy"):
        MeetstreamParams(speaker_policy="loudest")  # type: ignore[arg-type]
