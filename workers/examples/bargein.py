"""bargein: when a person starts talking while the bot is playing, interrupt it and say so.

Speech is found with :class:`~workers.audio.VoiceDetector` (energy plus a voice
band check, per speaker). "The bot is playing" comes from the gateway's
playback events when it sends them, else from what this worker's own ``say()``
queued. Unattributed audio (``NoSpeaker``) is ignored by default: it may hold
the bot's own voice, and an agent must never interrupt itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from workers import cli
from workers.audio import AudioFrame, VoiceDetector, read_wav, resample, to_int16
from workers.bot import Bot, Event
from workers.worker import Worker, WorkerSettings


def prompt_audio(seconds: float, rate: int = 48_000) -> np.ndarray:
    """A stand-in for a TTS answer: a soft warbling tone."""
    t = np.arange(int(seconds * rate)) / rate
    return to_int16(
        0.2 * np.sin(2 * math.pi * (440 + 40 * np.sin(2 * math.pi * 3 * t)) * t).astype(np.float32)
    )


def build(
    settings: WorkerSettings,
    *,
    prompt_s: float = 8.0,
    prompt_wav: str | None = None,
    ignore_unattributed: bool = True,
    handle_signals: bool = True,
) -> Worker:
    worker = Worker(settings, handle_signals=handle_signals)

    @worker.on_ready
    async def speak(bot: Bot, event: Event) -> None:
        if prompt_wav:
            samples, rate = read_wav(prompt_wav)
            await bot.say(resample(samples, rate, 48_000), 48_000)
        else:
            await bot.say(prompt_audio(prompt_s), 48_000)

    @worker.on_audio
    async def listen(bot: Bot, frame: AudioFrame) -> None:
        if ignore_unattributed and frame.unattributed:
            return
        detectors: dict[str, VoiceDetector] = bot.state.setdefault("vad", {})
        vad = detectors.setdefault(frame.speaker_id or frame.speaker_name, VoiceDetector())
        if vad.update(frame.int16, frame.sample_rate) and bot.is_playing:
            await bot.interrupt()
            await bot.chat(f"{frame.speaker_name} started talking, so I stopped (barge-in).")

    return worker


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser("bargein", __doc__ or "")
    p.add_argument("--prompt-s", type=float, default=8.0, help="seconds of audio to play on ready")
    p.add_argument("--prompt-wav", help="play this PCM16 WAV on ready instead")
    ns = cli.parse(p, argv)
    return cli.run(build(cli.settings(ns, "bargein"), prompt_s=ns.prompt_s, prompt_wav=ns.prompt_wav), ns)
