"""Identities hidden in the audio itself, so that every frame and every played chunk
can be traced from the bot, through Redis and a worker, back to the bot (pure).

The gateway numbers frames per *connection* (``seq``); a bot that reconnects
starts again at 0, and a frame lost in a dying socket leaves no trace. So each
frame carries the bot's own running index in its first samples, as small
values (at most 255, far below any voice detector's threshold: a silent frame
stays silent). Likewise each 100 ms chunk of an utterance a worker sends starts
with the utterance's number and the chunk's index: the gateway passes 48 kHz
audio through unchanged and cuts it at 100 ms boundaries, so the bot can tell
which chunks of which utterance it played, and which it played twice.
"""

from __future__ import annotations

import math

import numpy as np

RATE = 48_000
FRAME_MAGIC = 0x5A
CHUNK_MAGIC = 0x75
CHUNK_SAMPLES = RATE // 10  # the gateway's --playback-chunk-ms default (100 ms)
_TAG_SAMPLES = 6


def _bytes_of(value: int) -> list[int]:
    return [(value >> shift) & 0xFF for shift in (0, 8, 16, 24)]


def _value_of(samples: np.ndarray) -> int:
    return sum(int(samples[i]) << (8 * i) for i in range(4))


class FrameSource:
    """Builds a bot's 20 ms frames quickly: a precomputed tone period, then the tag."""

    def __init__(self, frame_ms: int = 20) -> None:
        self.samples = RATE * frame_ms // 1000
        self.silence = np.zeros(self.samples, "<i2")
        self._tones: dict[float, np.ndarray] = {}

    def _tone(self, freq_hz: float) -> np.ndarray:
        tone = self._tones.get(freq_hz)
        if tone is None:
            # Whole periods of the tone over 1 s, so any slice of it continues seamlessly.
            t = np.arange(RATE + self.samples) / RATE
            tone = self._tones[freq_hz] = (np.sin(2 * math.pi * freq_hz * t) * 0.3 * 32767).astype("<i2")
        return tone

    def frame(self, index: int, freq_hz: float | None) -> bytes:
        """PCM16 of frame ``index``: a tone (speech) or silence, tagged with ``index``."""
        if freq_hz is None:
            pcm = self.silence.copy()
        else:
            start = (index * self.samples) % RATE
            pcm = self._tone(freq_hz)[start : start + self.samples].copy()
        pcm[:_TAG_SAMPLES] = [FRAME_MAGIC, *_bytes_of(index), (index * 7 + 3) & 0xFF]
        return pcm.tobytes()


def frame_index(pcm: bytes) -> int | None:
    """The bot's running index of a frame, or None if it carries no (valid) tag."""
    if len(pcm) < 2 * _TAG_SAMPLES:
        return None
    head = np.frombuffer(pcm[: 2 * _TAG_SAMPLES], "<i2")
    if head[0] != FRAME_MAGIC:
        return None
    index = _value_of(head[1:5])
    return index if (index * 7 + 3) & 0xFF == head[5] else None


def utterance(number: int, seconds: float) -> np.ndarray:
    """An utterance (a warbling tone, as the bargein example's stand-in for TTS) whose
    every 100 ms chunk starts with ``number`` and the chunk's index."""
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    pcm = (0.2 * np.sin(2 * math.pi * (440 + 40 * np.sin(2 * math.pi * 3 * t)) * t) * 32767).astype("<i2")
    for k, start in enumerate(range(0, n, CHUNK_SAMPLES)):
        pcm[start : start + _TAG_SAMPLES] = [CHUNK_MAGIC, *_bytes_of(number), k & 0xFF]
    return pcm


def chunk_tag(pcm: bytes) -> tuple[int, int] | None:
    """(utterance number, chunk index) of a chunk the bot received, if tagged."""
    if len(pcm) < 2 * _TAG_SAMPLES:
        return None
    head = np.frombuffer(pcm[: 2 * _TAG_SAMPLES], "<i2")
    if head[0] != CHUNK_MAGIC:
        return None
    return _value_of(head[1:5]), int(head[5])
