"""A synthetic voice for demos and tests: Silero VAD takes it for speech, a tone it does not.

A glottal pulse train at a wandering 120 Hz pitch through three formant
resonators, changing vowel every 200 ms, with a 4 Hz syllable envelope: a
crude vowel chain, deterministic, no recording needed.
"""

from __future__ import annotations

import asyncio
import functools
import time

import numpy as np

from gateway.protocol import AudioFrame as BotFrame
from gateway.testing.bot import SimulatedBot

RATE = 48_000
_VOWELS = ((700, 1220, 2600), (300, 2300, 3000), (500, 1000, 2500), (400, 1900, 2550))


def _resonator(x: np.ndarray, freq: float, bandwidth: float, rate: int) -> np.ndarray:
    r = np.exp(-np.pi * bandwidth / rate)
    a1, a2 = -2 * r * np.cos(2 * np.pi * freq / rate), r * r
    y = np.zeros_like(x)
    y1 = y2 = 0.0
    for i, v in enumerate(x):  # a two-pole IIR; short signals, so a loop is fine
        y0 = v - a1 * y1 - a2 * y2
        y[i] = y0
        y2, y1 = y1, y0
    return y


@functools.lru_cache(maxsize=8)
def _voice(seconds: float, rate: int) -> bytes:
    n = int(seconds * rate)
    t = np.arange(n) / rate
    f0 = 120 + 20 * np.sin(2 * np.pi * 0.7 * t)
    phase = np.cumsum(f0 / rate)
    pulses = (np.diff(np.floor(phase), prepend=0) > 0).astype(np.float64)
    out = np.zeros(n)
    seg = int(0.2 * rate)
    for k in range(0, n, seg):
        y = pulses[k : k + seg]
        for freq in _VOWELS[(k // seg) % len(_VOWELS)]:
            y = _resonator(y, freq, 90, rate)
        out[k : k + seg] = y
    out *= 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t) ** 2
    out = out / max(1e-9, float(np.max(np.abs(out)))) * 0.5
    return (out * 32767).astype("<i2").tobytes()


def voice(seconds: float, rate: int = RATE) -> bytes:
    """``seconds`` of the synthetic voice, PCM16 LE mono at ``rate``."""
    return _voice(round(seconds, 3), rate)


async def speak(
    bot: SimulatedBot,
    speaker_id: str,
    name: str,
    *,
    speech_s: float,
    pause_s: float = 0.0,
    frame_ms: int = 20,
    silence_frames: bool = False,
) -> None:
    """The bot sends ``speech_s`` of the voice in real time, then ``pause_s`` of nothing
    (or of silent frames from the same speaker, with ``silence_frames``)."""
    pcm = voice(speech_s)
    step = RATE * frame_ms // 1000 * 2
    start = time.monotonic()
    frames = [pcm[i : i + step] for i in range(0, len(pcm), step)]
    if silence_frames:
        frames += [bytes(step)] * int(pause_s * 1000 / frame_ms)
    for i, chunk in enumerate(frames):
        await bot.send_frame(BotFrame(speaker_id, name, chunk))
        delay = start + (i + 1) * frame_ms / 1000 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    rest = start + speech_s + pause_s - time.monotonic()
    if rest > 0:
        await asyncio.sleep(rest)
