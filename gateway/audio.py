"""Audio a worker sends, made playable by a bot (pure; no I/O).

Bots play PCM16 LE mono at 48 kHz. Workers may send other common rates, and
float32, so that a TTS engine's output goes in as it comes out:
:func:`decode_samples` reads the bytes, and :class:`StreamResampler` converts
one clip to 48 kHz chunk by chunk with soxr's band-limited filter (the vendor
page's linear interpolation folds everything above the source Nyquist back
into the band as audible aliasing).

Resampling runs a chunk at a time as the playback scheduler needs it, so a
minute-long utterance never blocks the event loop for the whole conversion.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import soxr

from gateway.protocol import BOT_SAMPLE_RATE

#: Sample rates a worker may send; everything is converted to 48 kHz.
SAMPLE_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000)
Encoding = Literal["pcm16", "float32"]
ENCODINGS: tuple[Encoding, ...] = ("pcm16", "float32")
_SAMPLE_BYTES = {"pcm16": 2, "float32": 4}


def decode_samples(data: bytes, encoding: Encoding = "pcm16") -> np.ndarray:
    """Little-endian PCM16 or float32 bytes as int16 samples.

    Float32 is clipped to [-1, 1] and scaled by 32767, as the vendor's own
    helper does. Raises ValueError with a sentence for the worker.
    """
    width = _SAMPLE_BYTES[encoding]
    if len(data) % width:
        raise ValueError(f"audiochunk has {len(data)} bytes, not whole {encoding} samples of {width} bytes")
    if encoding == "pcm16":
        return np.frombuffer(data, dtype="<i2").astype(np.int16, copy=False)
    floats = np.frombuffer(data, dtype="<f4")
    if not np.all(np.isfinite(floats)):
        raise ValueError("audiochunk has NaN or infinite float32 samples")
    out: np.ndarray = np.round(np.clip(floats, -1.0, 1.0) * 32767).astype(np.int16)
    return out


def duration_samples(n_samples: int, rate: int) -> int:
    """How many 48 kHz samples ``n_samples`` at ``rate`` become (soxr's total output)."""
    return round(n_samples * BOT_SAMPLE_RATE / rate)


class StreamResampler:
    """One clip, read out at 48 kHz in pieces of any size.

    The filter state carries from one read to the next, so the pieces join
    without clicks; the last read flushes the filter's tail.
    """

    def __init__(self, samples: np.ndarray, rate: int) -> None:
        self._src = samples
        self._rate = rate
        self._pos = 0  # source samples fed
        self._flushed = rate == BOT_SAMPLE_RATE
        self._stream = None
        if not self._flushed:
            self._stream = soxr.ResampleStream(rate, BOT_SAMPLE_RATE, 1, dtype="int16", quality="HQ")
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self.total = duration_samples(len(samples), rate)  # 48 kHz samples this clip yields
        self.produced = 0  # 48 kHz samples read so far

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.produced)

    @property
    def exhausted(self) -> bool:
        return self._flushed and self._pos >= len(self._src) and not self._pending_len

    def read(self, n: int) -> np.ndarray:
        """Up to ``n`` samples at 48 kHz; fewer only at the end of the clip."""
        if self._stream is None:
            out = self._src[self._pos : self._pos + n]
            self._pos += len(out)
            self.produced += len(out)
            return out
        while self._pending_len < n and not self._flushed:
            # Feed a little more than the output needs; the rest waits in _pending.
            need_in = int((n - self._pending_len) * self._rate / BOT_SAMPLE_RATE) + 32
            piece = self._src[self._pos : self._pos + need_in]
            self._pos += len(piece)
            last = self._pos >= len(self._src)
            out = self._stream.resample_chunk(piece, last=last)
            if len(out):
                self._pending.append(out)
                self._pending_len += len(out)
            self._flushed = last
        if not self._pending:
            return np.zeros(0, dtype=np.int16)
        joined = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        result, rest = joined[:n], joined[n:]
        self._pending = [rest] if len(rest) else []
        self._pending_len = len(rest)
        self.produced += len(result)
        return result


def resample(samples: np.ndarray, rate: int) -> np.ndarray:
    """A whole clip at 48 kHz (int16); for tests and offline use."""
    if rate == BOT_SAMPLE_RATE:
        return samples
    out: np.ndarray = soxr.resample(samples, rate, BOT_SAMPLE_RATE, quality="HQ")
    return out
