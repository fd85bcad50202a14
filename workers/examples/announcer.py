"""announcer: plays a WAV file into the meeting when a bot is ready.

Any PCM16 WAV (mono or stereo, any rate) is mixed to mono and resampled to
48 kHz, the rate the vendor recommends. Without ``--wav`` it plays a short chime.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from workers import cli
from workers.audio import read_wav, resample, to_int16
from workers.bot import Bot, Event
from workers.worker import Worker, WorkerSettings

RATE = 48_000


def chime(seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    tone = sum(np.sin(2 * math.pi * f * t) for f in (523.25, 659.25, 783.99)) / 3
    return to_int16((0.3 * tone * np.exp(-3 * t)).astype(np.float32))


def load(path: str | Path | None) -> np.ndarray:
    if path is None:
        return chime()
    samples, rate = read_wav(path)
    return to_int16(resample(samples, rate, RATE)) if rate != RATE else samples


def build(
    settings: WorkerSettings,
    wav: str | Path | None = None,
    *,
    announce_text: str | None = None,
    handle_signals: bool = True,
) -> Worker:
    worker = Worker(settings, handle_signals=handle_signals)
    audio = load(wav)  # read once, at start: a bad file fails fast

    @worker.on_ready
    async def play(bot: Bot, event: Event) -> None:
        if announce_text:
            await bot.chat(announce_text)
        await bot.say(audio, RATE)

    return worker


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser("announcer", __doc__ or "")
    p.add_argument("--wav", help="PCM16 WAV file to play (default: a chime)")
    p.add_argument("--text", help="also post this in the chat")
    ns = cli.parse(p, argv)
    return cli.run(build(cli.settings(ns, "announcer"), ns.wav, announce_text=ns.text), ns)
