"""Audio as workers see it: frames, numpy views, resampling, a voice detector.

Audio entries carry raw PCM16 LE mono at 48 kHz (``docs/PROTOCOL.md``).
:class:`AudioFrame` exposes them as numpy ``int16`` or ``float32`` arrays.
Speech recognisers usually want 16 kHz: :meth:`AudioFrame.resample` does one
frame; a :class:`Resampler` per speaker keeps filter state across frames, which
avoids a click at every frame boundary.
"""

from __future__ import annotations

import functools
import math
import wave
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soxr

from workers.constants import BOT_SAMPLE_RATE, NO_SPEAKER

ASR_SAMPLE_RATE = 16_000


@dataclass(frozen=True, slots=True)
class AudioFrame:
    """One frame of one speaker, as the gateway published it."""

    bot_id: str
    speaker_id: str
    speaker_name: str
    pcm: bytes = field(repr=False)
    sample_rate: int
    seq: int  # from 0 per audio connection; a gap under one conn is a lost frame
    conn: str
    ts_ms: int
    entry_id: str

    @property
    def unattributed(self) -> bool:
        return self.speaker_name == NO_SPEAKER

    @property
    def int16(self) -> np.ndarray:
        return np.frombuffer(self.pcm, dtype="<i2")

    @property
    def float32(self) -> np.ndarray:
        return to_float32(self.int16)

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / 2 / self.sample_rate

    def resample(self, rate: int = ASR_SAMPLE_RATE) -> np.ndarray:
        """This frame alone at ``rate``, float32 (stateless: see :class:`Resampler`)."""
        return resample(self.float32, self.sample_rate, rate)


def to_float32(samples: np.ndarray) -> np.ndarray:
    """int16 -> float32 in [-1, 1)."""
    return samples.astype(np.float32) / 32768.0


def to_int16(samples: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] -> int16, clipped (int16 input passes through)."""
    if samples.dtype == np.int16:
        return samples
    clipped: np.ndarray = np.clip(samples, -1.0, 1.0) * 32767.0
    return clipped.astype(np.int16)


def to_pcm16(samples: np.ndarray | bytes) -> bytes:
    """Little-endian PCM16 bytes from an int16/float array (bytes pass through)."""
    if isinstance(samples, bytes | bytearray | memoryview):
        return bytes(samples)
    return to_int16(np.asarray(samples)).astype("<i2").tobytes()


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample a whole signal (float32 out)."""
    x = samples if samples.dtype == np.float32 else to_float32(samples)
    if from_rate == to_rate:
        return x
    out: np.ndarray = soxr.resample(x, from_rate, to_rate)
    return out.astype(np.float32, copy=False)


class Resampler:
    """Streaming resampler for one speaker (keeps state between frames)."""

    def __init__(self, from_rate: int = BOT_SAMPLE_RATE, to_rate: int = ASR_SAMPLE_RATE) -> None:
        self._stream = soxr.ResampleStream(from_rate, to_rate, 1, dtype="float32")

    def process(self, frame: AudioFrame | np.ndarray, last: bool = False) -> np.ndarray:
        x = frame.float32 if isinstance(frame, AudioFrame) else frame
        if x.dtype != np.float32:
            x = to_float32(x)
        out: np.ndarray = self._stream.resample_chunk(x, last=last)
        return out


def rms_dbfs(samples: np.ndarray) -> float:
    x = samples if samples.dtype == np.float32 else to_float32(samples)
    if not len(x):
        return -120.0
    rms = math.sqrt(float(np.dot(x, x)) / len(x))
    return 20 * math.log10(max(rms, 1e-6))


@functools.lru_cache(maxsize=64)
def _band_tools(n: int, sample_rate: int, low_hz: float, high_hz: float) -> tuple[np.ndarray, np.ndarray]:
    """The analysis window and the voice-band mask for frames of ``n`` samples (made once)."""
    freqs = np.fft.rfftfreq(n, 1 / sample_rate)
    window = np.hanning(n).astype(np.float32)
    return window, (freqs >= low_hz) & (freqs <= high_hz)


def voice_band_ratio(
    samples: np.ndarray, sample_rate: int, low_hz: float = 85.0, high_hz: float = 3400.0
) -> float:
    """Share of the frame's energy between ``low_hz`` and ``high_hz`` (speech lives there)."""
    x = samples if samples.dtype == np.float32 else to_float32(samples)
    if len(x) < 16:
        return 0.0
    window, band = _band_tools(len(x), sample_rate, low_hz, high_hz)
    spectrum = np.fft.rfft(x * window)
    power = spectrum.real**2 + spectrum.imag**2
    total = float(power[1:].sum())
    if total <= 0:
        return 0.0
    return float(power[band].sum()) / total


@dataclass
class VoiceDetector:
    """Energy plus voice-band VAD with onset and hangover, one per speaker.

    A frame is voiced when it is louder than ``threshold_dbfs`` and most of its
    energy is in the voice band; speech *starts* after ``onset_frames`` voiced
    frames in a row (a click or a cough is not a barge-in) and *stops* after
    ``hangover_frames`` unvoiced ones (pauses between words do not end it).
    """

    threshold_dbfs: float = -40.0
    min_band_ratio: float = 0.6
    onset_frames: int = 2
    hangover_frames: int = 5
    speaking: bool = False
    _voiced_run: int = 0
    _silent_run: int = 0

    def is_voiced(self, samples: np.ndarray, sample_rate: int) -> bool:
        x = samples if samples.dtype == np.float32 else to_float32(samples)  # once, for both tests
        return rms_dbfs(x) > self.threshold_dbfs and voice_band_ratio(x, sample_rate) >= self.min_band_ratio

    def update(self, samples: np.ndarray, sample_rate: int) -> bool | None:
        """Feed a frame; True when speech starts, False when it stops, else None."""
        if self.is_voiced(samples, sample_rate):
            self._voiced_run += 1
            self._silent_run = 0
            if not self.speaking and self._voiced_run >= self.onset_frames:
                self.speaking = True
                return True
        else:
            self._silent_run += 1
            self._voiced_run = 0
            if self.speaking and self._silent_run >= self.hangover_frames:
                self.speaking = False
                return False
        return None


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """A PCM16 WAV file as mono int16 samples and its rate (stereo is averaged)."""
    with wave.open(str(path), "rb") as wf:
        if wf.getsampwidth() != 2:
            raise ValueError(f"{path}: {8 * wf.getsampwidth()}-bit WAV, only 16-bit PCM is supported")
        channels, rate = wf.getnchannels(), wf.getframerate()
        data = np.frombuffer(wf.readframes(wf.getnframes()), dtype="<i2")
    if channels > 1:
        data = data.reshape(-1, channels).mean(axis=1).astype(np.int16)
    return data, rate


def write_wav(path: str | Path, samples: np.ndarray | bytes, sample_rate: int) -> None:
    with wave.open(str(path), "wb") as wf:
        wf.setnchannels(1)
        wf.setsampwidth(2)
        wf.setframerate(sample_rate)
        wf.writeframes(to_pcm16(samples))
