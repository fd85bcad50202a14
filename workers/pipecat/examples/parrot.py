"""parrot: a Pipecat voice agent with no cloud service. It repeats what you say.

Pipecat's Silero VAD (the model ships in the pipecat wheel) finds where each
utterance starts and ends; when the speaker pauses, the parrot plays the
utterance back. Talk over it and it stops at once (barge-in: an
``InterruptionFrame``, which the transport turns into ``interrupt``)::

    transport.input() ─► VADProcessor(Silero) ─► Parrot ─► transport.output()

Run it against a gateway's Redis (``python -m workers.pipecat.examples.parrot
--redis-url ...``), or see it work alone: ``--demo`` starts an embedded Redis,
a gateway and a simulated bot that talks (a synthetic voice Silero takes for
speech), and prints what the meeting hears. To swap in real services, replace
``Parrot`` with STT → LLM → TTS (docs/WORKERS.md, "Pipecat").
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Sequence

from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.audio.vad.vad_analyzer import VADParams
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    Frame,
    InputAudioRawFrame,
    TTSAudioRawFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.audio.vad_processor import VADProcessor
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from workers import WorkerSettings
from workers.pipecat import MeetstreamParams, MeetstreamTransport, PipecatWorker

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000  # Silero runs at 16 kHz; the gateway resamples our replies to 48 kHz


class Parrot(FrameProcessor):
    """Records each utterance between the VAD's start and stop, then plays it back.

    The VAD reports a start ``start_secs`` after speech began, so the last
    ``preroll_s`` of audio is kept and put in front. A start while the bot is
    heard speaking interrupts it (barge-in). Utterances longer than
    ``max_utterance_s`` are cut there (the rest is not recorded: a bound).
    """

    def __init__(self, *, preroll_s: float = 0.3, max_utterance_s: float = 20.0, chunk_ms: int = 40) -> None:
        super().__init__()
        self._preroll_s = preroll_s
        self._max_utterance_s = max_utterance_s
        self._chunk_ms = chunk_ms
        self._preroll: deque[bytes] = deque()
        self._preroll_bytes = 0
        self._recording: bytearray | None = None
        self._rate = SAMPLE_RATE
        self._bot_speaking = False
        self.utterances = 0
        self.barge_ins = 0

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            self._hear(frame)
        elif isinstance(frame, VADUserStartedSpeakingFrame):
            self._recording = bytearray(b"".join(self._preroll))
            if self._bot_speaking:
                self.barge_ins += 1
                await self.broadcast_interruption()  # the transport writes ``interrupt``
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            await self._reply()
        elif isinstance(frame, BotStartedSpeakingFrame):
            self._bot_speaking = True
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self._bot_speaking = False
        await self.push_frame(frame, direction)

    def _hear(self, frame: InputAudioRawFrame) -> None:
        self._rate = frame.sample_rate
        if self._recording is not None:
            if len(self._recording) < self._max_utterance_s * self._rate * 2:
                self._recording += frame.audio
            return
        self._preroll.append(frame.audio)
        self._preroll_bytes += len(frame.audio)
        while self._preroll_bytes > self._preroll_s * self._rate * 2 and len(self._preroll) > 1:
            self._preroll_bytes -= len(self._preroll.popleft())

    async def _reply(self) -> None:
        audio, self._recording = self._recording, None
        self._preroll.clear()
        self._preroll_bytes = 0
        if not audio:
            return
        self.utterances += 1
        step = self._rate * self._chunk_ms // 1000 * 2
        await self.push_frame(TTSStartedFrame())
        for start in range(0, len(audio), step):
            await self.push_frame(TTSAudioRawFrame(bytes(audio[start : start + step]), self._rate, 1))
        await self.push_frame(TTSStoppedFrame())


def build_pipeline(transport: MeetstreamTransport, *, stop_secs: float = 0.5) -> PipelineWorker:
    """The parrot's pipeline around one bot's transport (what a ``PipecatWorker`` calls per bot)."""
    vad = VADProcessor(vad_analyzer=SileroVADAnalyzer(params=VADParams(stop_secs=stop_secs)))
    pipeline = Pipeline([transport.input(), vad, Parrot(), transport.output()])
    return PipelineWorker(
        pipeline,
        params=PipelineParams(audio_in_sample_rate=SAMPLE_RATE, audio_out_sample_rate=SAMPLE_RATE),
        idle_timeout_secs=None,  # a meeting may be quiet for long: the bot's leaving ends us
        enable_rtvi=False,
    )


def build(
    settings: WorkerSettings, params: MeetstreamParams | None = None, **kwargs: object
) -> PipecatWorker:
    return PipecatWorker(build_pipeline, settings, params, **kwargs)  # type: ignore[arg-type]


def quiet_pipecat(level: str = "WARNING") -> None:
    """Pipecat logs every frame event at DEBUG through loguru: keep it to ``level``."""
    from loguru import logger

    logger.remove()
    logger.add(sys.stderr, level=level.upper())


async def demo(seconds: float = 14.0) -> int:
    """Embedded Redis, a gateway, the parrot and a simulated bot that talks, then a report."""
    from gateway.app import Gateway
    from gateway.embedded_redis import RedisServer
    from gateway.settings import Settings
    from gateway.testing.bot import SimulatedBot
    from workers.pipecat.examples.voice import speak

    redis = RedisServer().start()
    try:
        settings = Settings(host="127.0.0.1", port=0, metrics_port=0, redis_url=redis.url, log_format="text")  # type: ignore[call-arg]
        gateway = Gateway(settings)
        await gateway.start()
        parrot = build(
            WorkerSettings(redis_url=redis.url, group="parrot-demo", bot_name="Parrot"), handle_signals=False
        )
        bot = SimulatedBot(f"ws://127.0.0.1:{gateway.port}", "demo_bot")
        try:
            await parrot.start()
            await bot.connect()
            t0 = time.monotonic()
            print("the bot joined; Ada says something (1.2 s), then pauses ...")
            await speak(bot, "spk-1", "Ada", speech_s=1.2, pause_s=2.5)
            heard = bot.playback.heard_after_s(t0)
            print(f"the parrot said it back: {heard:.2f} s of audio, {len(bot.commands('sendaudio'))} chunks")
            print("Ada talks again (3 s), then talks over the parrot's answer ...")
            await speak(bot, "spk-1", "Ada", speech_s=3.0, pause_s=1.2)
            await speak(bot, "spk-1", "Ada", speech_s=0.8, pause_s=2.0)
            interrupts = len(bot.commands("interrupt"))
            print(f"barge-in: {interrupts} interrupt(s) sent to the bot")
            chats = bot.commands("sendchat") + bot.commands("sendmsg")
            print(f"chat lines: {len(chats)}; the meeting ends")
            await bot.close()
            await asyncio.sleep(1.0)
            ok = heard > 0.8 and interrupts >= 1
            print("demo", "passed" if ok else "FAILED", f"in {time.monotonic() - t0:.1f} s")
            return 0 if ok else 1
        finally:
            await parrot.stop()
            await gateway.stop()
    finally:
        redis.stop()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers.pipecat.examples.parrot", description=__doc__)
    p.add_argument("--demo", action="store_true", help="run alone: embedded Redis, gateway and a talking bot")
    p.add_argument("--redis-url", help="(env MEETSTREAM_REDIS_URL)")
    p.add_argument("--group", help="worker group (env MEETSTREAM_WORKER_GROUP; default parrot)")
    p.add_argument(
        "--bot-name", help="the bot's display name: its own voice is left out (env MEETSTREAM_BOT_NAME)"
    )
    p.add_argument("--speakers", choices=("mix", "active", "per_speaker"), default="mix")
    p.add_argument("--lease-ttl-s", type=float)
    p.add_argument(
        "--metrics-port", type=int, help="serve /metrics here (env MEETSTREAM_WORKER_METRICS_PORT)"
    )
    p.add_argument("--log-level", default=os.environ.get("MEETSTREAM_LOG_LEVEL", "info"))
    ns = p.parse_args(list(argv) if argv is not None else None)
    from gateway.logs import configure_logging

    configure_logging("warning" if ns.demo else ns.log_level, "text")
    quiet_pipecat("DEBUG" if ns.log_level == "debug" else "WARNING")
    if ns.demo:
        return asyncio.run(demo())
    env = dict(os.environ)
    env.setdefault("MEETSTREAM_WORKER_GROUP", "parrot")
    overrides: dict[str, object] = dict(
        redis_url=ns.redis_url, group=ns.group, bot_name=ns.bot_name, metrics_port=ns.metrics_port
    )
    if ns.lease_ttl_s:
        overrides.update(lease_ttl_s=ns.lease_ttl_s, lease_renew_s=ns.lease_ttl_s / 5)
    settings = WorkerSettings.from_env(env, **overrides)
    parrot = build(settings, MeetstreamParams(speaker_policy=ns.speakers))
    print(f"instance {settings.instance_id}", flush=True)
    asyncio.run(parrot.run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
